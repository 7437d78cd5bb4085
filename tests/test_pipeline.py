"""The learner's input pipeline (prefetching, Reverb batches), versioned parameter pulls, node placement."""

import os
import socket
import subprocess
import sys
import threading

from dm_env import specs
import jax
import numpy as np
import portpicker
import pytest
import reverb

from agents.actor import Actor
from agents.builder import make_agent
from agents.config import AgentConfig, ReplayConfig
from agents.learner import Learner, pull_when_newer
from agents.prefetch import Prefetcher, SourceFailed
from agents.types import Transition
from launch.program import placement
from launch.program import replay
from probes.records.run_dir import ExperimentConfig, LaunchConfig, RunLayout
from tests.conftest import ROOT, ThreeStepEpisodes, random_batches

SPEC = specs.Array((3,), np.uint8)
# A replay that serves nothing before 10 items, then up to 100 samples ahead of the 1-per-insert ratio.
SMALL_REPLAY = ReplayConfig(capacity=100, min_size=10, samples_per_insert=1.0, samples_per_insert_tolerance=10.0)


def numbered_batches(count: int, batch_size: int = 2):
  for i in range(count):
    column = np.arange(i * batch_size, (i + 1) * batch_size)
    yield Transition(observation=column[:, None].astype(np.uint8), action=column.astype(np.int32),
                     reward=column.astype(np.float32), discount=np.ones(batch_size, np.float32),
                     next_observation=column[:, None].astype(np.uint8))


def transition(i: int) -> Transition:
  return Transition(observation=np.full(3, i, np.uint8), action=np.int32(i % 2), reward=np.float32(i),
                    discount=np.float32(1.0), next_observation=np.full(3, i + 1, np.uint8))


def next_in_thread(iterator, timeout_s: float = 60.0):
  """`next(iterator)` in a thread, so that a pipeline that never answers fails the test instead of hanging it."""
  result = {}

  def take():
    try:
      result['value'] = next(iterator)
    except BaseException as e:  # pylint: disable=broad-except
      result['error'] = e

  thread = threading.Thread(target=take, daemon=True)
  thread.start()
  thread.join(timeout_s)
  assert not thread.is_alive(), f'next() did not return within {timeout_s} s'
  return result


def test_prefetched_batches_are_the_source_batches_in_order_on_the_device():
  prefetched = list(Prefetcher(numbered_batches(7), size=2))
  plain = list(numbered_batches(7))
  assert len(prefetched) == 7
  for got, expected in zip(prefetched, plain):
    assert isinstance(got.observation, jax.Array)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
  np.testing.assert_array_equal(prefetched[-1].action, [12, 13])


def test_a_failing_source_is_raised_after_the_batches_before_it():
  def source():
    yield from numbered_batches(2)
    raise OSError('disk gone')

  prefetcher = Prefetcher(source(), poll_seconds=0.05)
  assert len([next(prefetcher), next(prefetcher)]) == 2
  with pytest.raises(SourceFailed, match='disk gone'):
    next(prefetcher)


def test_reverb_batches_wait_on_one_dataset_through_rate_limiter_timeouts(monkeypatch):
  created = []
  dataset = replay._dataset  # pylint: disable=protected-access
  monkeypatch.setattr(replay, '_dataset', lambda *args, **kwargs: created.append(args) or dataset(*args, **kwargs))
  server = reverb.Server(replay.make_tables(SMALL_REPLAY, SPEC))
  client = reverb.Client(f'localhost:{server.port}')
  sink = replay.ReverbSink(client)
  for i in range(9):  # One short of min_size: the rate limiter holds every sample back.
    sink(transition(i))
  batches = replay.batch_iterator(f'localhost:{server.port}', 4, poll_seconds=0.1)
  taken = {}
  thread = threading.Thread(target=lambda: taken.update(next_in_thread(batches)), daemon=True)
  thread.start()
  thread.join(1.0)  # Ten polls of 0.1 s without a batch: the former iterator built ten datasets here.
  assert thread.is_alive() and not taken
  sink(transition(9))
  thread.join(60)
  batch = taken['value']
  assert batch.observation.shape == (4, 3) and set(np.asarray(batch.action)) <= {0, 1}
  assert all(0 <= r <= 9 for r in np.asarray(batch.reward))
  for _ in range(5):
    assert next_in_thread(batches)['value'].observation.shape == (4, 3)
  assert len(created) == 1
  batches.close()
  sink.close()


