r"""Launches a training run: replay, actors, learner and evaluator.

  python -m launch.train --run_dir=runs/mnist_easy --env=mdp:mnist:easy

With --launch_type=vertex_ai it submits the program as a Vertex AI custom job
and exits (launch/cluster.py; --dry_run prints the worker pools instead).
Relaunching with the same --run_dir and flags resumes from the last
checkpoint (raise --max_learner_steps to extend a finished run). The run
directory's files are described in WORKSPACE.md.

Exit codes (every command of this project uses them): 0 finished; 1 bad input
or usage; 2 a node failed (or the run directory's disk is full); 3 the learner
diverged; 130 interrupted (SIGINT or SIGTERM).

Checkpoints written before they were msgpack files are pickles, which run
any code they name when read: they are not read unless
--trust_pickled_checkpoints says whoever could write the run directory is
trusted, and then converted (with the pickled probe snapshots) before the
launch.
"""

import enum
import json
import math
import os
import signal
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

from absl import app
from absl import flags
import jax
import numpy as np

import environments
from environments import datasets
from agents import checkpointing, snapshots, storage
from agents.builder import make_agent
from agents.learner import initial_state
from launch import cluster as cluster_lib
from launch import flags as run_flags
from launch import network
from launch import placement
from launch import program as program_lib
from launch import supervisor
from launch import watchdog
from probes.run_dir import ExperimentConfig, check_config, write_or_check_config
from probes.loggers import Record
from probes import plots
from probes.run_dir import RunLayout


TERMINATION_NOTICE_S = 40  # A cap: nodes stop in seconds, the replay after its final checkpoint.

TRUST_PICKLED = flags.DEFINE_bool(
    'trust_pickled_checkpoints', False, 'Read the run directory\'s pickled checkpoints and probe snapshots (written '
    'before they were msgpack files) and convert them. A pickle runs any code it names: only if everyone who could '
    'write the run directory is trusted.')


class ExitCode(enum.IntEnum):
  FINISHED = 0
  USAGE = 1  # What absl's app.UsageError exits with.
  NODE_FAILED = 2
  DIVERGED = 3
  INTERRUPTED = 130


def validate(config: ExperimentConfig, trust_pickled: bool = False):
  """Builds the environment and agent once, and reads the checkpoints, so bad input fails before any launch, and
  warns of the files it cannot read. (data source, the training state's structure: `jax.eval_shape`, so that the
  launcher's own JAX computes nothing and takes no GPU memory.)"""
  env = environments.make(config.env, seed=config.seed, **config.env_options())
  agent = make_agent(config.agent, env.action_spec().num_values)
  placement.run_envs(config)
  spec = env.observation_spec()
  template = jax.eval_shape(lambda: initial_state(agent, config.seed, np.zeros(spec.shape, spec.dtype)))
  path, _, problems = checkpointing.latest_loadable(config.layout.checkpoints, template, trust_pickled)
  _warn_skipped(path, problems)
  if problems and path is None:
    raise ValueError(f'No checkpoint in {config.layout.checkpoints} is readable (the warnings above say why); move '
                     f'them away to start the run over, or, for pickled ones that you trust, use '
                     f'{checkpointing.TRUST_FLAG}.')
  pickled = snapshots.pickled(config.layout.probe_snapshots)
  if pickled and not trust_pickled:
    _warn(f'{len(pickled)} probe snapshot(s) in {config.layout.probe_snapshots} are pickled (written before they '
          f'were msgpack files): not probed. {checkpointing.TRUST_FLAG} converts them.')
  return env.data_source, template


_WARNED = set()  # The problems this launcher has printed (a problem record's file and text).


def _warn(message: str, key=None) -> None:
  """Prints a warning on the launcher's output, once."""
  if (key or message) not in _WARNED:
    _WARNED.add(key or message)
    print(f'Warning: {message}', file=sys.stderr, flush=True)


def _warn_skipped(path: Optional[str], problems: List[str]) -> None:
  """Warns of the checkpoints newer than `path` that a launch skips (damaged, planted, pickled), once each."""
  for problem in problems:
    _warn(f'{problem} {"Resuming from " + path if path else ""}', key=problem)


