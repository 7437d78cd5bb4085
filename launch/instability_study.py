"""The optimizer-instability study of section 3.1 (figure 1): the experiment and its plot, flag-free.

`python -m launch.optimizer_instability` is its command line.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

from agents import networks, optimizers
from agents.config import option, registered

METRICS = 'metrics'
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class InstabilityConfig:
  """The study's settings; `python -m launch.optimizer_instability` takes each as a flag of its name."""
  optimizers: Tuple[str, ...] = option(('adam', 'adam_tuned'), 'Optimizer presets to compare.',
                                       choices=registered('agents.optimizers', 'OPTIMIZERS'))
  num_images: int = option(5000, 'Images whose random labels are memorised.', lower_bound=10)
  eval_samples: int = option(4096, 'Images the accuracy and dead units are measured on.', lower_bound=1)
  iterations: int = option(5, 'Label re-randomisations (iterations).', lower_bound=1)
  steps_per_iteration: int = option(4000, 'Optimizer steps per iteration.', lower_bound=1)
  eval_every: int = option(250, 'Steps between measurements.', lower_bound=1)
  batch_size: int = option(128, 'Minibatch size.', lower_bound=1)
  width: int = option(1024, 'Hidden width.', lower_bound=1)
  learning_rate: float = option(1e-3, 'Learning rate (appendix A.1).', lower_bound=0.0)
  seed: int = option(0, 'Seed of the image subset, labels, initialisation and batches.')
  data_dir: Optional[str] = option(None, 'MNIST location (see environments/datasets.py); default: the usual search, '
                                   'ending with the embedded 10,000 digits.')


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

  # The images are arguments, not closed-over constants: XLA would constant-fold them at every compilation.
  @jax.jit
  def train(params, opt_state, inputs, labels, key):
    def step(carry, step_key):
      params, opt_state = carry
      index = jax.random.randint(step_key, (batch_size,), 0, inputs.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, inputs[index], labels[index])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, eval_every))
    return params, opt_state, jnp.mean(losses)

  @jax.jit
  def measure(params, evaluation, labels):
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
      params, opt_state, loss = train(params, opt_state, inputs, labels, train_key)
      step += eval_every
      accuracy, dead = measure(params, evaluation, labels)
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


