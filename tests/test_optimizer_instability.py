"""The optimizer-instability study (section 3.1): memorise random labels, re-drawn every iteration."""

import numpy as np

from launch import instability_study


def test_memorises_labels_then_loses_them_when_they_are_redrawn():
  images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
  records = instability_study.run_study(
      images, 'adam', iterations=2, steps_per_iteration=300, eval_every=100, batch_size=32, width=128,
      learning_rate=1e-3, eval_samples=64, seed=0)
  assert [(r['iteration'], r['step']) for r in records] == [(0, 100), (0, 200), (0, 300), (1, 400), (1, 500),
                                                             (1, 600)]
  assert all(0.0 <= r['accuracy'] <= 1.0 and 0.0 <= r['dead_unit_fraction'] <= 1.0 for r in records)
  # 64 random labels memorised by the end of an iteration; measured against the new labels after 100 steps,
  # the network is well short of it.
  assert records[2]['accuracy'] == 1.0
  assert records[3]['accuracy'] < records[5]['accuracy']
  assert records[2]['train_loss'] < records[0]['train_loss']
