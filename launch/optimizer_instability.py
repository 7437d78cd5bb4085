r"""The optimizer-instability study of section 3.1 (figure 1, appendix A.1).

  python -m launch.optimizer_instability --out_dir=runs/optimizer_instability

An MLP with two hidden layers of 1,024 ReLU units memorises random labels of
5,000 MNIST images; after every iteration the labels are re-randomised (the
inputs stay). Every `--eval_every` steps it logs the accuracy on 4,096 of the
images and the fraction of dead ReLU units (zero on all of them), once per
optimizer preset (default Adam and the tuned one), to OUT_DIR/metrics.jsonl,
and draws OUT_DIR/optimizer_instability.png. The network and the optimizers
are the agent's own (`agents.networks`, `agents.optimizers`); the settings are
`launch.instability_study.InstabilityConfig`'s fields.
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

from agents import config_flags, optimizers
from environments import datasets
from launch.instability_study import METRICS, InstabilityConfig, plot, run_study
from probes.loggers import JsonlLogger, read_jsonl

OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where metrics.jsonl and the PNG go.')
FIELDS = config_flags.define(InstabilityConfig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  if not OUT_DIR.value:
    raise app.UsageError('--out_dir is required.')
  config = config_flags.build(InstabilityConfig, FIELDS)
  unknown = [name for name in config.optimizers if name not in optimizers.OPTIMIZERS]
  if unknown:
    raise app.UsageError(f'--optimizers: unknown {", ".join(unknown)}; accepted: '
                         f'{", ".join(sorted(optimizers.OPTIMIZERS))}.')
  if os.path.exists(os.path.join(OUT_DIR.value, f'{METRICS}.jsonl')):
    raise app.UsageError(f'--out_dir={OUT_DIR.value} already holds {METRICS}.jsonl; choose another directory.')
  try:
    data = datasets.load('mnist', data_dir=config.data_dir)
  except ValueError as e:
    raise app.UsageError(str(e))
  if config.num_images > len(data.images):
    raise app.UsageError(f'--num_images={config.num_images} exceeds the {len(data.images)} images of {data.source}.')
  subset = np.random.default_rng(config.seed).permutation(len(data.images))[:config.num_images]
  images = data.images[subset]
  print(f'{data.source}; {len(images)} images, {config.iterations} iterations x {config.steps_per_iteration} steps.',
        flush=True)
  logger = JsonlLogger(os.path.join(OUT_DIR.value, f'{METRICS}.jsonl'), step_key='step')
  for name in config.optimizers:
    start = time.time()

    def log(record):
      logger(record)
      print(f'[{name}] iteration {record["iteration"]} step {record["step"]}: accuracy {record["accuracy"]:.3f}, '
            f'dead units {record["dead_unit_fraction"]:.3f} ({time.time() - start:.0f}s)', flush=True)

    run_study(images, name, config.iterations, config.steps_per_iteration, config.eval_every, config.batch_size,
              config.width, config.learning_rate, min(config.eval_samples, len(images)), config.seed, logger=log)
  path = os.path.join(OUT_DIR.value, 'optimizer_instability.png')
  plot(read_jsonl(logger.path), config.steps_per_iteration, path)
  print(f'Wrote {logger.path} and {path}')


if __name__ == '__main__':
  app.run(main)
