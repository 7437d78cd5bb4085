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
from typing import Dict, List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

from agents import networks, optimizers
from environments import datasets
from launch.loggers import JsonlLogger, read_jsonl

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

METRICS = 'metrics'
NUM_CLASSES = 10


def run_study(images: np.ndarray, optimizer_name: str, iterations: int, steps_per_iteration: int, eval_every: int,
              batch_size: int, width: int, learning_rate: float, eval_samples: int, seed: int,
              logger=None) -> List[Dict[str, float]]:
  """Trains through `iterations` label changes; returns (and logs) one record per measurement."""
  network = networks.make_network('mlp', networks.ArchConfig(num_outputs=NUM_CLASSES, width_multiplier=width / 512))
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(name=optimizer_name, learning_rate=learning_rate))
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(images)
  evaluation = inputs[:eval_samples]
  params = network.init(jax.random.PRNGKey(seed), inputs[:1])
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y):
    logits = network.apply(params, x).outputs
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  @jax.jit
  def train(params, opt_state, labels, key):
    def step(carry, step_key):
      params, opt_state = carry
      index = jax.random.randint(step_key, (batch_size,), 0, inputs.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, inputs[index], labels[index])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, eval_every))
    return params, opt_state, jnp.mean(losses)

  @jax.jit
  def measure(params, labels):
    output = network.apply(params, evaluation)
    accuracy = jnp.mean(jnp.argmax(output.outputs, -1) == labels[:eval_samples])
    dead = sum(jnp.sum(jnp.all(h == 0, axis=0)) for h in output.hidden)
    return accuracy, dead / sum(h.shape[-1] for h in output.hidden)

  records = []
  key = jax.random.PRNGKey(seed + 1)
  step = 0
  for iteration in range(iterations):
    labels = jnp.asarray(rng.integers(NUM_CLASSES, size=len(images)))
    for _ in range(max(1, steps_per_iteration // eval_every)):
      key, train_key = jax.random.split(key)
      params, opt_state, loss = train(params, opt_state, labels, train_key)
      step += eval_every
      accuracy, dead = measure(params, labels)
      record = {'optimizer': optimizer_name, 'iteration': iteration, 'step': step, 'train_loss': float(loss),
                'accuracy': float(accuracy), 'dead_unit_fraction': float(dead)}
      records.append(record)
      if logger:
        logger(record)
  return records


def plot(records: List[Dict[str, float]], steps_per_iteration: int, path: str) -> None:
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  for name in dict.fromkeys(r['optimizer'] for r in records):
    mine = [r for r in records if r['optimizer'] == name]
    steps = [r['step'] for r in mine]
    top.plot(steps, [r['accuracy'] for r in mine], label=name)
    bottom.plot(steps, [r['dead_unit_fraction'] for r in mine], label=name)
  for ax in (top, bottom):
    for change in range(steps_per_iteration, max(r['step'] for r in records), steps_per_iteration):
      ax.axvline(change, color='grey', lw=0.5, ls=':')
  top.set_ylabel('accuracy')
  top.set_ylim(0, 1.02)
  bottom.legend(loc='upper left')
  top.set_title('Optimizer instability: random labels re-drawn every iteration (dotted)')
  bottom.set_ylabel('fraction of dead units')
  bottom.set_ylim(0, 1.0)
  bottom.set_xlabel('optimizer step')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
  logger = JsonlLogger(OUT_DIR.value, METRICS, step_key='step', tensorboard=False)
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
