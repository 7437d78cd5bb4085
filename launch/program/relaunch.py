"""The launch loop of `launch.train`: a run's program launched, watched, and relaunched from its checkpoints.

`supervise` launches the program (`launch_and_wait`), looks after it while it
lives (`Supervision`: the run directory's lock, the watchdog, the nodes'
listening sockets), and when it has stopped decides from the records how the
run ends (`ExitCode`) or relaunches it with backoff. Kept apart from the
command, which only reads flags, validates and prints, so that the loop is a
part of the program's package that other launchers (`launch.cluster_sim`)
share: its exit codes and its progress line among them.
"""

import enum
import json
import os
import signal
import stat
import sys
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

from absl import flags
import psutil

from agents import checkpointing, storage
from launch.program import graph as program_lib
from launch.program import launchpad_internals
from launch.program import network
from launch.program import run_lock
from launch.program import supervisor
from launch.program import watchdog
from launch.program.completion import last_record, program_completed, work_left
from probes.records import loggers
from probes.records.loggers import format_number
from probes.records.run_dir import EvaluatorState, ExperimentConfig, RunLayout

TERMINATION_NOTICE_S = 40  # A cap: nodes stop in seconds, the replay after its final checkpoint.
WATCHDOG_MARGIN_S = 10  # The watchdog's grace beyond the termination notice.
POLL_S = 1.0  # How often the launcher looks at a live launch (lock, watchdog, listening sockets, the run's end).
PROGRESS_EVERY_S = 10.0  # How often it prints the progress line.
LOOK_EVERY_S = 5.0  # How often it reads the nodes' listening sockets.


class ExitCode(enum.IntEnum):
  """How a run ends: the exit codes of `launch.train` (and of every command of this project)."""
  FINISHED = 0
  USAGE = 1  # What absl's app.UsageError exits with.
  NODE_FAILED = 2
  DIVERGED = 3
  PROBES_MISSING = 4  # Training finished; the evaluator was disabled with probe points left (a relaunch probes them).
  INTERRUPTED = 130


_WARNED = set()  # The problems this launcher has printed (a problem record's file and text).


def warn(message: str, key=None) -> None:
  """Prints a warning on the launcher's output, once."""
  if (key or message) not in _WARNED:
    _WARNED.add(key or message)
    print(f'Warning: {message}', file=sys.stderr, flush=True)


def warn_skipped(path: Optional[str], problems: List[str]) -> None:
  """Warns of the checkpoints newer than `path` that a launch skips (damaged, planted, pickled), once each."""
  for problem in problems:
    warn(f'{problem} {"Resuming from " + path if path else ""}', key=problem)


def _print_problems(config: ExperimentConfig, since: float) -> None:
  """Prints the problems the nodes recorded (damaged files moved aside, writes that found the disk full) since
  `since`, once each."""
  for record in config.layout.records(RunLayout.PROBLEMS):
    if record.get('time', 0) >= since:
      warn(f'{record.get("problem")} {record.get("action")}', key=(record.get('file'), record.get('problem')))


def out_of_space(config: ExperimentConfig, what: str) -> str:
  latest = checkpointing.latest(config.layout.checkpoints)
  return (f'The file system of {config.run_dir} is full: {what} Free space there (or move the run directory), then '
          f'relaunch the same command: the run resumes from its last checkpoint'
          f'{" (" + latest + ")" if latest else ""}.')


def read_json(path: str) -> dict:
  """A status file a live node rewrites (evaluator or replay status, addresses): {} while absent or being
  replaced (the next read has it)."""
  try:
    return json.loads(storage.path(path).read_text()) if storage.path(path).exists() else {}
  except (OSError, ValueError):
    return {}


def _evaluator_status(config: ExperimentConfig) -> str:
  status = read_json(config.layout.evaluator_status)
  if not status:
    return ''
  state = status.get('state', '')
  if state == EvaluatorState.PROBING:
    state = (f'evaluator probing step {status.get("learner_step")} '
             f'(probe step {status.get("probe_step", 0)}/{status.get("probe_steps")})')
  elif state in (EvaluatorState.DIAGNOSING, EvaluatorState.DRAWING):
    state = f'evaluator at step {status.get("learner_step")}: {state}'
  else:
    state = f'evaluator {state}'
  waiting = status.get('snapshots_waiting') or 0
  return state + (f', {waiting} snapshot{"s" if waiting > 1 else ""} waiting' if waiting else '')