def test_reverb_batches_end_promptly_on_a_stop_request_while_the_replay_holds_samples_back():
  server = reverb.Server(replay.make_tables(SMALL_REPLAY, SPEC))
  stop = threading.Event()
  batches = replay.batch_iterator(f'localhost:{server.port}', 4, should_stop=stop.is_set, poll_seconds=0.1)
  threading.Timer(0.5, stop.set).start()
  result = next_in_thread(batches, timeout_s=30)
  assert isinstance(result['error'], StopIteration)
  assert isinstance(next_in_thread(batches)['error'], StopIteration)  # It stays ended.


SERVE = '''
import sys, time
import numpy as np
from dm_env import specs
import reverb
from agents.config import ReplayConfig
from launch.program import replay
from tests.conftest import ThreeStepEpisodes, random_batches
server = reverb.Server(replay.make_tables(ReplayConfig(capacity=100, min_size=10), specs.Array((3,), np.uint8)),
                       port=int(sys.argv[1]))
print('serving', flush=True)
time.sleep(600)
'''


@pytest.mark.slow
def test_a_killed_replay_is_a_clear_error_naming_it():
  port = portpicker.pick_unused_port()
  server = subprocess.Popen([sys.executable, '-c', SERVE, str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={**os.environ, 'PYTHONPATH': ROOT})
  try:
    assert server.stdout.readline().strip() == b'serving'
    batches = replay.batch_iterator(f'localhost:{port}', 4, poll_seconds=0.1, answer_timeout_s=1,
                                     dead_after_s=1.0)
    server.kill()
    server.wait()
    error = next_in_thread(batches)['error']
    assert isinstance(error, SourceFailed), error
    assert f'the replay at localhost:{port} does not answer' in str(error)
  finally:
    server.kill()
    server.wait()


def replay_node(run_dir: str) -> replay.ReplayNode:
  return replay.ReplayNode(lambda: replay.make_tables(SMALL_REPLAY, SPEC), RunLayout(run_dir), every_minutes=10)


def checkpointed_replay(run_dir: str, items: int = 50) -> str:
  """A replay checkpoint of `items` transitions in the run directory, written as the replay node writes it."""
  node = replay_node(run_dir)
  port = portpicker.pick_unused_port()
  server = node._server(port)  # pylint: disable=protected-access
  client = reverb.Client(f'localhost:{port}')
  sink = replay.ReverbSink(client)
  for i in range(items):
    sink(transition(i))
  sink.close()
  path = node._checkpoint(client)  # pylint: disable=protected-access
  server.stop()
  return path


def test_only_a_replay_checkpoint_whose_data_fails_to_load_is_moved_aside(tmp_path):
  layout = RunLayout(str(tmp_path))
  checkpoint = checkpointed_replay(layout.root)
  assert os.path.exists(os.path.join(checkpoint, replay.CHECKSUMS))
  # The port taken (a race with another process): the node fails, its valid checkpoint kept.
  with socket.socket() as taken:
    taken.bind(('0.0.0.0', 0))
    taken.listen()
    with pytest.raises((RuntimeError, ValueError)):
      replay_node(layout.root)._server(taken.getsockname()[1])  # pylint: disable=protected-access
  assert os.listdir(layout.replay_checkpoint) == [os.path.basename(checkpoint)] and not layout.records('problems')
  server = replay_node(layout.root)._server(portpicker.pick_unused_port())  # pylint: disable=protected-access
  assert server.localhost_client().server_info()[replay.REPLAY_TABLE].current_size == 50  # Restored.
  server.stop()
  # Items cut short: Reverb restores fewer without a word; the checksums tell.
  with open(os.path.join(checkpoint, 'items.tfrecord'), 'r+b') as f:
    f.truncate(100)
  server = replay_node(layout.root)._server(portpicker.pick_unused_port())  # pylint: disable=protected-access
  assert server.localhost_client().server_info()[replay.REPLAY_TABLE].current_size == 0  # Started empty.
  server.stop()
  problem, = layout.records('problems')
  assert 'items.tfrecord does not match its checksum' in problem['problem']
  aside = problem['action'].split('Moved to ')[1].split(';')[0]
  assert aside.startswith(layout.replay_checkpoint + '.damaged-') and os.listdir(aside)
  # A checkpoint from before checksums whose data Reverb cannot read: moved aside too.
  checkpoint = checkpointed_replay(layout.root)
  os.remove(os.path.join(checkpoint, replay.CHECKSUMS))
  with open(os.path.join(checkpoint, 'tables.tfrecord'), 'wb') as f:
    f.write(b'not a table')
  server = replay_node(layout.root)._server(portpicker.pick_unused_port())  # pylint: disable=protected-access
  assert server.localhost_client().server_info()[replay.REPLAY_TABLE].current_size == 0
  server.stop()
  assert 'does not load' in layout.records('problems')[-1]['problem']


def test_an_actor_pulls_parameters_only_after_the_learner_published_newer_ones():
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8, epsilon=0.0)
  agent = make_agent(config, num_actions=3)
  learner = Learner(agent, config, random_batches(8), np.zeros((4, 4, 1), np.uint8), log_every=5)
  answers = []  # What each pull carried back: None when nothing crossed the wire.

  def get_params(held_step):
    answers.append(learner.get_params(held_step))
    return answers[-1]

  stored = []
  actor = Actor(agent, config, ThreeStepEpisodes(), params_source=pull_when_newer(get_params), add=stored.append,
                params_update_period=10)
  actor.run(num_steps=50)
  assert [a is None for a in answers] == [False, True, True, True, True]  # Pulls at steps 0, 10, ..., 40.
  for _ in range(4):
    learner.step()  # Not yet at a publication (every 5 steps).
  actor.run(num_steps=10)  # Env steps 50..59: a pull at 50.
  assert answers[-1] is None and len(answers) == 6
  learner.step()  # Step 5: published.
  actor.run(num_steps=10)
  assert answers[-1][0] == 5 and len(answers) == 7
  jax.tree_util.tree_map(np.testing.assert_array_equal, answers[-1][1], jax.device_get(learner.state.params))
  actor.run(num_steps=10)
  assert answers[-1] is None
  # The actor acts with what it holds: greedy actions of the step-5 parameters.
  observation = stored[-1].observation
  greedy = int(np.argmax(agent.network.apply(answers[-2][1], observation[None]).outputs[0]))
  assert int(stored[-1].action) == greedy
  assert learner.get_params()[0] == 5  # Callers that hold nothing (evaluators, old clients) always get them.


