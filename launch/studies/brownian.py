r"""The Brownian-motion control of section 3.2 (figure 2, appendix A.1): the experiment, its plot, its command.

  python -m launch.studies.brownian --run_dir=runs/brownian [--steps=20000] [--measure_every=5000]

Gradient descent on the easy MDP's double-DQN loss (the MDP preset's MLP with
SGD, 1e-3, batches of 512, target network every 5,000 steps, on `mdp:mnist:easy`
transitions from a uniformly random policy) against a random walk from the same
initialisation: at every step the walk adds an isotropic Gaussian direction
scaled to the norm of that step's gradient-descent displacement, so the two
processes differ only in the direction of each step. At steps 0,
`--measure_every`, ... both are measured with one `probes.measures.diagnostics`
function (Hessian density, probe-task C_k, TD C_k; same perturbation network,
probe inputs and Lanczos key), so at step 0 their measurements are identical.
Writes RUN_DIR/brownian.jsonl (one record per measured step and process),
RUN_DIR/covariance/ and RUN_DIR/td_covariance/ (<process>_<step>.npy),
RUN_DIR/config.json and RUN_DIR/plots/brownian.png. The flags are defined only
when this module is the command, so `launch.studies.registry` imports it
without them.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from agents import config_flags
from agents.builder import AgentParts, make_agent
from agents.config import AgentConfig, option
from agents.update import (TrainingState, double_q_loss, init_state, make_target_update, make_transition_loss,
                           make_update)
from agents.types import Transition
import environments
from launch.studies.grid import Cell, Row, Study, StudyLayout, StudyOptions, data_args, flag_types
from probes.figures import aggregate
from probes.figures import study_plots
from probes.records.loggers import JsonlLogger, read_jsonl
from probes.measures import probe_set
from probes.measures.diagnostics import DiagnosticsConfig, make_diagnostics

ENV = 'mdp:mnist:easy'
RECORDS = 'brownian'
PROCESSES = ('gradient_descent', 'random_walk')
# The diagnostics' settings the command line takes (the rest stay the evaluator's defaults).
DIAGNOSTIC_FLAGS = ('lanczos_steps', 'hessian_batch_size', 'covariance_samples', 'td_covariance_samples')


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The study's settings; its command takes each as a flag of its name."""
  # Appendix A.1: SGD at 1e-3, batches of 512, the target network copied every 5,000 steps.
  learning_rate: float = option(1e-3, 'SGD learning rate (appendix A.1).', lower_bound=0.0)
  batch_size: int = option(512, 'Training batch (appendix A.1).', lower_bound=1)
  target_update_period: int = option(5000, 'Steps between target-network copies (appendix A.1).', lower_bound=1)
  # The paper is silent on the rest.
  steps: int = option(20_000, 'Training steps of both processes.', lower_bound=1)
  measure_every: int = option(5000, 'Steps between measurements (also at step 0 and the last step).', lower_bound=1)
  num_transitions: int = option(50_000, 'Uniformly-random-policy transitions collected up front; batches are '
                                'sampled from them.', lower_bound=1)
  width_multiplier: float = option(1.0, 'Scales the MLP\'s two hidden layers of 512.', lower_bound=0.0)
  seed: int = option(0, 'Seed of the environment, policy, batches, initialisation, walk, perturbation network and '
                     'Lanczos start.')
  progress_every: int = option(1000, 'Training steps between progress lines.', lower_bound=1)
  data_dir: Optional[str] = option(None, 'MNIST location (see environments/datasets.py); default: the usual search, '
                                   'ending with the embedded 10,000 digits.')

  @property
  def measured_steps(self) -> List[int]:
    return sorted(set(range(0, self.steps + 1, self.measure_every)) | {self.steps})

  def agent_config(self) -> AgentConfig:
    return AgentConfig(width_multiplier=self.width_multiplier, optimizer='sgd', learning_rate=self.learning_rate,
                       batch_size=self.batch_size, target_update_period=self.target_update_period)


