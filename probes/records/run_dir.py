"""A run directory: its layout (every file a run writes, named once) and its configuration (config.json).

Every module that reads or writes a run directory asks `RunLayout` for the
path, so a new file is one method here (and one row in WORKSPACE.md).
`ExperimentConfig` is what config.json holds; its fields, declared with
`agents.config.option`, are also the command line's flags.
"""

import contextlib
import dataclasses
import json
import os
import re
import typing
from typing import Any, Dict, Iterator, List, Optional

from absl import logging

import environments
from agents import config_flags
from agents import storage
from agents.config import AgentConfig, ReplayConfig, option
from probes.measures.diagnostics import DiagnosticsConfig
from probes.records import loggers
from probes.evaluation import EvaluationConfig
from probes.records.loggers import Record
from probes.measures.plasticity import ProbeConfig

_WRITER = re.compile(r'^[A-Za-z0-9_-]+$')

# The program's actors have ids below it; actors attached to a live run (launch.attach_actors) from it up.
MAX_ACTORS = 1000
# What may differ when a run directory is resumed: how it is launched (`launch`), where it is (`run_dir`), how long it
# trains (a finished run is extended by a larger --max_learner_steps) and its evaluation episodes (a measurement that
# changes nothing learnt). Everything else in config.json is compared.
RESUMABLE_FIELDS = ('run_dir', 'launch', 'max_learner_steps', 'evaluation')
MIGRATE_COMMAND = 'python -m launch.migrate'  # Rewrites a run directory of an earlier version (launch/migrate.py).


