"""Restarts a local_mp run's actors and evaluator in place when they die, with backoff.

Launchpad 0.5.2's local launcher stops the whole program at any node's
non-zero exit. An actor or the evaluator holds nothing the run cannot do
without for a while, so `supervised` has the launcher use
`SupervisedWorkerManager` instead of Launchpad's own worker manager: it
remembers each node's command, environment and log file, and when a process of
a restartable group exits abnormally (while no stop is under way) it starts the
same command again after a backoff (`RESTART_BACKOFF`: 1 s, doubling, at most
60 s; the count behind it goes back to 0 once the node has run
`HEALTHY_S`), with `RESTART_ENV` set to that node's restart count (a restarted
actor draws a new seed; the evaluator resumes from its files), and writes a
record to the run's restarts stream. Past `max_restarts` restarts of one node
(counted since it last ran `HEALTHY_S`), its next failure is Launchpad's
again: the program stops, and the launcher relaunches it from the checkpoints
(`launch.program.relaunch.supervise`), except the evaluator's: it is disabled (a record
says so) and training goes on without it. A learner or replay failure always
takes the relaunch path, and so does a restart that cannot start its process.

Every node process runs in a session of its own: a terminal's hang-up or
Ctrl-C reaches the launcher only, which stops the nodes itself.
"""

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import psutil

from launch.program import launchpad_internals
from probes.records.run_dir import RunLayout

RESTART_ENV = 'PLASTICITY_NODE_RESTART'  # How many times this node was restarted in place (unset: never).
RESTARTABLE_GROUPS = ('actor', 'evaluator')
DISABLED_GROUPS = ('evaluator',)  # Past their restarts, disabled: training goes on without them.
HEALTHY_S = 600.0  # A node (a launch) that ran this long has its restart (relaunch) count reset to 0.


@dataclasses.dataclass(frozen=True)
class Backoff:
  """Waits between restarts: `first_s` before the first, doubling, at most `max_s`."""
  first_s: float
  max_s: float

  def delay(self, count: int) -> float:
    """The wait before restart `count` (1, 2, ...) since the count was last reset."""
    return min(self.first_s * 2 ** max(count - 1, 0), self.max_s)


RESTART_BACKOFF = Backoff(first_s=1.0, max_s=60.0)  # In-place restarts of one node.
RELAUNCH_BACKOFF = Backoff(first_s=10.0, max_s=300.0)  # Relaunches of the program (launch.train).


def node_restart() -> int:
  """This node process's restart count: 0 for its first start."""
  return int(os.environ.get(RESTART_ENV, '0'))


def exit_signal(code: int) -> Optional[str]:
  """The signal's name in a Popen exit status (-9: SIGKILL); None for an exit."""
  if code >= 0:
    return None
  try:
    return signal.Signals(-code).name
  except ValueError:
    return f'signal {-code}'


def exit_cause(code: int) -> str:
  """An exit status as people read it: `killed by SIGKILL`, `exited with code 1`."""
  return f'killed by {exit_signal(code)}' if code < 0 else f'exited with code {code}'


class _Command(NamedTuple):
  """What started a node's process, so that it can be started again the same way."""
  command: List[str]
  env: Dict[str, str]
  log_path: Optional[str]  # Where its output goes (`terminal='output_to_files'`); None: the launcher's own.


# (node, exit code, restart count) -> None: told of each restart in place, and of each node disabled.
Listener = Callable[[str, int, int], None]


