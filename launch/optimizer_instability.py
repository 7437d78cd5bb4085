r"""The optimizer-instability study of section 3.1 (figure 1, appendix A.1).

  python -m launch.optimizer_instability --out_dir=runs/optimizer_instability

An MLP with two hidden layers of 1,024 ReLU units memorises random labels of
5,000 MNIST images; after every iteration the labels are re-randomised (the
inputs stay). Every `--eval_every` steps it logs the accuracy on 4,096 of the
images and the fraction of dead ReLU units (zero on all of them), once per
optimizer preset (default Adam and the tuned one), to OUT_DIR/metrics.jsonl,
and draws OUT_DIR/optimizer_instability.png. The network and the optimizers
are the agent's own (`agents.networks`, `agents.optimizers`).
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

from agents import optimizers
from environments import datasets
from launch.instability_study import METRICS, plot, run_study
from probes.loggers import JsonlLogger, read_jsonl

OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where metrics.jsonl and the PNG go.')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'MNIST location (see environments/datasets.py); default: the usual '
                               'search, ending with the embedded 10,000 digits.')
OPTIMIZERS = flags.DEFINE_list('optimizers', ['adam', 'adam_tuned'], 'Optimizer presets to compare.')
NUM_IMAGES = flags.DEFINE_integer('num_images', 5000, 'Images whose random labels are memorised.', lower_bound=10)
EVAL_SAMPLES = flags.DEFINE_integer('eval_samples', 4096, 'Images the accuracy and dead units are measured on.',
                                    lower_bound=1)
ITERATIONS = flags.DEFINE_integer('iterations', 5, 'Label re-randomisations (iterations).', lower_bound=1)
STEPS_PER_ITERATION = flags.DEFINE_integer('steps_per_iteration', 4000, 'Optimizer steps per iteration.',
                                           lower_bound=1)
EVAL_EVERY = flags.DEFINE_integer('eval_every', 250, 'Steps between measurements.', lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer('batch_size', 128, 'Minibatch size.', lower_bound=1)
WIDTH = flags.DEFINE_integer('width', 1024, 'Hidden width.', lower_bound=1)
LEARNING_RATE = flags.DEFINE_float('learning_rate', 1e-3, 'Learning rate (appendix A.1).', lower_bound=0.0)
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the image subset, labels, initialisation and batches.')


def main(argv):
  del argv
  if not OUT_DIR.value:
    raise app.UsageError('--out_dir is required.')
  unknown = [name for name in OPTIMIZERS.value if name not in optimizers.OPTIMIZERS]
  if unknown:
    raise app.UsageError(f'--optimizers: unknown {", ".join(unknown)}; accepted: '
                         f'{", ".join(sorted(optimizers.OPTIMIZERS))}.')
  if os.path.exists(os.path.join(OUT_DIR.value, f'{METRICS}.jsonl')):
    raise app.UsageError(f'--out_dir={OUT_DIR.value} already holds {METRICS}.jsonl; choose another directory.')
  try:
    data = datasets.load('mnist', data_dir=DATA_DIR.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  if NUM_IMAGES.value > len(data.images):
    raise app.UsageError(f'--num_images={NUM_IMAGES.value} exceeds the {len(data.images)} images of {data.source}.')
  subset = np.random.default_rng(SEED.value).permutation(len(data.images))[:NUM_IMAGES.value]
  images = data.images[subset]
  print(f'{data.source}; {len(images)} images, {ITERATIONS.value} iterations x {STEPS_PER_ITERATION.value} steps.',
        flush=True)
  logger = JsonlLogger(os.path.join(OUT_DIR.value, f'{METRICS}.jsonl'), step_key='step')
  for name in OPTIMIZERS.value:
    start = time.time()

    def log(record):
      logger(record)
      print(f'[{name}] iteration {record["iteration"]} step {record["step"]}: accuracy {record["accuracy"]:.3f}, '
            f'dead units {record["dead_unit_fraction"]:.3f} ({time.time() - start:.0f}s)', flush=True)

    run_study(images, name, ITERATIONS.value, STEPS_PER_ITERATION.value, EVAL_EVERY.value, BATCH_SIZE.value,
              WIDTH.value, LEARNING_RATE.value, min(EVAL_SAMPLES.value, len(images)), SEED.value, logger=log)
  path = os.path.join(OUT_DIR.value, 'optimizer_instability.png')
  plot(read_jsonl(logger.path), STEPS_PER_ITERATION.value, path)
  print(f'Wrote {logger.path} and {path}')


if __name__ == '__main__':
  app.run(main)