def _print_problems(config: ExperimentConfig, since: float) -> None:
  """Prints the problems the nodes recorded (damaged files moved aside, writes that found the disk full) since
  `since`, once each."""
  for record in config.layout.records(RunLayout.PROBLEMS):
    if record.get('time', 0) >= since:
      _warn(f'{record.get("problem")} {record.get("action")}', key=(record.get('file'), record.get('problem')))


def _out_of_space(config: ExperimentConfig, what: str) -> str:
  latest = checkpointing.latest(config.layout.checkpoints)
  return (f'The file system of {config.run_dir} is full: {what} Free space there (or move the run directory), then '
          f'relaunch the same command: the run resumes from its last checkpoint'
          f'{" (" + latest + ")" if latest else ""}.')


def _last(records: List[Record]) -> Optional[Record]:
  return records[-1] if records else None


def _number(value, spec: str) -> str:
  """A logged number for people: `value` formatted, or what a null (non-finite) one was."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return 'non-finite'
  return format(value, spec)


def _read_json(path: str) -> dict:
  try:
    return json.loads(storage.path(path).read_text()) if storage.path(path).exists() else {}
  except (OSError, ValueError):  # Being replaced: the next read has it.
    return {}


def _read_status(config: ExperimentConfig) -> dict:
  return _read_json(config.layout.evaluator_status)


def program_completed(config: ExperimentConfig) -> bool:
  """Whether the run's work is done: the learner finished (or diverged), and the evaluator and the evaluation
  episodes, if any, too.

  Under local_mp a node's `lp.stop()` reaches the launcher as a SIGTERM: one that
  arrives when the work is done is the program stopping itself, not a user.
  """
  learner = _last(config.layout.records(RunLayout.LEARNER))
  if not learner or not (learner.get('diverged') or learner['learner_step'] >= config.max_learner_steps):
    return False
  if config.evaluation.enabled and not learner.get('diverged'):  # Else its last finite step is the one evaluated.
    evaluation = _last(config.layout.records(RunLayout.EVALUATION))
    if not evaluation or evaluation['learner_step'] < learner['learner_step']:
      return False
  return config.probe_every <= 0 or _read_status(config).get('state') == 'finished'


def _evaluator_status(config: ExperimentConfig) -> str:
  status = _read_status(config)
  if not status:
    return ''
  state = status.get('state', '')
  if state == 'probing':
    state = (f'evaluator probing step {status.get("learner_step")} '
             f'(probe step {status.get("probe_step", 0)}/{status.get("probe_steps")})')
  elif state.startswith(('diagnostics', 'drawing')):
    state = f'evaluator at step {status.get("learner_step")}: {state}'
  else:
    state = f'evaluator {state}'
  waiting = status.get('snapshots_waiting') or 0
  return state + (f', {waiting} snapshot{"s" if waiting > 1 else ""} waiting' if waiting else '')


def progress_line(config: ExperimentConfig) -> str:
  learner = _last(config.layout.records(RunLayout.LEARNER))
  probe = _last(config.layout.records(RunLayout.PROBES))
  parts = []
  if learner:
    parts.append(f'learner step {learner["learner_step"]}/{config.max_learner_steps} '
                 f'({_number(learner.get("updates_per_s"), ".0f")} updates/s, '
                 f'td_loss {_number(learner.get("td_loss"), ".4f")}, mean_q {_number(learner.get("mean_q"), ".3f")})'
                 + (' DIVERGED' if learner.get('diverged') else ''))
  else:
    parts.append('learner waiting for replay to fill')
  if probe:
    parts.append(f'last probe @ {probe["learner_step"]}: plasticity {_number(probe.get("plasticity"), ".4f")}, '
                 f'loss of plasticity {_number(probe.get("plasticity_loss"), ".4f")}')
  evaluation = _last(config.layout.records(RunLayout.EVALUATION))
  if evaluation:
    normalised = (f' ({_number(evaluation["human_normalised"], ".3f")} human-normalised)'
                  if 'human_normalised' in evaluation else '')
    parts.append(f'last evaluation @ {evaluation["learner_step"]}: mean return '
                 f'{_number(evaluation.get("mean_return"), ".2f")}{normalised}')
  if config.probe_every > 0:
    status = _evaluator_status(config)
    if status:
      parts.append(status)
  replay_state = _read_json(config.layout.replay_status).get('state', '')
  if replay_state.startswith('writing'):
    parts.append(f'replay: {replay_state}')
  return ' | '.join(parts)


class Launch(NamedTuple):
  """How one launch of the program ended."""
  code: ExitCode
  cause: str = ''  # What failed, for a node failure.
  failed_nodes: Tuple[str, ...] = ()  # The nodes whose processes exited abnormally (local_mp).
  out_of_space: str = ''  # A node's write that found the run directory's disk full: no relaunch would help.


_INTERRUPTED = threading.Event()  # Set by a user's SIGINT or SIGTERM, for every launch of this process.
_WATCHING = []


def _watch_signals(config: ExperimentConfig) -> None:
  """Marks a user's SIGINT or SIGTERM (not the program's own stop); Launchpad's handlers still run.

  Installed once, over the dispatcher Launchpad installs at its first launch.
  """
  if _WATCHING:
    return
  _WATCHING.append(True)

  def on_signal(previous):
    def handler(signum, frame):
      if not program_completed(config):
        _INTERRUPTED.set()
      if callable(previous):
        previous(signum, frame)
    return handler

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, on_signal(signal.getsignal(signum)))


def _abnormal_exits(manager) -> Tuple[str, ...]:
  """Nodes (local_mp) whose current process exited other than cleanly or by the stop's SIGTERM."""
  nodes = set()
  for node, process in getattr(manager, 'node_processes', {}).items():
    if process.poll() not in (None, 0, -signal.SIGTERM, -signal.SIGALRM):  # Not the stop's own signals.
      nodes.add(f'{node} (exit {process.returncode})')
  return tuple(sorted(nodes))