class EvaluatorState:
  """The `state` of `evaluator_status.json`, written by the evaluator, read by the progress line and the cluster
  simulator's scenarios."""
  STARTING = 'starting'
  DRAWING = 'drawing the probe set from the replay'
  PROBING = 'probing'
  DIAGNOSING = 'diagnostics (Hessian density, gradient covariance, statistics)'
  IDLE = 'idle'
  FINISHED = 'finished'


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The files of a run directory (or of an evaluator's directory inside one), by what they hold."""
  root: str

  # Record streams: `records/<name>/<writer>.jsonl`, one file (or numbered segments) per writing process,
  # mirrored to `tensorboard/<name>/`. A new stream is one name here.
  LEARNER = 'learner'
  ACTORS = 'actors'
  PROBES = 'probes'
  DIAGNOSTICS = 'diagnostics'
  RESTARTS = 'restarts'  # Written by the launcher: one record per relaunch after a node failure.
  EVALUATION = 'evaluation'  # Evaluation episodes (probes/evaluation.py).
  PROBLEMS = 'problems'  # Damaged files found and writes that failed (`report_problem`): the launcher prints them.
  STREAMS = (LEARNER, ACTORS, PROBES, DIAGNOSTICS, RESTARTS, EVALUATION, PROBLEMS)

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def stream(self, name: str) -> str:
    """The directory of a record stream's files, one per writer."""
    return self.path('records', name)

  def records_file(self, name: str, writer: str) -> str:
    """One writer's file of a stream (on a bucket, the stem of its numbered segments)."""
    if not _WRITER.match(writer):
      raise ValueError(f'A record writer is named with letters, digits, _ and -, not {writer!r}.')
    return os.path.join(self.stream(name), f'{writer}.jsonl')

  def single_file_records(self, name: str) -> str:
    """`<name>.jsonl`: where every writer appended before streams had a file per writer (an earlier version's
    layout, which `launch.migrate` rewrites; nothing reads it)."""
    return self.path(f'{name}.jsonl')

  def records(self, name: str, writer: Optional[str] = None) -> List[Record]:
    """Every record of a stream, for every reader: each writer's file (only `writer`'s, if given), interleaved by
    `time` with each writer's own order kept (`loggers.merge`)."""
    files = [self.records_file(name, writer)] if writer else loggers.writers(self.stream(name))
    return loggers.merge([loggers.read_jsonl(file) for file in files])

  def tensorboard(self, name: Optional[str] = None) -> str:
    return self.path('tensorboard', *([name] if name else []))

  def logger(self, name: str, writer: str, tensorboard: bool = True, **options: Any) -> loggers.JsonlLogger:
    """The writer `writer` (a node: `learner`, `actor_3`, `evaluator`, ...) of one record stream: a file of its
    own, which one process at a time writes."""
    return loggers.JsonlLogger(self.records_file(name, writer), self.tensorboard(name) if tensorboard else None,
                               **options)

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
  def probe_snapshots(self) -> str:
    """The parameter snapshots of probe points not yet probed (`agents/snapshots.py`): written by the learner (an
    attached evaluator: by itself, in its own directory), removed by the evaluator once probed."""
    return self.path('probe_snapshots')

  @property
  def evaluator_status(self) -> str:
    """What the evaluator does now: its `state` one of `EvaluatorState`'s, with `learner_step` and the probe's
    progress."""
    return self.path('evaluator_status.json')

  @property
  def lock(self) -> str:
    """The launcher's claim on the run directory (`launch/program/run_lock.py`): one launch of the run at a time."""
    return self.path('launcher.lock')

  @property
  def addresses(self) -> str:
    """Where a live run's learner and replay answer (written by actor 0)."""
    return self.path('addresses.json')

  def attached_actor(self, actor_id: int) -> str:
    """An attached actor's claim on its id (`launch.attach_actors`): created once, never reused."""
    return self.path('attached_actors', f'{actor_id}.json')

  @property
  def logs(self) -> str:
    """Each launch's node logs, `logs/<attempt>/<group>/<index>`: a relaunch keeps those of the launch before."""
    return self.path('logs')

  def attempt_logs(self, attempt: int) -> str:
    return os.path.join(self.logs, str(attempt))

  def local_logs(self, attempt: int) -> str:
    """Where this host's Launchpad writes a launch's node logs (local files only): `attempt_logs`, or for a run
    directory on a bucket the same path under this user's private temporary directory (`storage.private_directory`:
    the node logs of a shared machine's /tmp are nobody else's to read or plant)."""
    logs = self.attempt_logs(attempt)
    if storage.is_local(logs):
      return logs
    return os.path.join(storage.private_directory('plasticity-rl-logs'), logs.replace('://', '/').lstrip('/'))

  def attempts(self) -> int:
    """How many launches have left logs here."""
    logs = storage.path(self.logs)
    if not logs.is_dir():
      return 0
    return max((int(child.name) for child in logs.iterdir() if child.name.isdigit()), default=0)

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


def report_problem(layout: RunLayout, writer: str, file: str, problem: str, action: str, kind: str = 'damaged') -> None:
  """A problem with a run-directory file (`kind`: `damaged`, or `full`: a write that found no space) and what was
  done about it: a warning in this process's log and a record in the `problems` stream, which the launcher prints.
  Never raises: the disk may be full."""
  logging.warning('%s %s', problem, action)
  try:
    logger = layout.logger(RunLayout.PROBLEMS, writer, tensorboard=False)
    logger({'file': file, 'kind': kind, 'problem': problem, 'action': action})
    logger.close()
  except Exception as e:  # pylint: disable=broad-except  Nothing to do about it: the warning above is all.
    logging.warning('The problem could not be recorded in %s (%r).', layout.stream(RunLayout.PROBLEMS), e)


@contextlib.contextmanager
def reporting_full_disk(layout: RunLayout, writer: str) -> Iterator[None]:
  """Lets errors through, first recording a write that found the disk full as a problem (a small record, which
  usually fits where the failed write did not): the launcher then names it and does not relaunch."""
  try:
    yield
  except OSError as e:
    if storage.is_full(e):
      report_problem(layout, writer, e.filename or layout.root, f'{writer} could not write: {e}.', f'{writer} stops.',
                     kind='full')
    raise


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  """How a run is launched: where its nodes run, how many, and where they find their data. None of it changes what
  is learnt or measured, so it may change when a run directory is resumed (config.json's `launch`, which resumes do
  not compare)."""
  data_dir: Optional[str] = option(None, 'Directory holding the datasets (else $PLASTICITY_DATA_DIR, the user cache, '
                                   'a download, or the embedded MNIST sample).')
  num_actors: int = option(2, 'Number of actor nodes (ids 0 to num_actors - 1; attached actors take ids from '
                           f'{MAX_ACTORS} up).', lower_bound=1, upper_bound=MAX_ACTORS)
  # agents/actor.py says why a loop over environments rather than ale-py's vector environment.
  envs_per_actor: int = option(1, 'Environments each actor steps in lock-step, with one batched policy call per '
                               'step (more environments amortise the network call over more steps).', lower_bound=1)
  launch_type: str = option('local_mp', 'local_mp: one process per node; local_mt: threads in one process; '
                            'vertex_ai: a Vertex AI custom job (launch/program/cluster.py: the cluster extra, machine '
                            'flags, --dry_run).', choices=lambda: ['local_mp', 'local_mt', 'vertex_ai'])
  bind_host: str = option('127.0.0.1', 'Where the run\'s Reverb and Courier servers listen: 127.0.0.1, this machine '
                         'only; 0.0.0.0 or ::, every interface; or one interface\'s address, for multi-host runs. '
                         'They have no authentication: keep such runs on a private network.')
  publish_host: Optional[str] = option(None, 'Host name or address that addresses.json gives other hosts to reach '
                                       'the run (default: --bind_host, or this machine\'s name with 0.0.0.0).')
  # Where the learner's and the evaluator's JAX compute under local_mp (launch/program/placement.py translates them).
  learner_device: str = option('auto', 'Device of the learner under local_mp: auto (the GPU when one is visible), '
                               'cpu, or gpu (an error when none is).', choices=lambda: ['auto', 'cpu', 'gpu'])
  evaluator_device: str = option('auto', 'Device of the evaluator under local_mp: auto (the GPU when one is '
                                 'visible), cpu, or gpu (an error when none is); on one GPU it shares the '
                                 'learner\'s, both without memory preallocation.',
                                 choices=lambda: ['auto', 'cpu', 'gpu'])
  # agents/learner.py: calls end at every step where something outside the update is due, so K changes no event.
  updates_per_call: Optional[int] = option(None, 'Learner updates fused in one compiled call over as many batches, one '
                                           'host sync per call (default: 16 on CPU, 1 there for convolutional '
                                           'networks; 64 on an accelerator).',
                                           lower_bound=1)
  max_restarts: int = option(3, 'Relaunches of the program from its checkpoints after a node fails (0: none).',
                             lower_bound=0)


LAUNCH_FIELDS = frozenset(field.name for field in dataclasses.fields(LaunchConfig))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A training run: what config.json holds and what launch.train's flags set."""
  run_dir: Optional[str] = option(None, 'Run directory; relaunching with the same flags resumes it.')
  env: str = option('mdp:mnist:easy', 'Environment spec, e.g. mdp:mnist:easy, mdp:cifar10:hard, atari:pong.')
  # Options of the environment families (environments/__init__.py says which family takes which; data_dir is
  # in `launch`).
  sticky_action_probability: float = option(
      0.0, 'Probability that ALE repeats the previous action instead (0.25 is Machado et al. 2018\'s setting; 0 is '
      'DQN Zoo\'s).', lower_bound=0.0, upper_bound=1.0)
  max_learner_steps: int = option(100_000, 'Learner updates of the run.', lower_bound=1)
  seed: int = option(0, 'Random seed.')
  agent: AgentConfig = AgentConfig()
  replay: ReplayConfig = ReplayConfig()
  probe: ProbeConfig = dataclasses.field(default=ProbeConfig(), metadata={config_flags.PREFIX: 'probe_'})
  probe_every: int = option(5000, 'Learner steps between plasticity probes (0: no evaluator).', lower_bound=0)
  diagnostics_enabled: bool = option(True, 'Run the curvature and representation diagnostics at every probe point '
                                     '(--nodiagnostics: the probe only).', flag='diagnostics')
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()
  evaluation: EvaluationConfig = dataclasses.field(default=EvaluationConfig(), metadata={config_flags.PREFIX: 'eval_'})
  checkpoint_every: int = option(5000, 'Learner steps between checkpoints.', lower_bound=1)
  log_every: int = option(100, 'Learner steps between logged records and parameter snapshots.', lower_bound=1)
  actor_params_update_period: int = option(100, 'Environment steps between an actor\'s parameter pulls.',
                                           lower_bound=1)
  launch: LaunchConfig = LaunchConfig()

  @property
  def layout(self) -> RunLayout:
    return RunLayout(self.run_dir)

  def env_options(self) -> Dict[str, Any]:
    """Keyword options of `environments.make` for this run's env: the ones its family takes, when set."""
    family = environments.family(self.env)
    return {name: value for name in family.options for holder in (self, self.launch)
            if (value := getattr(holder, name, None)) is not None}

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def write_or_check_config(config: ExperimentConfig) -> bool:
  """Writes config.json in a new run dir; in an existing one, checks it matches.

  Returns True when the run directory already held a run (a resume). A
  mismatch, a run directory that is a file or is not writable, or an
  unreadable config.json raises ValueError naming it, before anything in the
  directory is touched. config.json is replaced atomically.
  """
  resumed = prepare_run_dir(config)
  write_config(config)
  return resumed


def write_config(config: ExperimentConfig) -> None:
  """config.json, replaced atomically."""
  text = json.dumps(json.loads(json.dumps(config.to_dict())), indent=2)
  storage.write_atomically(config.layout.config, text.encode())


def prepare_run_dir(config: ExperimentConfig) -> bool:
  """`write_or_check_config` but the write: creates the run directory, checks it and its config.json, touching
  nothing in it; whether it already held a run."""
  run_dir = config.run_dir
  root = storage.path(run_dir)
  if root.exists() and not root.is_dir():
    raise ValueError(f'--run_dir={run_dir} is a file, not a directory.')
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--run_dir={run_dir} cannot be created ({e.strerror or e}).') from e
  if storage.is_local(run_dir) and not os.access(run_dir, os.W_OK | os.X_OK):
    raise ValueError(f'--run_dir={run_dir} is not writable.')
  return check_config(config)


def check_config(config: ExperimentConfig) -> bool:
  """Whether config.run_dir already holds a run; a ValueError naming each difference if its config.json does not
  match. Reads only."""
  run_dir = config.run_dir
  if not storage.path(RunLayout(run_dir).config).exists():
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
  if not storage.path(path).exists():
    raise ValueError(f'{run_dir} is not a run directory: {path} does not exist.')
  try:
    raw = json.loads(storage.path(path).read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not a readable run configuration ({e!r}).') from e
  if isinstance(raw, dict) and set(raw) & LAUNCH_FIELDS:
    raise ValueError(f'{path} is an earlier version\'s configuration (its launch fields are not under "launch"): '
                     f'`{MIGRATE_COMMAND} {run_dir}` rewrites the run directory in this version\'s layout.')
  try:
    return _from_dict(ExperimentConfig, {**raw, 'run_dir': run_dir})
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path} is not a readable run configuration ({e!r}).') from e


def earlier_layout(layout: RunLayout) -> List[str]:
  """The files of `layout` in an earlier version's layout, which this version does not read (`launch.migrate`
  rewrites them): single-file record streams and a configuration with its launch fields at the top."""
  found = [layout.single_file_records(name) for name in RunLayout.STREAMS
           if storage.path(layout.single_file_records(name)).exists()]
  try:
    load_config(layout.root)
  except ValueError as e:
    if MIGRATE_COMMAND in str(e):
      found.append(layout.config)
  return found
