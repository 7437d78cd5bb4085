r"""The optimizer-instability study of section 3.1 (figure 1, appendix A.1): the experiment, its plot, its command.

  python -m launch.studies.optimizer_instability --out_dir=runs/optimizer_instability

An MLP with two hidden layers of 1,024 ReLU units memorises random labels of
5,000 MNIST images; after every iteration the labels are re-randomised (the
inputs stay). Every `--eval_every` steps it logs the accuracy on 4,096 of the
images and the fraction of dead ReLU units (zero on all of them,
`probes.measures.statistics`), once per optimizer preset (default Adam and the
tuned one), to OUT_DIR/metrics.jsonl, and draws OUT_DIR/optimizer_instability.png.
The network and the optimizers are the agent's own (`agents.networks`,
`agents.optimizers`); the settings are `InstabilityConfig`'s fields. The flags
are defined only when this module is the command, so `launch.studies.registry`
imports it without them.
"""

import dataclasses
import os
import time
from typing import Dict, List, Optional, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import optax

from agents import config_flags, networks, optimizers
from agents.config import option, registered
from environments import datasets
from probes.measures import statistics
from launch.studies.grid import Cell, Row, Study, StudyLayout, StudyOptions, data_args, flag_types
from probes.figures import aggregate
from probes.figures import study_plots
from probes.records.loggers import JsonlLogger, read_jsonl

METRICS = 'metrics'
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class InstabilityConfig:
  """The study's settings; its command takes each as a flag of its name."""
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


def run_study(images: np.ndarray, optimizer_name: str, config: InstabilityConfig,
              logger=None) -> List[Dict[str, float]]:
  """Trains through `config.iterations` label changes; returns (and logs) one record per measurement."""
  width, seed, eval_every, batch_size = config.width, config.seed, config.eval_every, config.batch_size
  eval_samples = min(config.eval_samples, len(images))
  network = networks.make_network('mlp', networks.ArchConfig(num_outputs=NUM_CLASSES, width_multiplier=width / 512))
  optimizer = optimizers.make_optimizer(
      optimizers.OptimizerConfig(name=optimizer_name, learning_rate=config.learning_rate))
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
    return accuracy, statistics.dead_unit_fraction(statistics.unit_activity(output.hidden))

  records = []
  key = jax.random.PRNGKey(seed + 1)
  step = 0
  for iteration in range(config.iterations):
    labels = jnp.asarray(rng.integers(NUM_CLASSES, size=len(images)))
    for _ in range(max(1, config.steps_per_iteration // eval_every)):
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


# --- the study of launch.study ---

INSTABILITY_SCALES = {
    'smoke': dict(num_images=500, eval_samples=500, iterations=2, steps_per_iteration=200, eval_every=100),
    'cpu': dict(iterations=5, steps_per_iteration=2000),
    'paper': dict(iterations=5, steps_per_iteration=4000),  # Appendix A.1's.
}


def instability_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  data = data_args(options)
  return [Cell(name, {'optimizer': name}, {**INSTABILITY_SCALES[scale], 'optimizers': name, **data},
               command='launch.studies.optimizer_instability', dir_flag='out_dir', resumable=False)
          for name in ('adam', 'adam_tuned')], {}


def instability_measure(cell: Cell, run_dir: str) -> Row:
  """Accuracy and dead units at the end of each iteration (the last record of each), and at the end."""
  records = read_jsonl(os.path.join(run_dir, f'{METRICS}.jsonl'))
  ends = {r['iteration']: r for r in records}
  return {'final_accuracy': records[-1]['accuracy'], 'final_dead_unit_fraction': records[-1]['dead_unit_fraction'],
          'iteration_accuracy': [ends[i]['accuracy'] for i in sorted(ends)],
          'iteration_dead_unit_fraction': [ends[i]['dead_unit_fraction'] for i in sorted(ends)]}


def instability_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('optimizer',), ('final_accuracy', 'final_dead_unit_fraction'))
  written = aggregate.write_table(summary, layout.table('summary'))
  curves = {row['optimizer']: [] for row in rows}
  for row in rows:
    curves[row['optimizer']].append(read_jsonl(os.path.join(row['run_dir'], f'{METRICS}.jsonl')))
  written.append(study_plots.save(study_plots.mean_curves(curves, 'step', ('accuracy', 'dead_unit_fraction'),
                                                          'Optimizer instability (figure 1): mean over seeds'),
                                  layout.figure('optimizer_instability')))
  return written


STUDY = Study('optimizer_instability', 'figure 1', instability_cells,
                                           {'smoke': 1, 'cpu': 3, 'paper': 3},
                                           lambda: flag_types(InstabilityConfig), instability_measure,
                                           instability_aggregate)


def _command_line():
  """The command's flags (defined here, not at import: the study registry imports this module) and its main."""
  out_dir = flags.DEFINE_string('out_dir', None, 'Where metrics.jsonl and the PNG go.')
  fields = config_flags.define(InstabilityConfig)

  def main(argv):
    config_flags.check_command_line(argv, out_dir)
    config = config_flags.build(InstabilityConfig, fields)
    unknown = [name for name in config.optimizers if name not in optimizers.OPTIMIZERS]
    if unknown:
      raise app.UsageError(f'--optimizers: unknown {", ".join(unknown)}; accepted: '
                           f'{", ".join(sorted(optimizers.OPTIMIZERS))}.')
    if os.path.exists(os.path.join(out_dir.value, f'{METRICS}.jsonl')):
      raise app.UsageError(f'--out_dir={out_dir.value} already holds {METRICS}.jsonl; choose another directory.')
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
    logger = JsonlLogger(os.path.join(out_dir.value, f'{METRICS}.jsonl'), step_key='step')
    for name in config.optimizers:
      start = time.time()

      def log(record):
        logger(record)
        print(f'[{name}] iteration {record["iteration"]} step {record["step"]}: accuracy {record["accuracy"]:.3f}, '
              f'dead units {record["dead_unit_fraction"]:.3f} ({time.time() - start:.0f}s)', flush=True)

      run_study(images, name, config, logger=log)
    path = os.path.join(out_dir.value, 'optimizer_instability.png')
    plot(read_jsonl(logger.path), config.steps_per_iteration, path)
    print(f'Wrote {logger.path} and {path}')

  return main


if __name__ == '__main__':
  app.run(_command_line())
