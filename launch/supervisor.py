"""Restarts a local_mp run's actors and evaluator in place when they die.

Launchpad 0.5.2's local launcher stops the whole program at any node's
non-zero exit. An actor or the evaluator holds nothing the run cannot do
without for a while, so `supervised` has the launcher use
`SupervisedWorkerManager` instead of Launchpad's own worker manager: it
remembers each node's command, environment and log file, and when a process of
a restartable group exits abnormally (while no stop is under way) it starts the
same command again, with `RESTART_ENV` set to that node's restart count (a
restarted actor draws a new seed; the evaluator resumes from its files), and
writes a record to the run's restarts stream. Past `max_restarts` restarts of one node,
its next failure is Launchpad's again: the program stops, and the launcher
relaunches it from the checkpoints (`launch.train.supervise`). A learner or
replay failure always takes that path.
"""

import contextlib
import os
import signal
import subprocess
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

from launchpad.launch import worker_manager

from probes.run_dir import RunLayout

RESTART_ENV = 'PLASTICITY_NODE_RESTART'  # How many times this node was restarted in place (unset: never).
RESTARTABLE_GROUPS = ('actor', 'evaluator')


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


class SupervisedWorkerManager(worker_manager.WorkerManager):
  """Launchpad's worker manager, restarting a restartable group's failed processes instead of failing.

  `on_restart(node, exit_code, restart)` is called (with the manager's lock
  held) after each restart. `node_processes` maps each node (`actor/0`) to
  its current process.
  """

  def __init__(self, max_restarts: int, on_restart: Callable[[str, int, int], None],
               groups: Sequence[str] = RESTARTABLE_GROUPS, **kwargs):
    super().__init__(**kwargs)
    self._max_restarts = max_restarts
    self._on_restart = on_restart
    self._groups = tuple(groups)
    self._commands: Dict[str, _Command] = {}
    self.restarts: Dict[str, int] = {}
    self.node_processes: Dict[str, subprocess.Popen] = {}

  def process_worker(self, name, command, env=None, **kwargs):
    super().process_worker(name, command, env=env, **kwargs)
    self._commands[name] = _Command(list(command), dict(env or {}), getattr(kwargs.get('stdout'), 'name', None))
    self.node_processes[name] = self._active_workers[name][-1]

  def _restartable(self, name: str, process) -> bool:
    return (name.split('/')[0] in self._groups and isinstance(process, subprocess.Popen)
            and process.poll() not in (None, 0) and self.restarts.get(name, 0) < self._max_restarts
            and not self._stop_counter and not self._stop_event.is_set())

  def _restart(self, name: str, failed: subprocess.Popen) -> subprocess.Popen:
    restart = self.restarts.get(name, 0) + 1
    command = self._commands[name]
    env = {**command.env, RESTART_ENV: str(restart)}
    if command.log_path is None:
      process = subprocess.Popen(command.command, env=env)
    else:
      with open(command.log_path, 'a') as log:  # The output of the process before stays above.
        log.write(f'\n[{time.strftime("%H:%M:%S")}] {name} {exit_cause(failed.returncode)}; restart {restart}.\n')
        log.flush()
        process = subprocess.Popen(command.command, env=env, stdout=log, stderr=log)
    self.restarts[name] = restart
    self.node_processes[name] = process
    self._on_restart(name, failed.returncode, restart)
    return process

  def _check_workers(self):
    """Restarts what may be restarted before Launchpad's check sees it fail (its caller holds the lock)."""
    for name, workers in self._active_workers.items():
      self._active_workers[name] = [self._restart(name, worker) if self._restartable(name, worker) else worker
                                    for worker in workers]
    super()._check_workers()


def restart_recorder(layout: RunLayout, attempt: int) -> Callable[[str, int, int], None]:
  """Writes each in-place restart to the run's restarts stream and says it on the launcher's output."""

  def record(node: str, exit_code: int, restart: int) -> None:
    logger = layout.logger(RunLayout.RESTARTS, 'launcher', tensorboard=False, step_key='restart')
    logger({'node': node, 'restart': restart, 'attempt': attempt, 'cause': exit_cause(exit_code),
            'exit_code': exit_code, 'exit_signal': exit_signal(exit_code),
            'steps_lost': 0})
    logger.close()
    print(f'Node {node} {exit_cause(exit_code)}; restarted it in place (restart {restart}), the run goes on.',
          flush=True)

  return record


@contextlib.contextmanager
def supervised(max_restarts: int, on_restart: Callable[[str, int, int], None]) -> Iterator[None]:
  """Within it, Launchpad's local_mp launch makes a `SupervisedWorkerManager` (its launchers call
  `worker_manager.WorkerManager()`; nothing else in the launcher's process makes one meanwhile)."""
  original = worker_manager.WorkerManager
  worker_manager.WorkerManager = lambda **kwargs: SupervisedWorkerManager(max_restarts, on_restart, **kwargs)
  try:
    yield
  finally:
    worker_manager.WorkerManager = original