class SupervisedWorkerManager(launchpad_internals.WorkerManager):
  """Launchpad's worker manager, restarting a restartable group's failed processes instead of failing.

  A failed process is restarted after `backoff.delay(n)`, n its count of
  restarts since it last ran `healthy_s`; past `max_restarts` a process of
  `disabled_groups` is dropped (`disabled`) and any other's failure is
  Launchpad's. `on_restart(node, exit_code, restart)` and
  `on_disable(node, exit_code, restarts)` are called (with the manager's lock
  held) after each; their errors are warnings (the restart stands).
  `node_processes` maps each node (`actor/0`) to its latest process. A restart
  that cannot start its process fails the program, as the node's exit would
  have without supervision.
  """

  def __init__(self, max_restarts: int, on_restart: Listener, groups: Sequence[str] = RESTARTABLE_GROUPS,
               disabled_groups: Sequence[str] = DISABLED_GROUPS, on_disable: Optional[Listener] = None,
               backoff: Backoff = RESTART_BACKOFF, healthy_s: float = HEALTHY_S, **kwargs):
    # Past the termination notice Launchpad kills the nodes' process trees and, by default, the launcher with
    # them (exit -9): the launcher stays, to report and exit with the run's code.
    super().__init__(**{**kwargs, 'kill_main_thread': False})
    self._max_restarts = max_restarts
    self._on_restart = on_restart
    self._on_disable = on_disable
    self._groups = tuple(groups)
    self._disabled_groups = tuple(disabled_groups)
    self._backoff = backoff
    self._healthy_s = healthy_s
    self._commands: Dict[str, _Command] = {}
    self._started: Dict[str, float] = {}  # When each node's latest process started (monotonic).
    self._recent: Dict[str, int] = {}  # Restarts since the node last ran healthy_s: what the budget counts.
    self._pending: Dict[str, Tuple[float, subprocess.Popen]] = {}  # Node -> (when to restart, failed process).
    self.restarts: Dict[str, int] = {}  # Every restart of a node in this launch: its processes' RESTART_ENV.
    self.disabled: Dict[str, int] = {}  # Node -> the exit code of its last process.
    self.node_processes: Dict[str, subprocess.Popen] = {}

  def process_worker(self, name, command, env=None, **kwargs):
    super().process_worker(name, command, env=env, start_new_session=True, **kwargs)
    self._commands[name] = _Command(list(command), dict(env or {}), getattr(kwargs.get('stdout'), 'name', None))
    self.node_processes[name] = self.workers[name][-1]
    self._started[name] = time.monotonic()

  def _failed(self, name: str, process) -> bool:
    """An abnormal exit of a supervised process, with no stop under way (a stop's exits are the stop's)."""
    return (name.split('/')[0] in self._groups and isinstance(process, subprocess.Popen)
            and process.poll() not in (None, 0) and not self.stopping())

  def _restart(self, name: str, failed: subprocess.Popen) -> subprocess.Popen:
    restart = self.restarts.get(name, 0) + 1
    command = self._commands[name]
    env = {**command.env, RESTART_ENV: str(restart)}
    if command.log_path is None:
      process = subprocess.Popen(command.command, env=env, start_new_session=True)
    else:
      with open(command.log_path, 'a') as log:  # The output of the process before stays above.
        log.write(f'\n[{time.strftime("%H:%M:%S")}] {name} {exit_cause(failed.returncode)}; restart {restart}.\n')
        log.flush()
        process = subprocess.Popen(command.command, env=env, stdout=log, stderr=log, start_new_session=True)
    self.restarts[name] = restart
    self._recent[name] = self._recent.get(name, 0) + 1
    self.node_processes[name] = process
    self._started[name] = time.monotonic()
    _tell(self._on_restart, name, failed.returncode, restart)
    return process

  def _fail(self, name: str, failed: subprocess.Popen, error: BaseException) -> None:
    """A restart that could not start its process: the node's failure, Launchpad's to handle (the program stops)."""
    self.fail(RuntimeError(f'{name} {exit_cause(failed.returncode)} and could not be restarted in place ({error!r}).'))

  def before_check(self) -> None:
    """Restarts (or disables) what may be, before Launchpad's check sees it fail (its caller holds the lock)."""
    now = time.monotonic()
    for name, workers in self.workers.items():
      kept = []
      for worker in workers:
        if not self._failed(name, worker):
          kept.append(worker)
        elif self._recent.get(name, 0) < self._max_restarts:
          self._pending[name] = (now + self._backoff.delay(self._recent.get(name, 0) + 1), worker)
        elif name.split('/')[0] in self._disabled_groups:
          self.disabled[name] = worker.returncode
          _tell(self._on_disable, name, worker.returncode, self.restarts.get(name, 0))
        else:
          kept.append(worker)  # Launchpad's failure: the program stops.
      self.workers[name] = kept
    for name, (due, failed) in list(self._pending.items()):
      if self.stopping():
        del self._pending[name]  # A stop drops the restarts it finds waiting.
      elif now >= due:
        del self._pending[name]
        try:
          self.workers[name].append(self._restart(name, failed))
        except Exception as e:  # pylint: disable=broad-except  Popen, or the log file: the node fails.
          self._fail(name, failed, e)
    for name, started in self._started.items():
      if self._recent.get(name) and now - started >= self._healthy_s and self.node_processes[name].poll() is None:
        self._recent[name] = 0

  def wait(self, labels_to_wait_for=None, raise_error=True, return_on_first_completed=False):
    """Launchpad's wait, which returns when no process is left, also waits for the restarts still due."""
    while True:
      super().wait(labels_to_wait_for, raise_error, return_on_first_completed)
      with self.lock:
        if not self._pending or return_on_first_completed:
          return
      time.sleep(0.1)


