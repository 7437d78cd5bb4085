"""The optimizer-instability study (section 3.1, figure 1) at a small scale: its claim, not only its plumbing."""

import os

import numpy as np
import pytest

from environments import datasets
from launch.studies import optimizer_instability as instability_study

pytestmark = pytest.mark.slow  # A real study: tens of seconds.

# Sized to run in seconds on 2 CPU cores with the effect still clear. Default Adam memorises 2,000 random labels
# within the 500 steps, its second-moment estimate decays with the gradients, and the relabelling's large gradients
# then meet it: steps of several learning rates in every parameter at once. Over seeds 0-5 its dead units went
# from 0.014-0.023 before the relabelling to 0.146-0.179 after; adam_tuned's stayed at 0.000-0.004 throughout.
NUM_IMAGES, WIDTH, STEPS_PER_ITERATION, EVAL_EVERY = 2000, 512, 500, 250


def _study(optimizer_name):
  source = datasets.SOURCES['mnist']
  images, _ = source.read_embedded(os.path.join(datasets.EMBEDDED_DIR, source.embedded))
  subset = np.random.default_rng(0).permutation(len(images))[:NUM_IMAGES]
  config = instability_study.InstabilityConfig(
      iterations=2, steps_per_iteration=STEPS_PER_ITERATION, eval_every=EVAL_EVERY, batch_size=128, width=WIDTH,
      learning_rate=1e-3, eval_samples=NUM_IMAGES, seed=0)
  records = instability_study.run_study(images[subset], optimizer_name, config)
  assert [(r['iteration'], r['step']) for r in records] == [(0, 250), (0, 500), (1, 750), (1, 1000)]
  before = records[1]  # The end of the first labelling.
  after = records[2]  # 250 steps into the second.
  return before, after


def test_default_adam_kills_units_at_a_relabelling_and_tuned_adam_does_not():
  before, after = _study('adam')
  assert before['accuracy'] > 0.95  # The labels were memorised: the gradients had become small.
  assert after['dead_unit_fraction'] > 0.1 and after['dead_unit_fraction'] > 3 * before['dead_unit_fraction'], (
      before, after)
  tuned_before, tuned_after = _study('adam_tuned')
  assert tuned_before['dead_unit_fraction'] < 0.01 and tuned_after['dead_unit_fraction'] < 0.01, (
      tuned_before, tuned_after)