def launch_and_wait(config: ExperimentConfig) -> Launch:
  """Runs the program once until it stops; how it ended."""
  import launchpad as lp
  from launchpad.launch import worker_manager
  launched = time.time()
  if not flags.FLAGS['lp_termination_notice_secs'].present:
    # Time for every node to stop by itself (the evaluator drops its point in progress, the learner saves)
    # before Launchpad kills what is left: a stop then takes at most this and the launcher's own few seconds.
    flags.FLAGS.lp_termination_notice_secs = TERMINATION_NOTICE_S
  worker_manager._HAS_MAIN_MANAGER = False  # pylint: disable=protected-access  Each relaunch's manager kills late nodes.
  # Temporary files of writes that never finished (a node killed mid-write): no node of this run writes now.
  swept = storage.sweep_temporaries(config.run_dir, before=launched)
  if swept:
    print(f'Removed {len(swept)} temporary file(s) of unfinished writes ({", ".join(swept[:3])}'
          f'{", ..." if len(swept) > 3 else ""}).', flush=True)
  attempt = config.layout.attempts() + 1
  storage.path(config.layout.attempt_logs(attempt)).mkdir(parents=True, exist_ok=True)  # Counts the launch.
  log_dir = config.layout.local_logs(attempt)
  os.makedirs(log_dir, exist_ok=True)
  program = program_lib.make_program(config, attempt)
  if config.launch_type == 'local_mp':
    from launchpad.launch.run_locally import launch_local_output_to_files
    launch_local_output_to_files._LOGGING_DIR = log_dir  # Read at import by Launchpad; set per run.
    # Actors and the evaluator are restarted in place; any other failure ends this launch.
    with supervisor.supervised(config.max_restarts, supervisor.restart_recorder(config.layout, attempt)):
      manager = lp.launch(program, launch_type='local_mp', terminal='output_to_files',
                          local_resources=program_lib.local_resources(config))
  else:
    manager = lp.launch(program, launch_type='local_mt', serialize_py_nodes=False)
  _watch_signals(config)
  failure = []

  def wait():
    try:
      manager.wait()
    except BaseException as e:  # A node failed: keep its error, and let the others stop.
      failure.append(e)
      manager.wait(raise_error=False)

  waiter = threading.Thread(target=wait, daemon=True)
  waiter.start()
  said_restored = False

  def say_restored() -> bool:
    status = _read_json(config.layout.replay_status)
    if said_restored or not status.get('restored_items') or status['time'] < launched:
      return said_restored
    print(f'Replay restored: {status["restored_items"]} items from {status["restored_from"]}.', flush=True)
    return True

  while waiter.is_alive():
    waiter.join(timeout=10.0)
    said_restored = say_restored()
    _print_problems(config, since=launched)
    if waiter.is_alive():
      print(f'[{time.strftime("%H:%M:%S")}] {progress_line(config)}', flush=True)
  program_lib.withdraw_addresses(config)  # Every node has stopped: nothing answers at the published addresses.
  say_restored()
  _print_problems(config, since=launched)
  if _INTERRUPTED.is_set():
    return Launch(ExitCode.INTERRUPTED)
  if failure:
    full = [r for r in config.layout.records(RunLayout.PROBLEMS) if r.get('kind') == 'full' and r['time'] >= launched]
    return Launch(ExitCode.NODE_FAILED, str(failure[0]), _abnormal_exits(manager),
                  out_of_space=full[0]['problem'] if full else '')
  return Launch(ExitCode.FINISHED)