def progress_line(config: ExperimentConfig) -> str:
  learner = last_record(config.layout.records(RunLayout.LEARNER))
  probe = last_record(config.layout.records(RunLayout.PROBES))
  parts = []
  if learner:
    parts.append(f'learner step {learner["learner_step"]}/{config.max_learner_steps} '
                 f'({format_number(learner.get("updates_per_s"), ".0f")} updates/s, '
                 f'td_loss {format_number(learner.get("td_loss"), ".4f")}, '
                 f'mean_q {format_number(learner.get("mean_q"), ".3f")})'
                 + (' DIVERGED' if learner.get('diverged') else ''))
  else:
    parts.append('learner waiting for replay to fill')
  if probe:
    parts.append(f'last probe @ {probe["learner_step"]}: plasticity {format_number(probe.get("plasticity"), ".4f")}, '
                 f'loss of plasticity {format_number(probe.get("plasticity_loss"), ".4f")}')
  evaluation = last_record(config.layout.records(RunLayout.EVALUATION))
  if evaluation:
    normalised = (f' ({format_number(evaluation["human_normalised"], ".3f")} human-normalised)'
                  if 'human_normalised' in evaluation else '')
    parts.append(f'last evaluation @ {evaluation["learner_step"]}: mean return '
                 f'{format_number(evaluation.get("mean_return"), ".2f")}{normalised}')
  if config.probe_every > 0:
    status = _evaluator_status(config)
    if status:
      parts.append(status)
  replay_state = read_json(config.layout.replay_status).get('state', '')
  if replay_state.startswith('writing'):
    parts.append(f'replay: {replay_state}')
  return ' | '.join(parts)


class Launch(NamedTuple):
  """How one launch of the program ended."""
  failed: bool = False  # A node failed (Launchpad stopped the program).
  cause: str = ''  # What failed, for a node failure.
  failed_nodes: Tuple[str, ...] = ()  # The nodes whose processes exited abnormally (local_mp).
  evaluator_disabled: bool = False  # The evaluator failed past its restarts; training went on without it.
  refused: str = ''  # Why the launcher stopped the launch itself: a server beyond --bind_host, the lock lost.
  out_of_space: str = ''  # A node's write that found the run directory's disk full: no relaunch would help.


_STOP_SIGNAL = threading.Event()  # A SIGINT, SIGTERM or SIGHUP came (a user's, or a node's lp.stop()).
_WATCHING = []


def _watch_signals() -> None:
  """Notes each SIGINT and SIGTERM (a user's stop, or the program's own: a node's `lp.stop()` reaches the launcher
  as a SIGTERM); Launchpad's handlers still run. Whether a stop interrupted the run is read from the records once
  the launch has ended (`program_completed`).

  Installed once, over the dispatcher Launchpad installs at its first launch.
  """
  if _WATCHING:
    return
  _WATCHING.append(True)

  def on_signal(previous):
    def handler(signum, frame):
      _STOP_SIGNAL.set()
      if callable(previous):
        previous(signum, frame)
    return handler

  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, on_signal(signal.getsignal(signum)))


def hang_up(signum, frame) -> None:
  """SIGHUP (a dropped SSH session, a closed terminal) is a stop like SIGTERM. The terminal is gone: output that
  went to it goes nowhere from now on (a write to a hung-up terminal fails)."""
  del signum, frame
  devnull = os.open(os.devnull, os.O_WRONLY)
  for fd in (1, 2):
    try:
      if stat.S_ISCHR(os.fstat(fd).st_mode):  # A terminal (files and pipes stay).
        os.dup2(devnull, fd)
    except OSError:
      pass
  os.close(devnull)
  os.kill(os.getpid(), signal.SIGTERM)


def _abnormal_exits(manager) -> Tuple[str, ...]:
  """Nodes (local_mp) whose current process exited other than cleanly or by the stop's SIGTERM."""
  nodes = set()
  for node, process in getattr(manager, 'node_processes', {}).items():
    if process.poll() not in (None, 0, -signal.SIGTERM, -signal.SIGALRM):  # Not the stop's own signals.
      nodes.add(f'{node} (exit {process.returncode})')
  return tuple(sorted(nodes))


def _stop_program(manager) -> None:
  """Stops the launch's nodes as Launchpad does at a node's `lp.stop()` (the launcher's main thread only)."""
  launchpad_internals.stop_workers(manager)


def _notice_s() -> int:
  return flags.FLAGS.lp_termination_notice_secs