def validate(config: StudyConfig, diagnostics: DiagnosticsConfig) -> None:
  """Raises ValueError naming the flag of every inconsistent setting (the bounds are the flags')."""
  if config.measure_every > config.steps:
    raise ValueError(f'--measure_every={config.measure_every} exceeds --steps={config.steps}.')
  if config.learning_rate <= 0:
    raise ValueError(f'--learning_rate={config.learning_rate} must be positive.')
  if config.width_multiplier <= 0:
    raise ValueError(f'--width_multiplier={config.width_multiplier} must be positive.')
  for flag, value in (('--batch_size', config.batch_size),
                      ('--td_covariance_samples', diagnostics.td_covariance_samples)):
    if value > config.num_transitions:
      raise ValueError(f'{flag}={value} exceeds --num_transitions={config.num_transitions}.')


def check_run_dir(run_dir: str) -> None:
  """A directory holding results is refused before anything is written: nothing is overwritten."""
  path = os.path.join(run_dir, f'{RECORDS}.jsonl')
  if os.path.exists(path):
    raise ValueError(f'--run_dir={run_dir} already holds {path}; choose another directory (nothing was written).')


def collect_transitions(env, num_transitions: int, seed: int) -> Transition:
  """A pool of (s, a, r, gamma, s') under a uniformly random policy, as the actors write them."""
  rng = np.random.default_rng([seed, 0])  # Apart from the environment's default_rng(seed) stream.
  num_actions = env.action_spec().num_values
  fields: Dict[str, list] = {name: [] for name in Transition._fields}
  timestep = env.reset()
  for _ in range(num_transitions):
    action = int(rng.integers(num_actions))
    next_timestep = env.step(action)
    for name, value in (('observation', timestep.observation), ('action', np.int32(action)),
                        ('reward', np.float32(next_timestep.reward)),
                        ('discount', np.float32(next_timestep.discount)),
                        ('next_observation', next_timestep.observation)):
      fields[name].append(value)
    timestep = env.reset() if next_timestep.last() else next_timestep
  return Transition(**{name: np.stack(values) for name, values in fields.items()})


def select_probe_inputs(transitions: Transition, diagnostics: DiagnosticsConfig) -> np.ndarray:
  """The pool's first observations distinct by content, as many as the Hessian batch and C_k need.

  Distinct, since a repeated image would give C_k rows that are copies.
  """
  observations = transitions.observation
  unique = probe_set.distinct(observations)
  needed = max(diagnostics.hessian_batch_size, diagnostics.covariance_samples)
  if len(unique) < needed:
    raise ValueError(f'The {len(observations)} transitions (--num_transitions) hold {len(unique)} distinct '
                     f'observations, fewer than the {needed} that --hessian_batch_size / --covariance_samples need.')
  return unique[:needed]


class StudyResult(NamedTuple):
  records: List[Dict[str, object]]  # One per measured step and process, GD first.
  gd_step_norms: np.ndarray  # [steps] ||theta_{t+1} - theta_t|| of gradient descent.
  walk_step_norms: np.ndarray  # [steps] the same of the random walk, as applied (float32 rounding).
  step_cosines: np.ndarray  # [steps] cosine between the two processes' displacements.
  train_td_losses: np.ndarray  # [steps] gradient descent's loss on its training batch.


Measurement = Tuple[Dict[str, object], np.ndarray, Optional[np.ndarray]]  # (record, C_k, TD C_k or None)


def _make_chunk(agent: AgentParts, discount: float) -> Callable:
  """jit (state, walk, walk key, pool, batch indices [n, B]) -> n coupled steps of both processes.

  Per step it also returns what the walk is checked by: GD's training loss, both displacement norms and the
  cosine between the two displacements.
  """
  update = make_update(agent.network, agent.encoding, agent.optimizer, discount)

  @jax.jit
  def chunk(state: TrainingState, walk: jax.Array, key: jax.Array, pool: Transition, indices: jax.Array):
    def step(carry, batch_indices):
      state, walk, key = carry
      new_state, metrics = update(state, jax.tree_util.tree_map(lambda x: x[batch_indices], pool))
      gd_delta = ravel_pytree(new_state.params)[0] - ravel_pytree(state.params)[0]
      gd_norm = jnp.linalg.norm(gd_delta)
      key, noise_key = jax.random.split(key)
      direction = jax.random.normal(noise_key, walk.shape, walk.dtype)
      new_walk = walk + gd_norm * direction / jnp.linalg.norm(direction)
      walk_delta = new_walk - walk
      walk_norm = jnp.linalg.norm(walk_delta)
      cosine = jnp.vdot(gd_delta, walk_delta) / jnp.maximum(gd_norm * walk_norm, jnp.finfo(walk.dtype).tiny)
      return (new_state, new_walk, key), (metrics['td_loss'], gd_norm, walk_norm, cosine)

    return jax.lax.scan(step, (state, walk, key), indices)

  return chunk