def supervise(config: ExperimentConfig, template) -> ExitCode:
  """Launches the program, and relaunches it from the checkpoints when a node fails (`--max_restarts` times).

  Under local_mp actors and the evaluator are restarted in place first
  (`launch.supervisor`); any other failure makes Launchpad's local launcher
  stop the whole program, and it restarts nothing: the learner's and the
  replay's checkpoints make a relaunch continue where they were. Each
  relaunch is a record in the restarts stream. `template`: the training
  state's structure, which checkpoints are read into.
  """
  layout = config.layout
  if config.launch_type == 'local_mp':
    watchdog.start()  # Its nodes end with the launcher, even a killed one.
  restarts = 0
  while True:
    launch = launch_and_wait(config)
    if launch.code != ExitCode.NODE_FAILED:
      return launch.code
    print(f'A node of the program failed ({launch.cause}; {", ".join(launch.failed_nodes) or "see the logs"}); '
          f'logs in {layout.local_logs(layout.attempts())}.', file=sys.stderr, flush=True)
    if launch.out_of_space:  # A relaunch would fill it again.
      print(_out_of_space(config, launch.out_of_space), file=sys.stderr, flush=True)
      return ExitCode.NODE_FAILED
    if program_completed(config) or restarts >= config.max_restarts:
      return ExitCode.FINISHED if program_completed(config) else ExitCode.NODE_FAILED
    restarts += 1
    learner = _last(layout.records(RunLayout.LEARNER))
    logged = learner['learner_step'] if learner else 0
    path, loaded, problems = checkpointing.latest_loadable(layout.checkpoints, template)
    _warn_skipped(path, problems)
    resumed_at = loaded[0] if loaded else 0
    record = {'restart': restarts, 'attempt': layout.attempts(), 'nodes': list(launch.failed_nodes),
              'cause': launch.cause, 'last_logged_step': logged, 'resumed_from_step': resumed_at,
              'steps_lost': max(logged - resumed_at, 0)}
    logger = layout.logger(RunLayout.RESTARTS, 'launcher', tensorboard=False, step_key='restart')
    logger(record)
    logger.close()
    print(f'Relaunching from the checkpoints ({restarts}/{config.max_restarts}): the learner resumes at step '
          f'{resumed_at}.', flush=True)


def _results(layout: RunLayout) -> str:
  """The result files and directories that hold something, for the final message."""
  streams = (RunLayout.LEARNER, RunLayout.ACTORS, RunLayout.PROBES, RunLayout.DIAGNOSTICS, RunLayout.EVALUATION)
  paths = [layout.stream(name) for name in streams] + [layout.legacy_records(name) for name in streams]
  paths += [layout.probe_set, layout.checkpoints, layout.tensorboard(), layout.plots]
  present = [os.path.relpath(p, layout.root) + ('/' if storage.path(p).is_dir() else '') for p in paths
             if storage.holds_something(p)]
  text = ', '.join(present) or 'nothing yet'
  if storage.holds_something(layout.tensorboard()):
    text += f' (tensorboard --logdir {layout.tensorboard()})'
  return text


