"""Ends a run's node processes when its launcher dies, however it dies (kill -9 included).

Launchpad's local launcher starts one process per node and stops them when it
stops; a launcher killed outright leaves them running for ever. So the
launcher starts this watchdog first (`start`): a process of its own session
(a Ctrl-C or a terminal's hang-up meant for the launcher does not reach it)
that holds the read end of a pipe only the launcher writes to. While the
launcher lives the watchdog notes its descendants every second; when the pipe
closes (the launcher has exited or died) it sends each descendant still alive
SIGTERM, then SIGKILL to any left after `grace_s` (at least the launch's
termination notice: the time a node may take to save), and exits. A node
started in the last second before the launcher died (an in-place restart),
which it had not noted yet, is known by the launcher's mark in its
environment (`MARK_ENV`, inherited from the launcher). `start` returns once
the watchdog has noted the processes already running. After a
clean exit there is no one left to stop. The launcher is known by its pid and
its start time, so a pid the system has given to another process is never
taken for it; and the launcher starts a new watchdog if this one dies
(`launch.train`).

  python -m launch.program.watchdog LAUNCHER_PID LAUNCHER_START_TIME PIPE_FD GRACE_S   (run by `start`, not by hand)
"""

import os
import select
import signal
import subprocess
import sys
import time
from typing import Dict

import psutil

POLL_S = 1.0
READY_TIMEOUT_S = 60.0  # How long `start` waits for the watchdog's first look (its imports, on a loaded machine).
MARK_ENV = 'PLASTICITY_RL_LAUNCHER'  # "<pid>:<start time>" of the launcher, in its nodes' environments.
READY = b'ready\n'


def start(grace_s: float) -> subprocess.Popen:
  """Starts the watchdog of the calling process; keep the returned handle for as long as the run lives."""
  read_end, _ = os.pipe()  # The write end stays open, never inherited, until this process ends.
  launcher = psutil.Process()
  os.environ[MARK_ENV] = _mark(launcher.pid, launcher.create_time())  # Processes started from now on carry it.
  watchdog = subprocess.Popen([sys.executable, '-m', 'launch.program.watchdog', str(launcher.pid),
                               repr(launcher.create_time()), str(read_end), str(grace_s)],
                              pass_fds=(read_end,), start_new_session=True, stdout=subprocess.PIPE)
  os.close(read_end)
  readable, _, _ = select.select([watchdog.stdout], [], [], READY_TIMEOUT_S)
  if readable:
    watchdog.stdout.readline()
  watchdog.stdout.close()
  return watchdog


def _mark(pid: int, created: float) -> str:
  return f'{pid}:{created!r}'


def same_process(pid: int, created: float) -> bool:
  """Whether `pid` is still the process that started at `created` (psutil's create_time), not a reuse of it."""
  try:
    return abs(psutil.Process(pid).create_time() - created) < 1e-3
  except psutil.Error:
    return False


def _descendants(pid: int, created: float) -> Dict[int, float]:
  """{pid: creation time} of a process's descendants (the time tells a reused pid apart); {} if `pid` is not the
  process that started at `created` any more."""
  try:
    process = psutil.Process(pid)
    children = process.children(recursive=True)
    if abs(process.create_time() - created) >= 1e-3:
      return {}
    return {child.pid: child.create_time() for child in children if child.pid != os.getpid()}
  except psutil.Error:
    return {}


def _alive(known: Dict[int, float]) -> Dict[int, psutil.Process]:
  alive = {}
  for pid, created in known.items():
    try:
      process = psutil.Process(pid)
      if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
        alive[pid] = process
    except psutil.Error:
      pass
  return alive


def _marked(mark: str) -> Dict[int, float]:
  """{pid: creation time} of the processes whose environment carries the launcher's mark."""
  found = {}
  for process in psutil.process_iter():
    try:
      if process.pid != os.getpid() and process.environ().get(MARK_ENV) == mark:
        found[process.pid] = process.create_time()
    except psutil.Error:
      pass
  return found


def watch(launcher_pid: int, launcher_created: float, pipe_fd: int, grace_s: float) -> None:
  known: Dict[int, float] = _descendants(launcher_pid, launcher_created)
  try:
    sys.stdout.buffer.write(READY)
    sys.stdout.close()  # The launcher reads one line, then nothing more.
  except OSError:
    pass
  while True:
    known.update(_descendants(launcher_pid, launcher_created))
    readable, _, _ = select.select([pipe_fd], [], [], POLL_S)
    if readable and not os.read(pipe_fd, 1):
      break  # The launcher's end closed: it is gone.
  known.update(_marked(_mark(launcher_pid, launcher_created)))
  left = _alive(known)
  for process in left.values():
    try:
      process.send_signal(signal.SIGTERM)
    except psutil.Error:
      pass
  deadline = time.monotonic() + grace_s
  while left and time.monotonic() < deadline:
    time.sleep(0.2)
    left = _alive(known)
  for process in left.values():
    try:
      process.kill()
    except psutil.Error:
      pass


if __name__ == '__main__':
  for ignored in (signal.SIGINT, signal.SIGHUP):
    signal.signal(ignored, signal.SIG_IGN)
  watch(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
