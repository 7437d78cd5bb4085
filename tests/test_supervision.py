"""The launcher's supervision on the real classes: in-place restarts that fail, backoff, a disabled evaluator, the
launches' signal handlers, the watchdog, the run directory's lock, and when a run is finished.

Whole runs that exercise them: tests/test_train_program.py and tests/test_elastic.py.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from agents import storage
from launch.program import completion
from launch.program import run_lock
from launch.program import supervisor
from probes.records.run_dir import ExperimentConfig, RunLayout
from tests.conftest import ROOT, start_node, wait_for

FAST = supervisor.Backoff(first_s=0.2, max_s=0.4)


def _manager(monkeypatch, max_restarts=2, backoff=FAST, healthy_s=3600.0, on_restart=None, on_disable=None):
  from launchpad.launch import worker_manager
  monkeypatch.setattr(worker_manager, '_HAS_MAIN_MANAGER', True)  # No kill countdown in the test's process.
  events = []
  manager = supervisor.SupervisedWorkerManager(
      max_restarts, on_restart or (lambda *event: events.append(('restart', *event))),
      on_disable=on_disable or (lambda *event: events.append(('disable', *event))), backoff=backoff,
      healthy_s=healthy_s, kill_main_thread=False)
  return manager, events


def _runs(log_path: str):
  with open(log_path) as f:
    return [line.split() for line in f if line.startswith('run ')]


def test_backoff_doubles_to_its_cap():
  assert [supervisor.RESTART_BACKOFF.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
  assert supervisor.RELAUNCH_BACKOFF.delay(1) == 10 and supervisor.RELAUNCH_BACKOFF.delay(9) == 300


@pytest.mark.slow
def test_restarts_wait_their_backoff_and_a_healthy_node_gets_its_count_back(tmp_path, monkeypatch):
  manager, events = _manager(monkeypatch, max_restarts=2)
  log_path = start_node(manager, tmp_path, 'actor/0', 'print("run", RESTART, time.time(), flush=True); sys.exit(3)')
  with pytest.raises(RuntimeError, match='exited with code 3'):  # Its third failure: the program's.
    manager.wait()
  starts = [float(run[2]) for run in _runs(log_path)]
  assert [int(run[1]) for run in _runs(log_path)] == [0, 1, 2]
  assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4  # Each waited its backoff, doubling.
  assert events == [('restart', 'actor/0', 3, 1), ('restart', 'actor/0', 3, 2)]
  # A node that runs healthy_s before each failure is never out of restarts: 4 failures, one restart allowed.
  manager, events = _manager(monkeypatch, max_restarts=1, healthy_s=0.3)
  log_path = start_node(manager, tmp_path, 'actor/1', 'print("run", RESTART, flush=True); time.sleep(1.0); '
                                                  'sys.exit(3 if RESTART < 4 else 0)')
  manager.wait()
  assert [int(run[1]) for run in _runs(log_path)] == [0, 1, 2, 3, 4]
  assert manager.restarts == {'actor/1': 4}


@pytest.mark.slow
def test_a_restart_that_cannot_start_its_process_fails_the_program_and_leaves_no_process(tmp_path, monkeypatch):
  manager, events = _manager(monkeypatch)
  start_node(manager, tmp_path, 'learner/0', 'time.sleep(600)')
  log_path = start_node(manager, tmp_path, 'actor/0', 'time.sleep(1.0); sys.exit(3)')
  os.remove(log_path)
  os.mkdir(log_path)  # Its log cannot be opened to append: the restart cannot start the process.
  learner = manager.node_processes['learner/0']
  try:
    with pytest.raises(RuntimeError, match=r'actor/0 exited with code 3 and could not be restarted in place'):
      manager.wait()
    manager.wait(raise_error=False)  # As the launcher's waiter does: until every process has exited.
  finally:
    if learner.poll() is None:
      learner.kill()
  assert learner.returncode == -signal.SIGTERM  # The program was stopped: no process of the launch is left.
  assert events == [] and manager.node_processes['actor/0'].returncode == 3


def test_a_restart_record_that_cannot_be_written_is_a_warning_and_the_restart_stands(tmp_path, monkeypatch, capfd):
  layout = RunLayout(str(tmp_path / 'run'))
  os.makedirs(layout.records_file(RunLayout.RESTARTS, 'launcher'))  # A directory where the record file goes.
  records = supervisor.RestartRecords(layout, attempt=1)
  manager, _ = _manager(monkeypatch, on_restart=records.restarted)
  log_path = start_node(manager, tmp_path, 'actor/0',
                    'print("run", RESTART, flush=True); sys.exit(3 if RESTART < 1 else 0)')
  manager.wait()
  assert [int(run[1]) for run in _runs(log_path)] == [0, 1]
  out, err = capfd.readouterr()
  assert 'Node actor/0 exited with code 3; restarted it in place (restart 1)' in out
  assert 'Warning: actor/0: ' in err and 'Is a directory' in err
  assert 'launcher.jsonl' in err and '(the run goes on)' in err


@pytest.mark.slow
def test_an_evaluator_failing_past_its_restarts_is_disabled_and_recorded_while_the_run_goes_on(tmp_path,
                                                                                                 monkeypatch):
  layout = RunLayout(str(tmp_path / 'run'))
  records = supervisor.RestartRecords(layout, attempt=2)
  manager, _ = _manager(monkeypatch, max_restarts=1, on_restart=records.restarted, on_disable=records.disabled)
  learner_log = start_node(manager, tmp_path, 'learner/0', 'time.sleep(3.0); print("run", RESTART, "done", flush=True)')
  start_node(manager, tmp_path, 'evaluator/0', 'sys.exit(7)')
  manager.wait()  # No failure: the learner ran to its end.
  assert _runs(learner_log) == [['run', '0', 'done']]
  assert manager.disabled == {'evaluator/0': 7}
  restart, disabled = layout.records(RunLayout.RESTARTS)
  assert restart['node'] == 'evaluator/0' and restart['restart'] == 1 and 'disabled' not in restart
  assert disabled['node'] == 'evaluator/0' and disabled['disabled'] is True and disabled['restart'] == 1
  assert disabled['exit_code'] == 7 and disabled['attempt'] == 2 and disabled['cause'] == 'exited with code 7'


# A node that takes `seconds` to stop after its SIGTERM.
_SLOW_STOP = ('import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (signal.signal(signal.SIGTERM, '
              'signal.SIG_IGN), time.sleep({}), sys.exit(0))); time.sleep(600)')
_TWO_LAUNCHES = textwrap.dedent('''
    import os, signal, sys, time
    from absl import flags
    from launchpad import flags as _  # Defines --lp_termination_notice_secs.
    from launchpad.launch import worker_manager
    from launch.program import supervisor
    flags.FLAGS(['launcher', '--lp_termination_notice_secs=4'])
    slow_stop = {slow_stop!r}
    # Launch 1: the learner fails; the replay takes 2 s to stop, 2 s of the first manager's countdown.
    first = supervisor.SupervisedWorkerManager(0, lambda *_: None)
    first.process_worker('learner/0', [sys.executable, '-c', 'import sys, time; time.sleep(1); sys.exit(5)'],
                         env=dict(os.environ))
    first.process_worker('replay/0', [sys.executable, '-c', slow_stop.format(2)], env=dict(os.environ))
    try:
      first.wait()
    except RuntimeError:
      first.wait(raise_error=False)
    supervisor.end_launch(first, notice_s=4)
    # Launch 2, as launch.train relaunches: then a Ctrl-C, and a node that takes 3 s of its 4 s notice to stop.
    worker_manager._HAS_MAIN_MANAGER = False
    second = supervisor.SupervisedWorkerManager(0, lambda *_: None)
    second.process_worker('learner/0', [sys.executable, '-c', slow_stop.format(3)], env=dict(os.environ))
    time.sleep(1)  # Its handler in place.
    os.kill(os.getpid(), signal.SIGINT)
    second.wait()
    print('stopped within the notice', flush=True)
''')


@pytest.mark.slow
def test_after_a_relaunch_a_ctrl_c_gets_the_full_termination_notice():
  """The first launch's manager must not count down its own (shorter) remainder and kill the launcher."""
  script = _TWO_LAUNCHES.format(slow_stop=_SLOW_STOP)
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert 'stopped within the notice' in result.stdout


