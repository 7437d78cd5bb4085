"""The launcher's supervision on the real classes: the watchdog, the run directory's lock.

Whole runs that exercise them: tests/test_train_program.py and tests/test_elastic.py.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from agents import storage
from launch import run_lock
from probes.run_dir import RunLayout
from tests.test_storage import bucket  # pylint: disable=unused-import  A fixture: gs:// in memory.
from tests.test_train_program import ROOT

def _launcher_with_a_node():
  """A stand-in launcher (a process) with a child (its node); (launcher, node pid)."""
  code = ('import subprocess, sys, time; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); '
          'print(p.pid, flush=True); time.sleep(600)')
  launcher = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  return launcher, int(launcher.stdout.readline())


def _watchdog(launcher_pid: int, launcher_created: float) -> subprocess.Popen:
  """The watchdog, as `watchdog.start` runs it, its pipe closed at once (the launcher is gone for it)."""
  read_end, write_end = os.pipe()
  dog = subprocess.Popen([sys.executable, '-m', 'launch.watchdog', str(launcher_pid), repr(launcher_created),
                          str(read_end), '2'], pass_fds=(read_end,), cwd=ROOT)
  os.close(read_end)
  os.close(write_end)
  return dog


def test_the_watchdog_ends_its_launchers_nodes_and_never_those_of_a_process_that_reused_its_pid():
  launcher, node_pid = _launcher_with_a_node()
  node = psutil.Process(node_pid)
  try:
    created = psutil.Process(launcher.pid).create_time()
    # The launcher's pid, but not its start time: a process the system gave that pid later. Its child stays.
    _watchdog(launcher.pid, created + 5.0).wait(timeout=60)
    assert node.is_running() and node.status() != psutil.STATUS_ZOMBIE
    _watchdog(launcher.pid, created).wait(timeout=60)  # The launcher itself: its node is stopped.
    assert not node.is_running() or node.status() == psutil.STATUS_ZOMBIE  # Ended (its parent has not reaped it).
  finally:
    for process in (node, psutil.Process(launcher.pid)):
      if process.is_running():
        process.kill()
    launcher.wait(timeout=10)


def _plant_lock(layout: RunLayout, **fields) -> None:
  holder = {'token': 'theirs', 'host': 'elsewhere', 'boot_id': 'another-boot', 'pid': 1, 'since': time.time() - 60,
            'renewed': time.time(), 'processes': [], **fields}
  os.makedirs(layout.root, exist_ok=True)
  with open(layout.lock, 'w') as f:
    json.dump(holder, f)


def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
  layout = RunLayout(str(tmp_path / 'run'))
  first = run_lock.RunLock(layout)
  assert first.acquire() is None
  with pytest.raises(run_lock.Held, match=rf'in use by another launch of the run: pid {os.getpid()} on '):
    run_lock.RunLock(layout).acquire()  # This very process holds it: alive.
  assert run_lock.live_holder(layout).pid == os.getpid()
  first.release()
  assert not os.path.exists(layout.lock) and run_lock.live_holder(layout) is None

  here = {'host': 'this', 'boot_id': run_lock.boot_id()}
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  dead = (gone.pid, time.time() - 10.0)
  me = run_lock.this_process()
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  try:
    watchdog = (child.pid, psutil.Process(child.pid).create_time())
    # On this machine: alive while one of its processes runs (its watchdog, after a kill -9 of its launcher)...
    _plant_lock(layout, pid=dead[0], processes=[dead, watchdog], **here)
    with pytest.raises(run_lock.Held, match=f'pid {dead[0]} on this'):
      run_lock.RunLock(layout).acquire()
  finally:
    child.kill()
    child.wait()
  # ... and not once they are gone, nor when its pid now names another process (here, this one).
  for processes in ([dead, watchdog], [(me[0], me[1] - 100.0)]):
    _plant_lock(layout, processes=processes, **here)
    lock = run_lock.RunLock(layout)
    assert 'pid 1 on this' in lock.acquire()
    assert run_lock.read(layout.lock).token != 'theirs'
    lock.release()
  # Another machine's lock: a lease, alive while renewed; and a damaged lock is nobody's.
  _plant_lock(layout, renewed=time.time() - 10.0)
  with pytest.raises(run_lock.Held, match='pid 1 on elsewhere'):
    run_lock.RunLock(layout).acquire()
  _plant_lock(layout, renewed=time.time() - run_lock.LEASE_S - 1.0)
  lock = run_lock.RunLock(layout)
  assert 'pid 1 on elsewhere' in lock.acquire()
  lock.release()
  with open(layout.lock, 'w') as f:
    f.write('{"tok')
  lock = run_lock.RunLock(layout)
  assert lock.acquire() == 'a damaged lock file'
  lock.release()


def test_the_run_lock_on_a_bucket_is_a_lease_renewed_and_taken_over_when_expired(bucket, monkeypatch):
  monkeypatch.setattr(run_lock, 'RENEW_S', 0.2)
  layout = RunLayout('gs://bucket/run')
  lock = run_lock.RunLock(layout)
  assert lock.acquire() is None
  written = run_lock.read(layout.lock).renewed
  deadline = time.time() + 30
  while run_lock.read(layout.lock).renewed == written:
    assert time.time() < deadline, 'never renewed'
    time.sleep(0.05)
  # Seen from another machine, it is held while renewed: here, another boot reads it.
  monkeypatch.setattr(run_lock, 'boot_id', lambda: 'another-machine')
  with pytest.raises(run_lock.Held):
    run_lock.RunLock(layout).acquire()
  lock.release()
  assert run_lock.read(layout.lock) is None
  holder = {'token': 'theirs', 'host': 'h', 'boot_id': 'b', 'pid': 7, 'since': 0.0, 'processes': []}
  for renewed, held in ((time.time(), True), (time.time() - run_lock.LEASE_S - 1.0, False)):
    storage.write_atomically(layout.lock, json.dumps({**holder, 'renewed': renewed}).encode())
    if held:
      with pytest.raises(run_lock.Held, match='pid 7 on h'):
        run_lock.RunLock(layout).acquire()
    else:
      lock = run_lock.RunLock(layout)
      assert 'pid 7 on h' in lock.acquire()
      lock.release()