def run_study(config: StudyConfig, diagnostics: DiagnosticsConfig, transitions: Transition, probe_inputs: np.ndarray,
              num_actions: int, on_measure: Callable[[Measurement], None] = lambda measurement: None,
              log: Callable[[str], None] = print) -> StudyResult:
  """Trains both processes for `config.steps` and measures them at `config.measured_steps`."""
  agent_config = config.agent_config()
  agent = make_agent(agent_config, num_actions)
  dummy = transitions.observation[:1]
  keys = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  state = init_state(agent.network, agent.optimizer, keys[0], dummy)
  walk_key, perturbation_key, lanczos_key = keys[1:]
  start, unravel = ravel_pytree(state.params)
  walk, walk_target = start, start  # The walk's "target" is copied on the same schedule, for its TD loss.
  chunk = _make_chunk(agent, agent_config.discount)
  target_update = jax.jit(make_target_update(agent.network, agent.target_update_hooks, dummy))
  transition_loss = make_transition_loss(agent.network, agent.encoding, agent_config.discount)
  diagnose = make_diagnostics(agent.network, diagnostics, perturbation_key, transition_loss)
  td_loss = jax.jit(lambda params, target, batch: double_q_loss(
      agent.network, agent.encoding, agent_config.discount, params, target, batch, None)[0])
  first = lambda n: jax.tree_util.tree_map(lambda x: x[:n], transitions)
  loss_batch = first(config.batch_size)  # The jsonl's td_loss: one fixed batch, each process's own target.
  td_transitions = first(diagnostics.td_covariance_samples) if diagnostics.td_covariance_samples else None
  pool = jax.tree_util.tree_map(jnp.asarray, transitions)
  batch_rng = np.random.default_rng([config.seed, 1])
  log(f'{len(transitions.action)} transitions, {len(probe_inputs)} distinct probe inputs, '
      f'{start.size} parameters; measuring at steps {config.measured_steps}.')

  records: List[Dict[str, object]] = []
  path: List[np.ndarray] = []  # Per-chunk outputs: td losses, GD norms, walk norms, cosines.

  def measure(step: int) -> None:
    measured = {}
    for row, process, (params, target) in zip((1, 2), PROCESSES, ((state.params, state.target_params),
                                                                  (unravel(walk), unravel(walk_target)))):
      result = diagnose(params, probe_inputs, lanczos_key, target, td_transitions)
      record = {'process': process, 'step': step, **result.as_record(),
                'distance_from_init': float(jnp.linalg.norm(ravel_pytree(params)[0] - start)),
                'path_length': float(sum(np.sum(outputs[row], dtype=np.float64) for outputs in path)),
                'td_loss': float(td_loss(params, target, loss_batch))}
      records.append(record)
      measured[process] = record
      on_measure((record, result.covariance, result.td_covariance))
    gd, rw = (measured[p] for p in PROCESSES)
    log(f'[measure] step {step}: top eigenvalue GD {gd["top_eigenvalue"]:.4g} / RW {rw["top_eigenvalue"]:.4g}; '
        f'C_k mean off-diagonal GD {gd["covariance_mean_offdiag"]:.3f} / RW {rw["covariance_mean_offdiag"]:.3f}, '
        f'negative GD {gd["covariance_frac_negative"]:.3f} / RW {rw["covariance_frac_negative"]:.3f}; '
        f'distance from init {gd["distance_from_init"]:.4g} / {rw["distance_from_init"]:.4g}')

  boundaries = sorted(set(config.measured_steps) | set(range(0, config.steps, config.progress_every))
                      | set(range(0, config.steps, config.target_update_period)) | {config.steps})
  measure(0)
  since, since_time = 0, time.time()
  for begin, end in zip(boundaries[:-1], boundaries[1:]):
    indices = batch_rng.integers(len(transitions.action), size=(end - begin, config.batch_size))
    (state, walk, walk_key), outputs = chunk(state, walk, walk_key, pool, jnp.asarray(indices))
    path.append(np.stack(jax.device_get(outputs)))
    if end % config.target_update_period == 0:
      state, walk_target = target_update(state), walk
    if end % config.progress_every == 0 or end == config.steps:
      recent = np.concatenate([outputs[0] for outputs in path])[since:]
      elapsed = time.time() - since_time
      log(f'step {end}/{config.steps}: td_loss {np.mean(recent):.5f} (mean of the last {len(recent)} steps), '
          f'{len(recent) / max(elapsed, 1e-9):.1f} steps/s')
      since, since_time = end, time.time()
    if end in config.measured_steps:
      measure_start = time.time()
      measure(end)
      since_time += time.time() - measure_start
  td_losses, gd_norms, walk_norms, cosines = np.concatenate(path, axis=1)
  return StudyResult(records, gd_norms, walk_norms, cosines, td_losses)


