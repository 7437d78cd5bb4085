"""Ends a run's node processes when its launcher dies, however it dies (kill -9 included).

Launchpad's local launcher starts one process per node and stops them when it
stops; a launcher killed outright leaves them running for ever. So the
launcher starts this watchdog first (`start`): a process of its own session
(a Ctrl-C meant for the launcher does not reach it) that holds the read end of
a pipe only the launcher writes to. While the launcher lives the watchdog
notes its descendants every second; when the pipe closes (the launcher has
exited or died) it sends each descendant still alive SIGTERM, then SIGKILL to
any left after `--grace_s`, and exits. After a clean exit there is no one left
to stop.

  python -m launch.watchdog LAUNCHER_PID PIPE_FD [GRACE_S]   (run by `start`, not by hand)
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


def start(grace_s: float = 10.0) -> subprocess.Popen:
  """Starts the watchdog of the calling process; keep the returned handle for as long as the run lives."""
  read_end, _ = os.pipe()  # The write end stays open, never inherited, until this process ends.
  watchdog = subprocess.Popen([sys.executable, '-m', 'launch.watchdog', str(os.getpid()), str(read_end),
                               str(grace_s)], pass_fds=(read_end,), start_new_session=True)
  os.close(read_end)
  return watchdog


def _descendants(pid: int) -> Dict[int, float]:
  """{pid: creation time} of a process's descendants (the time tells a reused pid apart)."""
  try:
    return {child.pid: child.create_time() for child in psutil.Process(pid).children(recursive=True)
            if child.pid != os.getpid()}
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


def watch(launcher_pid: int, pipe_fd: int, grace_s: float) -> None:
  known: Dict[int, float] = {}
  while True:
    known.update(_descendants(launcher_pid))
    readable, _, _ = select.select([pipe_fd], [], [], POLL_S)
    if readable and not os.read(pipe_fd, 1):
      break  # The launcher's end closed: it is gone.
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
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 10.0)
