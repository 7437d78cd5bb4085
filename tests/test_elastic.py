"""Actors joining a live run from another process (`launch.attach_actors`), and their claimed ids."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from agents import checkpointing
from launch.program.attach import claim_actor_ids
from probes.records.run_dir import MAX_ACTORS, RunLayout
from tests.conftest import SMALL_RUN, node_processes, python_module, start_node, train, wait_for


def _manager(monkeypatch, restarts, max_restarts=2):
  from launchpad.launch import worker_manager
  from launch.program.supervisor import Backoff, SupervisedWorkerManager
  monkeypatch.setattr(worker_manager, '_HAS_MAIN_MANAGER', True)  # No kill countdown in the test's process.
  return SupervisedWorkerManager(max_restarts, lambda *restart: restarts.append(restart), kill_main_thread=False,
                                 backoff=Backoff(first_s=0.1, max_s=0.1))


def test_the_supervisor_restarts_a_failed_actor_in_place_as_often_as_allowed_then_fails(tmp_path, monkeypatch):
  restarts = []
  manager = _manager(monkeypatch, restarts)
  log_path = start_node(manager, tmp_path, 'actor/0', 'print("run", RESTART); sys.exit(3)')
  with pytest.raises(RuntimeError, match='exited with code 3'):  # The third failure is Launchpad's again.
    manager.wait()
  assert restarts == [('actor/0', 3, 1), ('actor/0', 3, 2)]
  with open(log_path) as f:
    log = f.read()
  assert [line for line in log.splitlines() if line.startswith('run')] == ['run 0', 'run 1', 'run 2']
  assert 'actor/0 exited with code 3; restart 2.' in log  # Appended: the first process's output stays.
  assert manager.node_processes['actor/0'].returncode == 3


def test_the_supervisor_restarts_no_learner_and_no_clean_exit(tmp_path, monkeypatch):
  from launch.program.supervisor import exit_cause
  restarts = []
  manager = _manager(monkeypatch, restarts)
  start_node(manager, tmp_path, 'actor/1', 'print("run", RESTART); sys.exit(0)')
  manager.wait()  # An actor that ends cleanly stays ended.
  manager = _manager(monkeypatch, restarts)
  start_node(manager, tmp_path, 'learner/0', 'print("run", RESTART); sys.exit(5)')
  with pytest.raises(RuntimeError, match='exited with code 5'):
    manager.wait()
  assert restarts == []
  assert exit_cause(-9) == 'killed by SIGKILL' and exit_cause(2) == 'exited with code 2'


def test_attached_actor_ids_are_claimed_once_above_the_programs_actors(tmp_path):
  layout = RunLayout(str(tmp_path))
  assert claim_actor_ids(layout, 2) == [MAX_ACTORS, MAX_ACTORS + 1]
  assert claim_actor_ids(layout, 1) == [MAX_ACTORS + 2]
  # A claim made meanwhile by another process (host) is skipped; released ids are not reused.
  open(layout.attached_actor(MAX_ACTORS + 3), 'x').close()
  os.remove(layout.attached_actor(MAX_ACTORS + 2))
  assert claim_actor_ids(layout, 2) == [MAX_ACTORS + 4, MAX_ACTORS + 5]


def test_an_actors_counters_go_on_from_its_own_last_record(tmp_path):
  from launch.program.graph import actor_progress, actor_writer
  layout = RunLayout(str(tmp_path))
  for actor_id, episode in [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (2, 1)]:
    logger = layout.logger(RunLayout.ACTORS, actor_writer(actor_id), tensorboard=False,
                           extra={'actor_id': actor_id})
    logger({'episode': episode, 'env_steps': 100 * episode})
    logger.close()
  assert [actor_progress(layout, i) for i in (0, 1, 2, 3)] == [([3], 300), ([2], 200), ([1], 100), ([], 0)]


def _replay_items(address: str) -> int:
  import reverb
  return reverb.Client(address).server_info(timeout=30)['probe'].current_size


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_attached_actors_feed_the_replay_under_their_own_ids_and_leave_the_run_running(tmp_path):
  run_dir = str(tmp_path / 'run')
  layout = RunLayout(run_dir)
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every'))]
  # In a process group of its own, as a terminal's foreground job is: its hang-up goes to the whole group. Its
  # SIGHUP at the default, as a terminal's job has it: a suite run under nohup would hand its children an ignored
  # one, and a launcher that finds SIGHUP ignored goes on (as it should under nohup).
  previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
  try:
    run = python_module('launch.train', f'--run_dir={run_dir}', '--launch_type=local_mp', *flags,
                        '--max_learner_steps=100000', '--probe_every=0', start_new_session=True)
  finally:
    signal.signal(signal.SIGHUP, previous)
  learner, actors = lambda: layout.records('learner'), lambda: layout.records('actors')
  built_in, attach = [], None
  try:
    wait_for(lambda: os.path.exists(layout.addresses) and learner(), 180, 'the run to learn')
    # The same command again, on the live run directory: refused, naming the launcher that holds it.
    second = train(run_dir, '--launch_type=local_mp', *flags, '--max_learner_steps=100000', '--probe_every=0',
                   timeout=180)
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert f'is in use by another launch of the run: pid {run.pid} on {socket.gethostname()}, since ' in second.stderr
    assert layout.attempts() == 1 and 'Starting' not in second.stdout
    replay = _read_json(layout.addresses)['replay']
    # The program's actors pause: from now on only the attached ones can add to the replay.
    built_in = node_processes(run_dir, 'actor/0') + node_processes(run_dir, 'actor/1')
    assert len(built_in) == 2
    for process in built_in:
      process.suspend()
    time.sleep(2.0)  # What they had in flight lands.
    before = _replay_items(replay)
    attach = python_module('launch.attach_actors', f'--run_dir={run_dir}', '--num_actors=2')
    attached = lambda: [r for r in actors() if r['actor_id'] >= MAX_ACTORS]
    wait_for(lambda: {r['actor_id'] for r in attached()} == {MAX_ACTORS, MAX_ACTORS + 1}, 180,
              'an episode of each attached actor')
    acted = sum(max(r['env_steps'] for r in attached() if r['actor_id'] == i) for i in (MAX_ACTORS, MAX_ACTORS + 1))
    # An episode is logged once its steps are inserted, all but the writer's last 8 in flight.
    assert _replay_items(replay) - before >= acted - 2 * 8 and acted >= 200
    assert all(r['attempt'] == 1 and r['episode_length'] == 100 for r in attached())

    attach.send_signal(signal.SIGINT)  # Ctrl-C: the attached actors stop, the run does not.
    out, err = attach.communicate(timeout=60)
    assert attach.returncode == 0, out + err[-3000:]
    assert 'the run is untouched' in out
    for process in built_in:
      process.resume()
    step = learner()[-1]['learner_step']
    wait_for(lambda: learner()[-1]['learner_step'] >= step + 100, 120, 'the run to go on learning')
    assert run.poll() is None and layout.attempts() == 1
    assert not layout.records('restarts')
  finally:
    for process in built_in:
      if process.is_running():
        process.resume()
    if attach is not None and attach.poll() is None:
      attach.kill()
  nodes = node_processes(run_dir)
  hung_up = time.time()
  os.killpg(run.pid, signal.SIGHUP)  # The terminal hangs up (a dropped SSH session): a stop, as SIGTERM is.
  try:
    out, err = run.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    os.killpg(run.pid, signal.SIGKILL)  # The group this test started (its watchdog ends the nodes).
    raise
  assert run.returncode == 130, out[-3000:] + err[-3000:]
  assert 'Interrupted' in out and 'resume' in err
  wait_for(lambda: not node_processes(run_dir), 15, 'the nodes to end')
  # The nodes outlived the hang-up and stopped when the launcher stopped them: each saved its final checkpoint.
  assert len(nodes) == 4 and all(node.pid != run.pid for node in nodes)
  last = learner()[-1]['learner_step']
  assert checkpointing.latest_loadable(layout.checkpoints)[1][0] == last
  replay = _read_json(layout.replay_status)
  assert replay['state'] == 'replay checkpoint written' and replay['time'] > hung_up
  assert not os.path.exists(layout.lock)  # Released: the run directory is free for the next launch.