def covariance_path(run_dir: str, kind: str, process: str, step: int) -> str:
  return os.path.join(run_dir, kind, f'{process}_{step:09d}.npy')


def run(run_dir: str, config: StudyConfig, diagnostics: DiagnosticsConfig, transitions: Transition,
        probe_inputs: np.ndarray, num_actions: int, log: Callable[[str], None] = print) -> StudyResult:
  """The study into an ordinary directory: brownian.jsonl, config.json, the C_k matrices and the PNG."""
  validate(config, diagnostics)
  check_run_dir(run_dir)
  logger = JsonlLogger(os.path.join(run_dir, f'{RECORDS}.jsonl'), step_key='step')
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump({'env': ENV, 'study': dataclasses.asdict(config), 'diagnostics': dataclasses.asdict(diagnostics)}, f,
              indent=2)
  matrices: Dict[Tuple[str, str, int], np.ndarray] = {}

  def save(measurement: Measurement) -> None:
    record, covariance, td_covariance = measurement
    logger(record)
    for kind, matrix in (('covariance', covariance), ('td_covariance', td_covariance)):
      if matrix is not None:
        os.makedirs(os.path.join(run_dir, kind), exist_ok=True)
        np.save(covariance_path(run_dir, kind, record['process'], record['step']), matrix)
        matrices[kind, record['process'], record['step']] = matrix

  result = run_study(config, diagnostics, transitions, probe_inputs, num_actions, save, log)
  logger.close()
  os.makedirs(os.path.join(run_dir, 'plots'), exist_ok=True)
  png = os.path.join(run_dir, 'plots', f'{RECORDS}.png')
  plot(result.records, matrices, png)
  log(f'Wrote {logger.path}, {os.path.join(run_dir, "covariance")}/ and {png}')
  return result


