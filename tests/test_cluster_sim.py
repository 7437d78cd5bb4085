"""A cluster on one machine (launch/simulation/netns.py, launch/cluster_sim.py): hosts in network namespaces, the
Vertex AI program and attached nodes across them, partitions and host deaths; and what they forced: attached nodes that
rejoin a run through partitions and relaunches (launch/program/attach.py), inserts that follow a moved replay.

Skipped, with the reason, where network namespaces cannot be made (not root, no iproute2)."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from launch.simulation import netns
from probes.records.run_dir import MAX_ACTORS, RunLayout
from tests.conftest import ROOT, SMALL_RUN, run_module, wait_for

try:
  netns.check_available()
  UNAVAILABLE = ''
except netns.Unavailable as e:
  UNAVAILABLE = str(e)
needs_namespaces = pytest.mark.skipif(bool(UNAVAILABLE), reason=f'network namespaces cannot be made: {UNAVAILABLE}')

SERVER = ('import socket, sys\ns = socket.socket(); s.bind(("0.0.0.0", 5000)); s.listen()\nprint("up", flush=True)\n'
          'while True:\n  c, _ = s.accept(); c.sendall(b"x"); c.close()\n')
CLIENT = ('import socket, sys, time\nstart = time.perf_counter()\ntry:\n'
          '  socket.create_connection((sys.argv[1], 5000), timeout=float(sys.argv[2])).recv(1)\n'
          '  print("answered", time.perf_counter() - start)\n'
          'except OSError as e:\n  print("failed", type(e).__name__)\n')


def _dial(net: netns.Cluster, host: netns.Host, address: str, timeout_s: float = 10.0):
  """('answered', seconds) or ('failed', error) of a connection from `host` to `address`'s test server."""
  result = subprocess.run(['ip', 'netns', 'exec', host.namespace, sys.executable, '-c', CLIENT, address,
                           str(timeout_s)], capture_output=True, text=True, timeout=60)
  word, value = result.stdout.split()
  return word, (float(value) if word == 'answered' else value)


def _root_links() -> str:
  return subprocess.run(['ip', '-o', 'link'], capture_output=True, text=True).stdout