def restrict_servers(config: ExperimentConfig) -> None:
  """The run's servers listen on `--bind_host` only (`launch.network`); a warning where that cannot be, or where
  other hosts can reach them."""
  try:
    network.restrict_servers(config.bind_host, this_process=config.launch_type == 'local_mt')
  except network.Unenforceable as e:
    print(f'Warning: {e}', file=sys.stderr, flush=True)
  if network.exposure(config.bind_host):
    print(f'Warning: {network.exposure(config.bind_host)}', file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = run_flags.experiment_config()
    network.check(config.bind_host, config.publish_host)
    cluster = cluster_lib.cluster_config(config)
  except ValueError as e:
    raise app.UsageError(str(e))
  if not cluster.dry_run and config.launch_type != cluster_lib.LAUNCH_TYPE:
    restrict_servers(config)  # Before anything slow: under local_mt this process re-executes itself.
  try:
    data_source, template = validate(config, TRUST_PICKLED.value)
    if cluster.dry_run:  # Nothing written: the run directory only read.
      check_config(config)
      print(cluster_lib.dry_run(config, cluster))
      return
    resumed = write_or_check_config(config)
    config.layout.local_logs(config.layout.attempts() + 1)  # A bucket run's node logs: a directory of this user's.
    if TRUST_PICKLED.value:
      _convert_pickled(config, template)
  except ValueError as e:
    raise app.UsageError(str(e))
  except OSError as e:
    if not storage.is_full(e):
      raise
    raise app.UsageError(_out_of_space(config, str(e)))
  # The data is now resolved (and cached, if a download worked): nodes must not each retry a failed download.
  os.environ[datasets.DOWNLOAD_ENV] = '0'
  print(f'{"Resuming" if resumed else "Starting"} run in {config.run_dir}: {config.env} '
        f'({data_source}), {config.num_actors} actors, {config.launch_type}, '
        f'{config.max_learner_steps} learner steps, probe every {config.probe_every}.', flush=True)
  if config.launch_type == cluster_lib.LAUNCH_TYPE:
    cluster_lib.submit(config, cluster)
    print(f'Submitted: the nodes write {config.run_dir}; relaunch the same command to resume it.')
    return
  try:
    _run(config, template)
  except OSError as e:  # The launcher's own writes (the addresses, the restart records, the plots) found no space.
    if not storage.is_full(e):
      raise
    sys.exit(_fail(ExitCode.NODE_FAILED, _out_of_space(config, str(e))))


def _run(config: ExperimentConfig, template) -> None:
  """Runs the program (relaunched when it fails), reports, and exits with the run's code."""
  code = supervise(config, template)
  layout = config.layout
  learner = _last(layout.records(RunLayout.LEARNER))
  print(f'{"Interrupted" if code == ExitCode.INTERRUPTED else "Finished"}: {progress_line(config)}')
  if _last(layout.records(RunLayout.PROBES)):
    for path in plots.write_report(config.run_dir):
      print(f'  plot: {path}')
  print(f'Results in {config.run_dir}: {_results(layout)}.')
  if learner and learner.get('diverged'):
    sys.exit(_fail(ExitCode.DIVERGED, f'The learner diverged at step {learner["learner_step"]} (a non-finite loss or '
                   f'parameter); its last finite state is the latest checkpoint in {layout.checkpoints}. '
                   f'Try a smaller --learning_rate.'))
  if code != ExitCode.FINISHED:
    sys.exit(_fail(code, 'Interrupted: relaunch the same command to resume.' if code == ExitCode.INTERRUPTED
                   else f'See {layout.logs}.'))
  if not learner or learner['learner_step'] < config.max_learner_steps:
    sys.exit(_fail(ExitCode.NODE_FAILED, f'The learner stopped before --max_learner_steps={config.max_learner_steps}'
                   f'; see {layout.logs}.'))


def _convert_pickled(config: ExperimentConfig, template) -> None:
  """Converts the run directory's pickled checkpoints and probe snapshots (`--trust_pickled_checkpoints`)."""
  converted = (checkpointing.migrate_pickled(config.layout.checkpoints, template)
               + snapshots.migrate_pickled(config.layout.probe_snapshots))
  if converted:
    print(f'Converted {len(converted)} pickled checkpoint(s) and probe snapshot(s) to msgpack files (the pickles '
          f'removed): {", ".join(os.path.basename(path) for path in converted)}.', flush=True)


def _fail(code: ExitCode, message: str) -> int:
  print(message, file=sys.stderr)
  return int(code)


if __name__ == '__main__':
  app.run(main)
