"""A run directory: its layout (every file a run writes, named once) and its configuration (config.json).

Every module that reads or writes a run directory asks `RunLayout` for the
path, so a new file is one method here (and one row in WORKSPACE.md).
`ExperimentConfig` is what config.json holds; its fields, declared with
`agents.config.option`, are also the command line's flags.
"""

import dataclasses
import json
import os
import typing
from typing import Any, Dict, Optional

import environments
from agents import config_flags
from agents.config import AgentConfig, ReplayConfig, option
from probes.diagnostics import DiagnosticsConfig
from probes.loggers import JsonlLogger
from probes.plasticity import ProbeConfig

# Fields that may differ when a run directory is resumed (they do not change what is learnt).
RESUMABLE_FIELDS = ('max_learner_steps', 'num_actors', 'launch_type', 'run_dir', 'data_dir', 'max_restarts')


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The files of a run directory (or of an evaluator's directory inside one), by what they hold."""
  root: str

  # Record streams: `<name>.jsonl`, mirrored to `tensorboard/<name>/`.
  LEARNER = 'learner'
  ACTORS = 'actors'
  PROBES = 'probes'
  DIAGNOSTICS = 'diagnostics'
  RESTARTS = 'restarts'  # Written by the launcher: one record per relaunch after a node failure.

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def records(self, name: str) -> str:
    return self.path(f'{name}.jsonl')

  def tensorboard(self, name: Optional[str] = None) -> str:
    return self.path('tensorboard', *([name] if name else []))

  def logger(self, name: str, tensorboard: bool = True, **options: Any) -> JsonlLogger:
    """The writer of one record stream."""
    return JsonlLogger(self.records(name), self.tensorboard(name) if tensorboard else None, **options)

  @property
  def config(self) -> str:
    return self.path('config.json')

  @property
  def checkpoints(self) -> str:
    return self.path('checkpoints')

  @property
  def replay_checkpoint(self) -> str:
    """Reverb's checkpoint of the replay (one, its latest): Reverb deletes everything else in this directory."""
    return self.path('replay_checkpoint')

  @property
  def replay_status(self) -> str:
    """What the replay restored at its start and whether it is writing a checkpoint, for the launcher."""
    return self.path('replay_status.json')

  @property
  def probe_set(self) -> str:
    return self.path('probe_set.npz')

  @property
  def evaluator_status(self) -> str:
    return self.path('evaluator_status.json')

  @property
  def addresses(self) -> str:
    """Where a live run's learner and replay answer (written by actor 0)."""
    return self.path('addresses.json')

  @property
  def logs(self) -> str:
    """Each launch's node logs, `logs/<attempt>/<group>/<index>`: a relaunch keeps those of the launch before."""
    return self.path('logs')

  def attempt_logs(self, attempt: int) -> str:
    return os.path.join(self.logs, str(attempt))

  def attempts(self) -> int:
    """How many launches have left logs here."""
    if not os.path.isdir(self.logs):
      return 0
    return max((int(name) for name in os.listdir(self.logs) if name.isdigit()), default=0)

  def covariance(self, kind: str, learner_step: int) -> str:
    """A saved C_k: kind `covariance` (probe loss) or `td_covariance` (TD loss)."""
    return self.path('diagnostics', f'{kind}_{int(learner_step):09d}.npy')

  @property
  def plots(self) -> str:
    return self.path('plots')

  def plot(self, name: str) -> str:
    return os.path.join(self.plots, f'{name}.png')

  @property
  def comparison(self) -> str:
    """Where `probes.report` puts the cross-run plots by default."""
    return os.path.join(self.plots, 'comparison')

  def evaluator(self, name: str) -> 'RunLayout':
    """An attached evaluator's own directory."""
    return RunLayout(self.path('evaluators', name))

  def offline(self, checkpoint: str) -> 'RunLayout':
    """`probes.run`'s directory for one checkpoint (a path), named after the checkpoint's file."""
    return RunLayout(self.path('offline', os.path.splitext(os.path.basename(checkpoint))[0]))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A training run: what config.json holds and what launch.train's flags set."""
  run_dir: Optional[str] = option(None, 'Run directory; relaunching with the same flags resumes it.')
  env: str = option('mdp:mnist:easy', 'Environment spec, e.g. mdp:mnist:easy, mdp:cifar10:hard, atari:pong.')
  # Options of the environment families (environments/__init__.py says which family takes which).
  data_dir: Optional[str] = option(None, 'Directory holding the datasets (else $PLASTICITY_DATA_DIR, the user cache, '
                                   'a download, or the embedded MNIST sample).')
  sticky_action_probability: float = option(
      0.0, 'Probability that ALE repeats the previous action instead (0.25 is Machado et al. 2018\'s setting; 0 is '
      'DQN Zoo\'s).', lower_bound=0.0, upper_bound=1.0)
  num_actors: int = option(2, 'Number of actor nodes.', lower_bound=1)
  launch_type: str = option('local_mp', 'local_mp: one process per node; local_mt: threads in one process; '
                            'vertex_ai: a Vertex AI custom job (launch/cluster.py: the cluster extra, machine flags, '
                            '--dry_run).', choices=lambda: ['local_mp', 'local_mt', 'vertex_ai'])
  max_learner_steps: int = option(100_000, 'Learner updates of the run.', lower_bound=1)
  seed: int = option(0, 'Random seed.')
  agent: AgentConfig = AgentConfig()
  replay: ReplayConfig = ReplayConfig()
  probe: ProbeConfig = dataclasses.field(default=ProbeConfig(), metadata={config_flags.PREFIX: 'probe_'})
  probe_every: int = option(5000, 'Learner steps between plasticity probes (0: no evaluator).', lower_bound=0)
  diagnostics_enabled: bool = option(True, 'Run the curvature and representation diagnostics at every probe point '
                                     '(--nodiagnostics: the probe only).', flag='diagnostics')
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()
  checkpoint_every: int = option(5000, 'Learner steps between checkpoints.', lower_bound=1)
  log_every: int = option(100, 'Learner steps between logged records and parameter snapshots.', lower_bound=1)
  actor_params_update_period: int = option(100, 'Environment steps between an actor\'s parameter pulls.',
                                           lower_bound=1)
  max_restarts: int = option(3, 'Relaunches of the program from its checkpoints after a node fails (0: none).',
                             lower_bound=0)

  @property
  def layout(self) -> RunLayout:
    return RunLayout(self.run_dir)

  def env_options(self) -> Dict[str, Any]:
    """Keyword options of `environments.make` for this run's env: the ones its family takes, when set."""
    family = environments.family(self.env)
    return {name: getattr(self, name) for name in family.options if getattr(self, name) is not None}

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def write_or_check_config(config: ExperimentConfig) -> bool:
  """Writes config.json in a new run dir; in an existing one, checks it matches.

  Returns True when the run directory already held a run (a resume). A
  mismatch, a run directory that is a file or is not writable, or an
  unreadable config.json raises ValueError naming it, before anything in the
  directory is touched. config.json is replaced atomically.
  """
  run_dir = config.run_dir
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ValueError(f'--run_dir={run_dir} is a file, not a directory.')
  try:
    os.makedirs(run_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--run_dir={run_dir} cannot be created ({e.strerror}).') from e
  if not os.access(run_dir, os.W_OK | os.X_OK):
    raise ValueError(f'--run_dir={run_dir} is not writable.')
  resumed = check_config(config)
  path = config.layout.config
  with open(path + '.tmp', 'w') as f:
    json.dump(json.loads(json.dumps(config.to_dict())), f, indent=2)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + '.tmp', path)
  return resumed


def check_config(config: ExperimentConfig) -> bool:
  """Whether config.run_dir already holds a run; a ValueError naming each difference if its config.json does not
  match. Reads only."""
  run_dir = config.run_dir
  if not os.path.exists(RunLayout(run_dir).config):
    return False
  # Read back through the dataclasses: a field added since the run began takes its default.
  saved = json.loads(json.dumps(load_config(run_dir).to_dict()))
  differences = _differences(saved, json.loads(json.dumps(config.to_dict())))
  if differences:
    raise ValueError(
        f'--run_dir={run_dir} holds a run with a different configuration; resuming it '
        f'needs the same flags. Differences (flag: saved -> given): {"; ".join(differences)}. '
        f'Use another --run_dir for a new run.')
  return True


def _differences(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = '') -> list:
  out = []
  for key in sorted(set(saved) | set(current)):
    if not prefix and key in RESUMABLE_FIELDS:
      continue
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_differences(a, b, prefix=f'{key}.'))
    elif a != b:
      out.append(f'{key}: {a!r} -> {b!r}')
  return out


def _from_dict(config_class: type, raw: Dict[str, Any]) -> Any:
  """A configuration from its JSON form; fields it lacks (added since it was written) take their defaults."""
  if not isinstance(raw, dict):
    raise ValueError(f'{config_class.__name__} expects an object, not {raw!r}')
  hints = typing.get_type_hints(config_class)
  known = {field.name for field in dataclasses.fields(config_class)}
  unknown = set(raw) - known
  if unknown:
    raise ValueError(f'unknown {config_class.__name__} field(s) {", ".join(sorted(unknown))}')
  values = {}
  for name, value in raw.items():
    if dataclasses.is_dataclass(hints[name]):
      value = _from_dict(hints[name], value)
    elif isinstance(value, list):
      value = tuple(value)
    values[name] = value
  return config_class(**values)


def load_config(run_dir: str) -> ExperimentConfig:
  """Reads a run directory's config.json back into an ExperimentConfig; a ValueError naming the file if it
  is not one."""
  path = RunLayout(run_dir).config
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} is not a run directory: {path} does not exist.')
  try:
    with open(path) as f:
      raw = json.load(f)
    return _from_dict(ExperimentConfig, {**raw, 'run_dir': run_dir})
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path} is not a readable run configuration ({e!r}).') from e