@pytest.mark.slow
@needs_namespaces
def test_hosts_reach_each_other_on_their_own_bridge_only_and_links_cut_and_delay():
  root_before = _root_links()
  with netns.Cluster(2) as net:
    a, b = net.hosts
    assert [a.address, b.address] == ['198.18.0.1', '198.18.0.2']
    assert _root_links() == root_before  # Nothing in the machine's own namespace: no way out, no way in.
    for host in net.hosts:
      routes = subprocess.run(['ip', '-n', host.namespace, 'route'], capture_output=True, text=True).stdout
      assert routes.split() == ['198.18.0.0/24', 'dev', 'eth0', 'proto', 'kernel', 'scope', 'link', 'src',
                                host.address]  # No default route.
    server = net.popen(a, [sys.executable, '-c', SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == 'up'
    assert _dial(net, b, a.address)[0] == 'answered'
    net.partition(b)
    assert _dial(net, b, a.address, timeout_s=2.0) == ('failed', 'TimeoutError')  # Silence, not a refusal.
    net.heal(b)  # Until ARP, failed during the partition, resolves again, a new connection has no route to host.
    wait_for(lambda: _dial(net, b, a.address)[0] == 'answered', 20, 'the healed link to carry a connection')
    net.set_latency(20, [b])  # A connection takes a round trip: at least 2 x 20 ms.
    word, seconds = _dial(net, b, a.address)
    assert word == 'answered' and seconds >= 0.04
    relay = net.delay_process
    net.set_latency(0, [b])
    assert relay.poll() is not None and _dial(net, b, a.address)[0] == 'answered'
    names = netns.namespaces(net.name + '-')
    assert len(names) == 3
  assert not set(names) & set(netns.namespaces()) and server.poll() is not None


@pytest.mark.slow
@needs_namespaces
def test_a_harness_killed_with_kill_9_leaves_no_namespace_or_process_and_cleanup_finds_leftovers():
  script = ('import subprocess, sys, time\nfrom launch.simulation import netns\nnet = netns.Cluster(2)\n'
            'net.popen(net.hosts[1], ["sleep", "600"])\nprint(net.name, flush=True)\ntime.sleep(600)\n')
  harness = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  name = harness.stdout.readline().strip()
  # `popen` returns once the process is started; it enters its host's namespace a moment later.
  wait_for(lambda: netns.pids_in(f'{name}-h1'), 30, 'the harness\'s process to enter its host')
  (sleeper,) = netns.pids_in(f'{name}-h1')
  harness.kill()
  harness.wait()
  # Its reaper removes the namespaces and the processes in them within seconds.
  wait_for(lambda: not netns.namespaces(name + '-'), 20, 'the killed harness\'s namespaces to go')
  wait_for(lambda: not os.path.exists(f'/proc/{sleeper}'), 10, 'the killed harness\'s processes to end')
  # Left by a harness whose reaper died too (pid 4194304 is above the kernel's pid_max: dead): removed by name.
  leftover = f'{netns.PREFIX}4194304-h0'
  subprocess.run(['ip', 'netns', 'add', leftover], check=True)
  result = subprocess.run([sys.executable, '-m', 'launch.cluster_sim', '--cleanup'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0 and leftover in result.stdout, result.stdout + result.stderr[-2000:]
  assert leftover not in netns.namespaces()


@pytest.mark.slow
@needs_namespaces
def test_a_second_cluster_of_one_harness_outlives_the_first_ones_reaper():
  with netns.Cluster(1) as first:
    pass
  with netns.Cluster(1) as second:
    assert second.name != first.name
    time.sleep(3.0)  # The first cluster's reaper, woken when it closed, has removed what it had to by now.
    assert len(netns.namespaces(second.name + '-')) == 2


class _FakeLearner:
  """A Courier client of a learner that answers once `answering` holds its address."""
  answering = set()
  calls = []

  def __init__(self, address, **kwargs):
    del kwargs
    self.address = address

  def get_step(self):
    _FakeLearner.calls.append(self.address)
    if self.address not in _FakeLearner.answering:
      raise RuntimeError(f'failed to connect to all addresses ({self.address})')
    return 7


def _live_run(tmp_path, monkeypatch, rejoin_timeout_s=60.0):
  from launch.program import attach
  from probes.records.run_dir import ExperimentConfig, write_or_check_config
  config = ExperimentConfig(run_dir=str(tmp_path / 'run'))
  write_or_check_config(config)
  addresses = {'learner': 'old:1', 'replay': 'old:2'}
  with open(config.layout.addresses, 'w') as f:
    json.dump(addresses, f)
  monkeypatch.setattr(attach.courier, 'Client', _FakeLearner)
  monkeypatch.setattr(attach, 'FIRST_BACKOFF_S', 0.1)
  _FakeLearner.answering, _FakeLearner.calls = set(), []
  return config, attach.LiveRun(config, addresses, call_timeout_s=1.0, rejoin_timeout_s=rejoin_timeout_s)


def test_an_attached_process_retries_the_learner_with_backoff_and_follows_a_relaunch_to_its_new_addresses(
    tmp_path, monkeypatch):
  config, run = _live_run(tmp_path, monkeypatch)
  relaunched = {'learner': 'new:3', 'replay': 'new:4', 'written_at': 2.0}

  def relaunch():  # The learner's host died; the relaunched run publishes new ports a moment later.
    time.sleep(0.5)
    with open(config.layout.addresses, 'w') as f:
      json.dump(relaunched, f)
    _FakeLearner.answering.add('new:3')

  import threading
  threading.Thread(target=relaunch, daemon=True).start()
  start = time.time()
  assert run.call('get_step') == 7
  assert run.replay_address == 'new:4' and _FakeLearner.calls[-1] == 'new:3'
  tries = _FakeLearner.calls.count('old:1')
  assert 2 <= tries <= 5 and time.time() - start < 10  # 0.1, 0.2, 0.4 ... s apart: backoff, not a busy loop.


def test_an_attached_process_stops_retrying_when_the_run_is_over_or_after_its_rejoin_timeout(tmp_path, monkeypatch):
  from launch.program.attach import LearnerGone, RunFinished
  config, run = _live_run(tmp_path, monkeypatch, rejoin_timeout_s=1.0)
  start = time.time()
  with pytest.raises(LearnerGone, match=re.escape('the learner at old:1 has not answered for 1 s '
                                                  '(--rejoin_timeout_s=1)')):
    run.call('get_step')
  assert 1.0 <= time.time() - start < 5
  # A run whose launch stopped at its last step is over: no retry.
  logger = config.layout.logger(RunLayout.LEARNER, 'learner', tensorboard=False)
  logger({'learner_step': config.max_learner_steps})
  logger.close()
  with open(config.layout.addresses, 'w') as f:
    json.dump({'learner': 'old:1', 'replay': 'old:2', 'stopped_at': 1.0}, f)
  _FakeLearner.calls = []
  with pytest.raises(RunFinished, match='the run finished'):
    run.call('get_step')
  assert len(_FakeLearner.calls) == 1


@pytest.mark.slow
def test_inserts_follow_a_replay_that_moved_to_a_new_address():
  """An attached actor's replay restarts elsewhere (a relaunch: new ports): the sink writes there."""
  import numpy as np
  import portpicker
  import reverb
  from agents.types import Transition
  from launch.program import replay

  def server():
    tables = [reverb.Table(name, reverb.selectors.Uniform(), reverb.selectors.Fifo(), 1000,
                           reverb.rate_limiters.MinSize(1)) for name in (replay.REPLAY_TABLE, replay.PROBE_TABLE)]
    return reverb.Server(tables, port=portpicker.pick_unused_port())

  old, new = server(), server()
  where = {'address': f'localhost:{old.port}'}
  sink = replay.ReverbSink(reverb.Client(where['address']), address=lambda: where['address'], recheck_s=0.5)
  transition = Transition(np.zeros(2, np.float32), np.int32(0), np.float32(1), np.float32(1), np.ones(2, np.float32))
  size = lambda s: reverb.Client(f'localhost:{s.port}').server_info(timeout=5)[replay.PROBE_TABLE].current_size
  for _ in range(3):
    sink(transition)
  wait_for(lambda: size(old) == 3, 10, 'the first inserts')
  old.stop()
  where['address'] = f'localhost:{new.port}'
  for _ in range(20):  # The first waits for the old replay, then asks where it is.
    sink(transition)
  sink.close()
  assert 20 - 8 <= size(new) <= 20  # All but what the old writer held unacknowledged.
  new.stop()


def sim(tmp_path, *args, timeout=900):
  """`launch.cluster_sim` on the small run: (result, events, run layout)."""
  run_dir, sim_dir = tmp_path / 'run', tmp_path / 'sim'
  flags = [f for f in SMALL_RUN if not f.startswith(('--num_actors', '--max_learner_steps', '--probe_every',
                                                      '--checkpoint_every'))]
  result = run_module('launch.cluster_sim', f'--run_dir={run_dir}', f'--sim_dir={sim_dir}', *flags, *args,
                      '--timeout_s=800', timeout=timeout)
  events = []
  if (sim_dir / 'events.jsonl').exists():
    events = [json.loads(line) for line in (sim_dir / 'events.jsonl').read_text().splitlines()]
  return result, events, RunLayout(str(run_dir))


def _times(events, kind):
  return [e for e in events if e['event'] == kind]


def _episodes(layout, actor_id, start, end=float('inf')):
  return [r for r in layout.records('actors') if r['actor_id'] == actor_id and start < r['time'] < end]


@needs_namespaces
@pytest.mark.slow
def test_the_vertex_ai_program_on_four_hosts_through_partitions_and_its_learner_hosts_death(tmp_path):
  # Training long enough to outlast both partitions and the wait for a probe between them (12 s each, a probe point
  # every 6,000 steps: 18,000 steps hold them at up to about 400 steps a second, where this machine alone makes 250;
  # at 9,000 steps a run alone ended before the learner's host could die), and probes long enough to be seen (400
  # steps: seconds): the learner's host dies while it trains.
  result, events, layout = sim(tmp_path, '--num_actors=4', '--actor_hosts=2', '--max_learner_steps=18000',
                               '--probe_every=6000', '--probe_steps=400', '--checkpoint_every=500',
                               '--replay_checkpoint_every_minutes=0.2', '--partition_s=12',
                               '--scenario=partition_actor_host,partition_evaluator_host,kill_learner_host')
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  (job,) = _times(events, 'job')
  assert job['nodes'] == {'replay-0': 0, 'learner-0': 0, 'evaluator-0': 1, 'actor-0': 2, 'actor-1': 2,
                          'actor-2': 3, 'actor-3': 3}
  assert all(address.startswith('198.18.0.') for pool in job['cluster_spec'].values() for address in pool)
  with open(layout.addresses) as f:  # A replica's own address, as its peers dial it.
    assert json.load(f)['learner'] == job['cluster_spec']['workerpool1'][0]

  # Every probe point probed once; every actor's records present.
  assert [r['learner_step'] for r in layout.records('probes')] == [0, 6000, 12000, 18000]
  assert not any(r.get('skipped_probe_steps') for r in layout.records('probes'))
  assert {r['actor_id'] for r in layout.records('actors')} == {0, 1, 2, 3}

  (cut, evaluator_cut), (healed, evaluator_healed) = _times(events, 'partition'), _times(events, 'heal')
  # The actor host's partition: the learner went on with the other host's actors, as fast as their inserts let the
  # rate limiter sample (8 samples per insert, batches of 32: one step per 4 of their transitions); the cut-off
  # actors logged nothing meanwhile, and rejoined without dying.
  assert cut['host'] == 3 and evaluator_cut['host'] == 1
  inserted = sum(_env_steps(layout, a, healed['time']) - _env_steps(layout, a, cut['time']) for a in (0, 1))
  learned = healed['learner_step'] - cut['learner_step']
  assert learned >= 0.5 * inserted / 4 - 2 * 50, (learned, inserted)
  for actor_id in (2, 3):
    assert not _episodes(layout, actor_id, cut['time'] + 5, healed['time'])  # (an episode in flight may land)
    assert _episodes(layout, actor_id, healed['time'], evaluator_cut['time'] + 60)
  # The evaluator's host cut off during a probe: training went on (the learner learned meanwhile), and that point
  # was probed once (above).
  assert evaluator_healed['learner_step'] > evaluator_cut['learner_step']

  # The learner's host died: its replicas came back in place, the learner from its checkpoint (at most one
  # checkpoint interval lost), the replay from its checkpoint; every actor rejoined, none died.
  (kill,) = _times(events, 'kill_host')
  # 0: the checkpoint of the logged step landed between the scenario's last look and the kill.
  assert kill['host'] == 0 and 0 <= kill['learner_step'] - kill['checkpoint_step'] <= 500
  assert sorted(e['task'] for e in _times(events, 'died')) == ['learner-0', 'replay-0']
  assert {e['task'] for e in _times(events, 'start') if e['start'] == 2} == {'learner-0', 'replay-0'}
  logs = tmp_path / 'sim' / 'logs'
  assert f'Learner restored step {kill["checkpoint_step"]} from' in (logs / 'learner-0.log').read_text()
  assert re.search(r'Replay restored \{.*\} from', (logs / 'replay-0.log').read_text())
  for actor_id in range(4):
    assert _episodes(layout, actor_id, kill['time'])
  first = [r for r in layout.records('learner') if r['time'] > kill['time']][0]
  assert first['learner_step'] == kill['checkpoint_step'] + 50  # --log_every: it went on from the checkpoint.
  # Nothing Reverb acknowledged was lost, the cut-off actors' included: the replay's checkpoint (written after the
  # actor host's partition, restored after the death) holds every transition the actors had logged by then, but
  # for each one's last 8 in flight.
  with open(layout.replay_status) as f:
    status = json.load(f)
  written = _checkpoint_time(status['restored_from'])
  assert healed['time'] < written < kill['time']
  logged = sum(_env_steps(layout, a, written) for a in range(4))
  assert status['restored_items']['replay'] >= logged - 4 * 8, (status, logged)


def _env_steps(layout, actor_id, by):
  """An actor's env steps at its last episode logged before `by`."""
  return max([r['env_steps'] for r in _episodes(layout, actor_id, 0, by)] or [0])


def _checkpoint_time(path: str) -> float:
  """When Reverb wrote a checkpoint, from its directory's name (`2026-12-03T21:22:28.437342243+00:00`)."""
  import datetime
  stamp = re.match(r'(.*T\d\d:\d\d:\d\d\.\d{6})\d*(\+00:00)$', os.path.basename(path))
  return datetime.datetime.fromisoformat(stamp[1] + stamp[2]).timestamp()


@needs_namespaces
@pytest.mark.slow
def test_attached_nodes_on_other_hosts_rejoin_a_relaunched_run_that_a_fifth_host_can_reach(tmp_path):
  result, events, layout = sim(tmp_path, '--mode=attached', '--outsider', '--num_actors=1', '--attached_actors=2',
                               '--max_learner_steps=6000', '--probe_every=0', '--checkpoint_every=500',
                               '--replay_checkpoint_every_minutes=0.2',
                               '--scenario=reach_from_outsider,kill_learner_host')
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  # A host in no role, on the same bridge, reaches the run's learner and replay: nothing but the network keeps
  # others out (docs/distributed.md: "Who can reach a run").
  (reached,) = _times(events, 'outsider_reached')
  assert reached['host'] == 4 and reached['learner'].startswith('198.18.0.1:')
  assert reached['learner_step'] >= 0 and reached['replay_items']['replay'] >= 0 and 'error' not in reached

  (kill,) = _times(events, 'kill_host')
  assert 0 <= kill['learner_step'] - kill['checkpoint_step'] <= 500
  relaunched = [e for e in _times(events, 'start') if e['task'] == 'launcher' and e['start'] == 2]
  assert relaunched and os.path.isdir(layout.attempt_logs(2))
  with open(layout.addresses) as f:
    addresses = json.load(f)
  assert addresses['learner'] != reached['learner']  # The relaunch listens on new ports...
  # ... and the attached evaluator and actors found them in addresses.json: they never died, and acted and probed
  # after the relaunch until the run finished.
  assert not [e for e in _times(events, 'died') if e['task'] != 'launcher']
  assert {e['task'] for e in _times(events, 'ended')} >= {'attach_evaluator', 'attach_actors-2', 'attach_actors-3'}
  attached = {r['actor_id'] for r in layout.records('actors') if r['time'] > relaunched[0]['time']}
  assert attached >= {MAX_ACTORS, MAX_ACTORS + 1, MAX_ACTORS + 2, MAX_ACTORS + 3}
  # The attached evaluator (the run has none of its own) probed on its schedule, every 5,000 steps (the learner's
  # parameters as published at its first look at or past the step), before and after the relaunch (the end too if
  # it saw it before the run stopped: the run does not wait for it).
  probes = [r['learner_step'] for r in layout.evaluator('cluster').records('probes')]
  assert probes[0] == 0 and 5000 <= probes[1] < 6000 and probes == sorted(set(probes)) and probes[-1] <= 6000
  assert len(probes) <= 3
  for host in (2, 3):
    log = (tmp_path / 'sim' / 'logs' / f'attach_actors-{host}.log').read_text()
    assert 'The run was relaunched' in log and re.search(r'Actors .*: the (learner|run) finished\.', log)