CPU = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
SHARED = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.45'}


@pytest.mark.parametrize('devices, gpus, learner, evaluator', [
    ({'learner': 'cpu', 'evaluator': 'cpu'}, (), CPU, CPU),
    ({'learner': 'gpu', 'evaluator': 'cpu'}, ('0',), {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '0'}, CPU),
    ({'learner': 'cpu', 'evaluator': 'gpu'}, ('0',), CPU, {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '0'}),
    ({'learner': 'gpu', 'evaluator': 'gpu'}, ('0',), {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '0', **SHARED},
     {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '0', **SHARED}),
    ({'learner': 'gpu', 'evaluator': 'gpu'}, ('3', '5'), {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '3'},
     {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '5'}),
    ({'learner': 'gpu'}, ('0',), {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': '0'}, CPU),  # No evaluator.
])
def test_placement_gives_each_node_group_its_environment(devices, gpus, learner, evaluator):
  envs = placement.node_envs(devices, gpus)
  assert envs == {'replay': CPU, 'actor': CPU, 'evaluation': CPU, 'learner': learner, 'evaluator': evaluator}


@pytest.mark.parametrize('learner_device, evaluator_device, probe_every, gpus, expected', [
    ('auto', 'auto', 100, (), {'learner': 'cpu', 'evaluator': 'cpu'}),
    ('auto', 'auto', 100, ('0',), {'learner': 'gpu', 'evaluator': 'gpu'}),
    ('cpu', 'auto', 100, ('0',), {'learner': 'cpu', 'evaluator': 'gpu'}),
    ('auto', 'cpu', 0, ('0',), {'learner': 'gpu'}),
])
def test_auto_places_on_a_visible_gpu(learner_device, evaluator_device, probe_every, gpus, expected):
  config = ExperimentConfig(launch=LaunchConfig(learner_device=learner_device, evaluator_device=evaluator_device),
                            probe_every=probe_every)
  assert placement.resolve(config, gpus) == expected


@pytest.mark.slow
def test_a_gpu_asked_for_where_none_is_visible_or_under_local_mt_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # Here the real probe of the machine: no GPU.
  placement.visible_gpus.cache_clear()
  assert placement.visible_gpus() == ()
  with pytest.raises(ValueError, match='--evaluator_device=gpu, but no GPU is visible'):
    placement.run_envs(ExperimentConfig(launch=LaunchConfig(evaluator_device='gpu')))
  with pytest.raises(ValueError, match='--learner_device=cpu applies under --launch_type=local_mp only'):
    placement.run_envs(ExperimentConfig(launch=LaunchConfig(learner_device='cpu', launch_type='local_mt')))
  assert placement.run_envs(ExperimentConfig(launch=LaunchConfig(launch_type='local_mt'))) == {}
  run_dir = tmp_path / 'run'
  result = subprocess.run([sys.executable, '-m', 'launch.train', f'--run_dir={run_dir}', '--learner_device=gpu'],
                          cwd=ROOT, env={**os.environ, 'PLASTICITY_DOWNLOAD': '0'}, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1 and '--learner_device=gpu, but no GPU is visible' in result.stderr
  assert not run_dir.exists()  # Refused before anything was written.