def _tell(listener: Optional[Listener], name: str, exit_code: int, count: int) -> None:
  """Calls a listener; its failure (a record that cannot be written: a full disk) is a warning, not the run's."""
  if listener is None:
    return
  try:
    listener(name, exit_code, count)
  except Exception as e:  # pylint: disable=broad-except
    print(f'Warning: {name}: {type(e).__name__}: {e} (the run goes on).', file=sys.stderr, flush=True)


class RestartRecords:
  """Writes each in-place restart and each disabled node to the run's restarts stream and says it on the
  launcher's output."""

  def __init__(self, layout: RunLayout, attempt: int):
    self._layout = layout
    self._attempt = attempt

  def _write(self, record: dict) -> None:
    logger = self._layout.logger(RunLayout.RESTARTS, 'launcher', tensorboard=False, step_key='restart')
    try:
      logger({**record, 'attempt': self._attempt})
    finally:
      logger.close()

  def restarted(self, node: str, exit_code: int, restart: int) -> None:
    print(f'Node {node} {exit_cause(exit_code)}; restarted it in place (restart {restart}), the run goes on.',
          flush=True)
    self._write({'node': node, 'restart': restart, 'cause': exit_cause(exit_code), 'exit_code': exit_code,
                 'exit_signal': exit_signal(exit_code), 'steps_lost': 0})

  def disabled(self, node: str, exit_code: int, restarts: int) -> None:
    print(f'Node {node} {exit_cause(exit_code)} after {restarts} restarts in place: disabled, training goes on '
          f'without it; the probe points it leaves wait in their snapshot files for a relaunch.', flush=True)
    self._write({'node': node, 'disabled': True, 'restart': restarts, 'cause': exit_cause(exit_code),
                 'exit_code': exit_code, 'exit_signal': exit_signal(exit_code)})


def live_processes(manager) -> List[psutil.Process]:
  """A launch's node processes still running (local_mp; none under local_mt, whose nodes are threads)."""
  alive = []
  for process in getattr(manager, 'node_processes', {}).values():
    if process.poll() is None:
      try:
        alive.append(psutil.Process(process.pid))
      except psutil.Error:
        pass
  return alive


def end_launch(manager, notice_s: float) -> None:
  """Ends a launch whose manager has stopped waiting: every node process still running is stopped (SIGTERM, then
  SIGKILL after `notice_s`), and the manager's signal handlers and termination countdown are turned off, so that
  a later launch's stop (a Ctrl-C) is counted down by that launch's manager alone, from its full notice."""
  left = live_processes(manager)
  for process in left:
    print(f'Warning: node process {process.pid} outlived its launch; stopping it.', file=sys.stderr, flush=True)
    process.terminate()
  _, left = psutil.wait_procs(left, timeout=notice_s)
  for process in left:
    process.kill()
  psutil.wait_procs(left, timeout=10)
  launchpad_internals.disable_signals(manager)


@contextlib.contextmanager
def supervised(max_restarts: int, records: RestartRecords) -> Iterator[None]:
  """Within it, Launchpad's local_mp launch makes a `SupervisedWorkerManager` (its launchers call
  `worker_manager.WorkerManager()`; nothing else in the launcher's process makes one meanwhile)."""
  with launchpad_internals.worker_manager_factory(lambda **kwargs: SupervisedWorkerManager(
      max_restarts, records.restarted, on_disable=records.disabled, **kwargs)):
    yield