class Supervision:
  """What the launcher keeps while a local run lives, beside Launchpad's manager: the run directory's lock (with
  the launch's processes in it), the watchdog (started again if it dies), and a look at where the nodes listen."""

  def __init__(self, config: ExperimentConfig, lock: Optional[run_lock.RunLock]):
    self._config = config
    self._lock = lock
    local_mp = config.launch.launch_type == 'local_mp'
    self._watchdog = watchdog.start(_notice_s() + WATCHDOG_MARGIN_S) if local_mp else None
    self._looked = 0.0

  def tick(self, manager=None) -> str:
    """Looks after the run once (every POLL_S); a reason to stop the launch, or ''."""
    if self._watchdog is not None and self._watchdog.poll() is not None:
      print(f'Warning: the watchdog (pid {self._watchdog.pid}) {supervisor.exit_cause(self._watchdog.returncode)}; '
            f'started another.', file=sys.stderr, flush=True)
      self._watchdog = watchdog.start(_notice_s() + WATCHDOG_MARGIN_S)
    nodes = supervisor.live_processes(manager)
    if self._lock is not None:
      ours = []
      for process in nodes + ([self._watchdog] if self._watchdog is not None else []):
        try:
          ours.append((process.pid, psutil.Process(process.pid).create_time()))
        except psutil.Error:  # Just exited.
          pass
      self._lock.update(ours)
      if self._lock.lost:
        return f'Another launcher took this run directory\'s lock ({self._lock.lost}): stopping this launch.'
    if time.monotonic() - self._looked < LOOK_EVERY_S:
      return ''
    self._looked = time.monotonic()
    local_mt = self._config.launch.launch_type == 'local_mt'
    pids = [process.pid for process in nodes] or ([os.getpid()] if local_mt else [])
    exposed = network.exposed_listeners(pids, self._config.launch.bind_host)
    if exposed:
      return (f'The run\'s servers listen beyond --bind_host={self._config.launch.bind_host}: {"; ".join(exposed)} '
              f'(the bind library did not take: docs/distributed.md, "Who can reach a run"). Stopping the run; '
              f'--bind_host=0.0.0.0 runs it on every interface knowingly.')
    return ''

  def wait(self, seconds: float) -> bool:
    """Waits between launches, looking after the run; True if a stop signal came meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      if _STOP_SIGNAL.wait(min(POLL_S, max(deadline - time.monotonic(), 0))):
        return True
      self.tick()
    return _STOP_SIGNAL.is_set()


def _end_launch(manager, waiter: threading.Thread) -> None:
  """Returns once every process of the launch has exited, the launch's signal handlers and countdown off: the
  next launch starts alone (`supervisor.end_launch`)."""
  if waiter.is_alive():  # The launcher's own loop failed: the program still runs.
    _stop_program(manager)
    waiter.join(timeout=_notice_s() + WATCHDOG_MARGIN_S)
  supervisor.end_launch(manager, _notice_s())


def launch_and_wait(config: ExperimentConfig, guard: Supervision) -> Launch:
  """Runs the program once until it stops; how it ended. Every process of the launch has exited when it returns."""
  import launchpad as lp
  launched = time.time()
  launchpad_internals.allow_another_main_manager()
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
  if config.launch.launch_type == 'local_mp':
    launchpad_internals.set_local_log_dir(log_dir)
    # Actors and the evaluator are restarted in place; any other failure ends this launch.
    with supervisor.supervised(config.launch.max_restarts, supervisor.RestartRecords(config.layout, attempt)):
      manager = lp.launch(program, launch_type='local_mp', terminal='output_to_files',
                          local_resources=program_lib.local_resources(config))
  else:
    manager = lp.launch(program, launch_type='local_mt', serialize_py_nodes=False)
  _watch_signals()
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
    status = read_json(config.layout.replay_status)
    if said_restored or not status.get('restored_items') or status['time'] < launched:
      return said_restored
    print(f'Replay restored: {status["restored_items"]} items from {status["restored_from"]}.', flush=True)
    return True

  refused = ''
  printed = time.monotonic()
  try:
    while waiter.is_alive():
      waiter.join(timeout=POLL_S)
      said_restored = say_restored()
      if not waiter.is_alive():
        break
      reason = guard.tick(manager)
      if reason and not refused:
        refused = reason
        print(reason, file=sys.stderr, flush=True)
        _stop_program(manager)
      if time.monotonic() - printed >= PROGRESS_EVERY_S:
        printed = time.monotonic()
        _print_problems(config, since=launched)
        print(f'[{time.strftime("%H:%M:%S")}] {progress_line(config)}', flush=True)
  finally:
    _end_launch(manager, waiter)
  program_lib.withdraw_addresses(config)  # Every node has stopped: nothing answers at the published addresses.
  say_restored()
  _print_problems(config, since=launched)
  if config.launch.launch_type == 'local_mt' and not storage.is_local(config.run_dir):
    time.sleep(loggers.FLUSH_SECONDS + 1)  # The nodes' threads upload their last records (`probes.records.loggers`).
  full = [r for r in config.layout.records(RunLayout.PROBLEMS)
          if r.get('kind') == 'full' and r['time'] >= launched] if failure else []
  return Launch(bool(failure), str(failure[0]) if failure else '', _abnormal_exits(manager),
                bool(getattr(manager, 'disabled', None)), refused, full[0]['problem'] if full else '')


def _verdict(config: ExperimentConfig, launch: Launch) -> Optional[ExitCode]:
  """How the run ends after this launch; None: relaunch it (a node failed, with work left)."""
  if launch.refused:
    return ExitCode.USAGE
  if program_completed(config):
    return ExitCode.FINISHED
  if launch.evaluator_disabled and not work_left(config, evaluator=False):
    return ExitCode.PROBES_MISSING  # Training is over (the coordinator's stop); the probe points are left.
  if launch.failed and not _STOP_SIGNAL.is_set():
    return None
  return ExitCode.INTERRUPTED  # Stopped with work left: a user's signal.


def supervise(config: ExperimentConfig, template, lock: Optional[run_lock.RunLock] = None) -> ExitCode:
  """Launches the program, and relaunches it from the checkpoints while a node fails with work left
  (`--max_restarts` times in a row, after `supervisor.RELAUNCH_BACKOFF`; a launch that ran `supervisor.HEALTHY_S`
  resets the count).

  Under local_mp actors and the evaluator are restarted in place first
  (`launch.program.supervisor`); any other failure makes Launchpad's local launcher
  stop the whole program, and it restarts nothing: the learner's and the
  replay's checkpoints make a relaunch continue where they were. Each
  relaunch is a record in the restarts stream. `template`: the training
  state's structure, which checkpoints are read into.
  """
  layout = config.layout
  if not flags.FLAGS['lp_termination_notice_secs'].present:
    # Time for every node to stop by itself (the evaluator drops its point in progress, the learner saves)
    # before Launchpad kills what is left: a stop then takes at most this and the launcher's own few seconds.
    flags.FLAGS.lp_termination_notice_secs = TERMINATION_NOTICE_S
  guard = Supervision(config, lock)  # Under local_mp its watchdog ends the nodes with the launcher, even a killed one.
  relaunches, in_a_row = 0, 0
  while True:
    started = time.monotonic()
    launch = launch_and_wait(config, guard)
    verdict = _verdict(config, launch)
    if verdict is not None:
      return verdict
    print(f'A node of the program failed ({launch.cause}; {", ".join(launch.failed_nodes) or "see the logs"}); '
          f'logs in {layout.local_logs(layout.attempts())}.', file=sys.stderr, flush=True)
    if launch.out_of_space:  # A relaunch would fill it again.
      print(out_of_space(config, launch.out_of_space), file=sys.stderr, flush=True)
      return ExitCode.NODE_FAILED
    if time.monotonic() - started >= supervisor.HEALTHY_S:
      in_a_row = 0
    if in_a_row >= config.launch.max_restarts:
      return ExitCode.NODE_FAILED
    relaunches, in_a_row = relaunches + 1, in_a_row + 1
    learner = last_record(layout.records(RunLayout.LEARNER))
    logged = learner['learner_step'] if learner else 0
    path, loaded, problems = checkpointing.latest_loadable(layout.checkpoints, template)
    warn_skipped(path, problems)
    resumed_at = loaded[0] if loaded else 0
    record = {'restart': relaunches, 'attempt': layout.attempts(), 'nodes': list(launch.failed_nodes),
              'cause': launch.cause, 'last_logged_step': logged, 'resumed_from_step': resumed_at,
              'steps_lost': max(logged - resumed_at, 0)}
    try:
      logger = layout.logger(RunLayout.RESTARTS, 'launcher', tensorboard=False, step_key='restart')
      logger(record)
      logger.close()
    except OSError as e:
      if storage.is_full(e):  # A relaunch would fill it again.
        print(out_of_space(config, str(e)), file=sys.stderr, flush=True)
        return ExitCode.NODE_FAILED
      print(f'Warning: the relaunch record could not be written ({e!r}).', file=sys.stderr, flush=True)
    delay = supervisor.RELAUNCH_BACKOFF.delay(in_a_row)
    print(f'Relaunching from the checkpoints ({in_a_row}/{config.launch.max_restarts}) in {delay:.0f} s: the learner '
          f'resumes at step {resumed_at}.', flush=True)
    if guard.wait(delay):
      return ExitCode.INTERRUPTED


def results(layout: RunLayout) -> str:
  """The result files and directories that hold something, for the final message."""
  streams = (RunLayout.LEARNER, RunLayout.ACTORS, RunLayout.PROBES, RunLayout.DIAGNOSTICS, RunLayout.EVALUATION)
  paths = [layout.stream(name) for name in streams]
  paths += [layout.probe_set, layout.checkpoints, layout.tensorboard(), layout.plots]
  present = [os.path.relpath(p, layout.root) + ('/' if storage.path(p).is_dir() else '') for p in paths
             if storage.holds_something(p)]
  text = ', '.join(present) or 'nothing yet'
  if storage.holds_something(layout.tensorboard()):
    text += f' (tensorboard --logdir {layout.tensorboard()})'
  return text