def plot(records: List[Dict[str, object]], matrices: Dict[Tuple[str, str, int], np.ndarray], path: str) -> None:
  """Figure 2: per measured step, both Hessian densities (top) and the C_k heatmaps side by side (below)."""
  steps = sorted({r['step'] for r in records})
  kinds = [kind for kind in ('covariance', 'td_covariance') if any(key[0] == kind for key in matrices)]
  columns = 2 * len(steps)
  fig = plt.figure(figsize=(2.1 * columns + 0.8, 2.6 * (1 + len(kinds))))
  grid = fig.add_gridspec(1 + len(kinds), columns + 1, width_ratios=[1] * columns + [0.08])
  colours = {'gradient_descent': 'tab:red', 'random_walk': 'tab:blue'}
  for i, step in enumerate(steps):
    ax = fig.add_subplot(grid[0, 2 * i:2 * i + 2])
    peak = 0.0
    for record in (r for r in records if r['step'] == step):
      density = np.asarray(record['density'])
      peak = max(peak, float(density.max()))
      ax.semilogy(record['density_grid'], density, color=colours[record['process']],
                  label=f'{record["process"].replace("_", " ")} (top {record["top_eigenvalue"]:.3g})')
    ax.set_ylim(peak * 1e-6, peak * 3)
    ax.set_title(f'Hessian density, step {step}', fontsize=9)
    ax.set_xlabel('eigenvalue', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc='upper right')
    if i == 0:
      ax.set_ylabel('density (log)', fontsize=8)
    for row, kind in enumerate(kinds, start=1):
      for j, process in enumerate(PROCESSES):
        ax = fig.add_subplot(grid[row, 2 * i + j])
        record = next(r for r in records if r['step'] == step and r['process'] == process)
        image = ax.imshow(matrices[kind, process, step], cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
        label = 'C_k' if kind == 'covariance' else 'TD C_k'
        ax.set_title(f'{label} {process.replace("_", " ")}, step {step}\nmean off-diag '
                     f'{record[f"{kind}_mean_offdiag"]:.2f}, negative {record[f"{kind}_frac_negative"]:.2f}',
                     fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
  for row in range(1, 1 + len(kinds)):
    fig.colorbar(image, cax=fig.add_subplot(grid[row, columns]))
  fig.suptitle('Gradient descent vs a random walk of equal step norms (section 3.2, figure 2)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --- the study of launch.study ---

BROWNIAN_SCALES = {
    'smoke': dict(steps=200, measure_every=100, num_transitions=2000, lanczos_steps=10, hessian_batch_size=256,
                  covariance_samples=64, td_covariance_samples=64),
    'cpu': dict(steps=2000, measure_every=1000),
    # Figure 2 measures "after 5 target updates" of 5,000 steps (appendix A.1): 25,000 steps.
    'paper': dict(steps=25_000, measure_every=5000),
}


def brownian_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  data = data_args(options)
  return [Cell('brownian', {}, {**BROWNIAN_SCALES[scale], **data}, command='launch.studies.brownian',
               resumable=False)], {}


def brownian_measure(cell: Cell, run_dir: str) -> Row:
  """Each process's top eigenvalue and distance from its start at the last measured step."""
  records = read_jsonl(os.path.join(run_dir, f'{RECORDS}.jsonl'))
  last = max(r['step'] for r in records)
  measures: Row = {'step': last}
  for r in records:
    if r['step'] == last:
      measures[f'{r["process"]}_top_eigenvalue'] = r['top_eigenvalue']
      measures[f'{r["process"]}_distance_from_init'] = r['distance_from_init']
  return measures


def brownian_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  keys = [f'{p}_{k}' for p in PROCESSES for k in ('top_eigenvalue', 'distance_from_init')]
  written = aggregate.write_table(aggregate.summarize(rows, ('cell',), keys), layout.table('summary'))
  curves = {process: [] for process in PROCESSES}
  for row in rows:
    records = read_jsonl(os.path.join(row['run_dir'], f'{RECORDS}.jsonl'))
    for process in curves:
      curves[process].append([r for r in records if r['process'] == process])
  written.append(study_plots.save(study_plots.mean_curves(curves, 'step', ('top_eigenvalue', 'distance_from_init'),
                                                          'Gradient descent against a random walk (figure 2)'),
                                  layout.figure('brownian')))
  return written


STUDY = Study('brownian', 'figure 2', brownian_cells, {'smoke': 1, 'cpu': 2, 'paper': 3},
                              lambda: {**flag_types(StudyConfig),
                                       **flag_types(DiagnosticsConfig, only=DIAGNOSTIC_FLAGS)},
                              brownian_measure, brownian_aggregate)


def _command_line():
  """The command's flags (defined here, not at import: the study registry imports this module) and its main."""
  run_dir = flags.DEFINE_string('run_dir', None, 'Directory the results go to; one holding brownian.jsonl is refused.')
  study = config_flags.define(StudyConfig)
  diagnostic_flags = config_flags.define(DiagnosticsConfig, only=DIAGNOSTIC_FLAGS)

  def main(argv):
    config_flags.check_command_line(argv, run_dir)
    config = config_flags.build(StudyConfig, study)
    diagnostics = config_flags.build(DiagnosticsConfig, diagnostic_flags)
    try:
      validate(config, diagnostics)
      check_run_dir(run_dir.value)
      env = environments.make(ENV, seed=config.seed, data_dir=config.data_dir)
    except ValueError as e:
      raise app.UsageError(str(e))
    print(f'{env.data_source}; collecting {config.num_transitions} transitions of a uniformly random policy.',
          flush=True)
    transitions = collect_transitions(env, config.num_transitions, config.seed)
    try:
      probe_inputs = select_probe_inputs(transitions, diagnostics)
    except ValueError as e:
      raise app.UsageError(str(e))
    run(run_dir.value, config, diagnostics, transitions, probe_inputs, env.action_spec().num_values,
        log=lambda line: print(line, flush=True))

  return main


if __name__ == '__main__':
  app.run(_command_line())