_NODE_PAST_THE_NOTICE = textwrap.dedent('''
    import os, signal, sys, time
    from absl import flags
    from launchpad import flags as _  # Defines --lp_termination_notice_secs.
    from launch.program import supervisor
    flags.FLAGS(['launcher', '--lp_termination_notice_secs=2'])
    manager = supervisor.SupervisedWorkerManager(0, lambda *_: None)
    manager.process_worker('actor/0', [sys.executable, '-c', 'import signal, time; '
                                       'signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'],
                           env=dict(os.environ))
    node = manager.node_processes['actor/0']
    time.sleep(1)  # Its handler in place.
    os.kill(os.getpid(), signal.SIGINT)
    manager.wait(raise_error=False)
    print('launcher alive; node', node.wait(), flush=True)
''')


@pytest.mark.slow
def test_a_node_that_outlives_the_notice_is_killed_and_the_launcher_is_not():
  """Past the termination notice Launchpad kills what is left; by default the launcher too (exit -9, its exit code
  and report lost). Ours kills the node and goes on."""
  result = subprocess.run([sys.executable, '-c', _NODE_PAST_THE_NOTICE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert f'launcher alive; node {-signal.SIGKILL}' in result.stdout


def _launcher_with_a_node():
  """A stand-in launcher (a process) with a child (its node); (launcher, node pid)."""
  code = ('import subprocess, sys, time; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); '
          'print(p.pid, flush=True); time.sleep(600)')
  launcher = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  return launcher, int(launcher.stdout.readline())


def _watchdog(launcher_pid: int, launcher_created: float) -> subprocess.Popen:
  """The watchdog, as `watchdog.start` runs it, its pipe closed at once (the launcher is gone for it)."""
  read_end, write_end = os.pipe()
  dog = subprocess.Popen([sys.executable, '-m', 'launch.program.watchdog', str(launcher_pid), repr(launcher_created),
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


@pytest.mark.slow
def test_a_node_started_just_before_its_launcher_is_killed_is_ended_too():
  """The launcher starts its watchdog, then a node, and is killed at once (kill -9), before the watchdog's next
  look at its children: the node, now an orphan, is found by the launcher's mark in its environment and ended."""
  code = textwrap.dedent('''
      import os, signal, subprocess, sys
      from launch.program import watchdog
      watchdog.start(grace_s=2)
      node = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
      print(node.pid, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
      ''')
  launcher = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
  node = psutil.Process(int(launcher.stdout.readline()))
  launcher.wait(timeout=30)
  try:
    node.wait(timeout=30)  # Ended: SIGTERM at once (the grace is for one that does not stop).
  finally:
    if node.is_running():
      node.kill()


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
  wait_for(lambda: run_lock.read(layout.lock).renewed != written, 30, 'the lock to be renewed')
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


def _plant_records(layout: RunLayout, stream: str, writer: str, records) -> None:
  path = layout.records_file(stream, writer)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    f.writelines(json.dumps({'time': time.time(), **record}) + '\n' for record in records)


def test_a_run_is_finished_only_with_every_scheduled_probe_point_probed_or_listed_skipped(tmp_path):
  config = ExperimentConfig(run_dir=str(tmp_path), max_learner_steps=300, probe_every=150)
  layout = config.layout
  assert completion.scheduled_probe_points(150, 300) == [0, 150, 300]
  assert completion.scheduled_probe_points(150, 230) == [0, 150, 230]
  assert completion.scheduled_probe_points(0, 300) == []
  _plant_records(layout, RunLayout.LEARNER, 'learner', [{'learner_step': 250}])
  assert not completion.program_completed(config) and completion.training_end(config) is None
  _plant_records(layout, RunLayout.LEARNER, 'learner', [{'learner_step': 300}])
  # The learner is done and the evaluator stopped ('finished' is what it writes at any exit), one point probed.
  with open(layout.evaluator_status, 'w') as f:
    json.dump({'state': 'finished'}, f)
  _plant_records(layout, RunLayout.PROBES, 'evaluator', [{'learner_step': 0}])
  assert not completion.program_completed(config) and completion.unprobed_points(config, 300) == [150, 300]
  assert not completion.work_left(config, evaluator=False)  # All but the evaluator's part.
  _plant_records(layout, RunLayout.PROBES, 'evaluator', [{'learner_step': 300, 'skipped_probe_steps': [150]}])
  assert completion.program_completed(config)
  # A diverged learner's last finite step is the end of its schedule.
  diverged = ExperimentConfig(run_dir=str(tmp_path / 'diverged'), max_learner_steps=300, probe_every=150)
  _plant_records(diverged.layout, RunLayout.LEARNER, 'learner', [{'learner_step': 230, 'diverged': True}])
  _plant_records(diverged.layout, RunLayout.PROBES, 'evaluator', [{'learner_step': 0}, {'learner_step': 150}])
  assert completion.unprobed_points(diverged, completion.training_end(diverged)) == [230]


def test_the_coordinator_ends_a_launch_when_no_work_is_left_or_only_a_disabled_evaluators(tmp_path):
  config = ExperimentConfig(run_dir=str(tmp_path), max_learner_steps=300, probe_every=150)
  layout = config.layout
  coordinator = completion.Coordinator(config, attempt=2, poll_s=0.01)
  _plant_records(layout, RunLayout.LEARNER, 'learner', [{'learner_step': 300}])
  _plant_records(layout, RunLayout.PROBES, 'evaluator', [{'learner_step': 0}])
  assert not coordinator.over()  # Probe points 150 and 300 are left.
  # A stop request ends the wait without the launch being over.
  assert not coordinator.wait_until_over(should_stop=lambda: True)
  # The evaluator disabled in an earlier launch: this launch's evaluator still has the points to probe.
  _plant_records(layout, RunLayout.RESTARTS, 'launcher', [{'node': 'evaluator/0', 'disabled': True, 'attempt': 1}])
  assert not coordinator.over()
  # Disabled in this launch: training and evaluation done, the launch is over (a relaunch probes the points).
  _plant_records(layout, RunLayout.RESTARTS, 'launcher', [{'node': 'evaluator/0', 'disabled': True, 'attempt': 2}])
  assert coordinator.over() and coordinator.wait_until_over(should_stop=lambda: False)
  assert not completion.program_completed(config)  # The run is not finished: its probes are missing.
  fresh = completion.Coordinator(config, attempt=3, poll_s=0.01)
  _plant_records(layout, RunLayout.PROBES, 'evaluator', [{'learner_step': 150}, {'learner_step': 300}])
  assert fresh.over() and completion.program_completed(config)
