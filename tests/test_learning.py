"""The double-DQN learning step, target updates and the learner class."""

import itertools
import os
import pickle
import time

import chex
import dm_env
from dm_env import specs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import checkpointing, optimizers, snapshots
from agents.actor import Actor
from agents.builder import make_agent
from agents.config import AgentConfig
from agents.encodings import make_encoding, EncodingConfig
from agents import learner as learner_module
from agents.learner import Diverged, Learner, initial_state, resolve_updates_per_call
from agents.update import (FUSED_UPDATE_KEEPS, UPDATE_KEEPS, double_q_loss, init_state, jit_keeping,
                           make_fused_update, make_target_update, make_update)
from agents.types import Network, NetworkOutput, Transition
from probes.records.loggers import JsonlLogger, read_jsonl
from tests.conftest import RunsCode, ThreeStepEpisodes, random_batches


def table_network() -> Network:
  """Q-values read from a table indexed by integer observations: hand-checkable."""
  return Network(init=lambda rng, obs: {'q': jnp.zeros((3, 2))},
                 apply=lambda params, obs, *, is_training=False, rng=None: NetworkOutput(params['q'][obs], ()))


def test_double_q_target_matches_hand_computation():
  online = {'q': jnp.array([[1.0, 2.0], [5.0, 3.0], [0.0, 4.0]])}
  target = {'q': jnp.array([[0.5, 0.7], [10.0, -2.0], [6.0, 8.0]])}
  batch = Transition(observation=jnp.array([0, 2]), action=jnp.array([1, 0]),
                     reward=jnp.array([1.0, -1.0]), discount=jnp.array([1.0, 0.0]),
                     next_observation=jnp.array([1, 1]))
  gamma = 0.9
  loss, metrics = double_q_loss(table_network(), make_encoding('regress', EncodingConfig()), gamma,
                                online, target, batch, jax.random.PRNGKey(0))
  # Example 0: online argmax at s'=1 is action 0 (5 > 3); target evaluates it: 10.
  target_0 = 1.0 + gamma * 1.0 * 10.0
  # Example 1: terminal (discount 0): the target is the reward.
  target_1 = -1.0
  q_0, q_1 = 2.0, 0.0  # Q(s=0, a=1), Q(s=2, a=0)
  expected = 0.5 * ((target_0 - q_0) ** 2 + (target_1 - q_1) ** 2) / 2
  np.testing.assert_allclose(metrics['mean_target'], (target_0 + target_1) / 2, rtol=1e-6)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_double_q_loss_asserts_the_batch_layout():
  network, encoding = table_network(), make_encoding('regress', EncodingConfig())
  params = {'q': jnp.zeros((3, 2))}
  batch = Transition(observation=jnp.array([0, 2]), action=jnp.array([1, 0]), reward=jnp.array([1.0, -1.0]),
                     discount=jnp.array([1.0, 0.0]), next_observation=jnp.array([1, 1]))
  double_q_loss(network, encoding, 0.9, params, params, batch)
  for bad in (batch._replace(reward=jnp.ones((2, 1))),  # Not [B].
              batch._replace(discount=jnp.ones(3)),  # Another batch size.
              batch._replace(next_observation=jnp.array([1])),
              batch._replace(action=jnp.array([1.0, 0.0]))):  # Not integer actions.
    with pytest.raises(AssertionError):
      double_q_loss(network, encoding, 0.9, params, params, bad)


def test_target_update_copies_online_parameters():
  agent = make_agent(AgentConfig(width_multiplier=1 / 64), num_actions=3)
  dummy = jnp.zeros((1, 4, 4, 1), jnp.uint8)
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), dummy)
  moved = jax.tree_util.tree_map(lambda p: p + 1.0, state.params)
  state = make_target_update(agent.network, [], dummy)(state._replace(params=moved))
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state.target_params)):
    np.testing.assert_array_equal(a, b)


def test_learner_trains_checkpoints_and_resumes(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, target_update_period=10, batch_size=8)
  agent = make_agent(config, num_actions=3)
  records = []
  dummy = np.zeros((4, 4, 1), np.uint8)
  learner = Learner(agent, config, random_batches(8), dummy, checkpoint_dir=str(tmp_path),
                    checkpoint_every=20, logger=records.append, log_every=10)
  learner.run(max_steps=30)
  assert learner.step_count == 30
  assert [r['learner_step'] for r in records] == [10, 20, 30]
  assert all(np.isfinite(r['td_loss']) for r in records)
  step, params = learner.get_params()
  assert step == 30
  # Target was synced at step 30: equals the online parameters.
  for a, b in zip(jax.tree_util.tree_leaves(learner.state.params),
                  jax.tree_util.tree_leaves(learner.state.target_params)):
    np.testing.assert_array_equal(a, b)
  assert checkpointing.latest(str(tmp_path)).endswith('learner_000000030.msgpack')
  resumed = Learner(agent, config, random_batches(8, seed=1), dummy, checkpoint_dir=str(tmp_path))
  assert resumed.step_count == 30
  for a, b in zip(jax.tree_util.tree_leaves(resumed.state), jax.tree_util.tree_leaves(learner.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  resumed.run(max_steps=35)
  assert resumed.step_count == 35


def test_learner_writes_probe_snapshots_at_its_steps_and_at_the_end_again_after_a_relaunch(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, target_update_period=10, batch_size=8)
  agent = make_agent(config, num_actions=3)
  dummy, folder = np.zeros((4, 4, 1), np.uint8), str(tmp_path / 'probe_snapshots')
  make = lambda seed: Learner(agent, config, random_batches(8, seed=seed), dummy, checkpoint_dir=str(tmp_path / 'ckpt'),
                              checkpoint_every=10, snapshot_dir=folder, snapshot_every=15)
  learner = make(0)
  assert [step for step, _ in snapshots.saved(folder)] == [0]  # theta_0, before any update.
  step, params, target_params = snapshots.load(snapshots.path_for(folder, 0))
  for a, b, c in zip(*map(jax.tree_util.tree_leaves, (params, target_params, learner.state.initial_params))):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  learner.run(max_steps=20, should_stop=lambda: learner.step_count >= 17)  # A stop is not the end: no snapshot.
  assert [step for step, _ in snapshots.saved(folder)] == [0, 15]
  step, params, _ = snapshots.load(snapshots.path_for(folder, 15))
  assert step == 15
  # What the evaluator probed is gone; a learner relaunched from step 10 writes 15 again, then the end, 38.
  for step in (0, 15):
    snapshots.remove(snapshots.path_for(folder, step))
  with open(checkpointing.path_for(str(tmp_path / 'ckpt'), 17), 'wb'):
    pass  # A checkpoint cut short (killed): the relaunch resumes from step 10.
  relaunched = make(1)
  assert relaunched.step_count == 10 and snapshots.saved(folder) == []
  relaunched.run(max_steps=38)
  assert [step for step, _ in snapshots.saved(folder)] == [15, 30, 38]
  step, params, target_params = snapshots.load(snapshots.path_for(folder, 38))
  for a, b in zip(jax.tree_util.tree_leaves((params, target_params)),
                  jax.tree_util.tree_leaves((relaunched.state.params, relaunched.state.target_params))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_learner_reduces_td_loss_on_a_fixed_batch():
  config = AgentConfig(width_multiplier=1 / 16, target_update_period=10**6, discount=0.0)
  agent = make_agent(config, num_actions=3)
  batch = next(random_batches(32))
  learner = Learner(agent, config, itertools.repeat(batch), np.zeros((4, 4, 1), np.uint8))
  first = float(learner.step()['td_loss'])
  for _ in range(200):
    last = float(learner.step()['td_loss'])
  assert last < 0.1 * first


def test_a_jitted_update_hands_back_the_fields_it_keeps_uncopied_and_refuses_to_change_them():
  """`jit_keeping`: the kept fields come back as the very arrays given (a returned input would be a copy: the
  CNN's 51 MB target and initial weights at every update), the others as `jax.jit` computes them; a function
  that changes a kept field is refused, naming it."""
  config = AgentConfig(width_multiplier=1 / 16, target_update_period=2)
  agent = make_agent(config, num_actions=3)
  batches = list(itertools.islice(random_batches(32), 3))
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), batches[0].observation[:1])
  update = make_update(agent.network, agent.encoding, agent.optimizer, config.discount)
  fused = make_fused_update(update, make_target_update(agent.network, (), batches[0].observation[:1]), 2)
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
  for fn, keeps, batch in ((update, UPDATE_KEEPS, batches[0]), (fused, FUSED_UPDATE_KEEPS, stacked)):
    kept_state, kept_metrics = jit_keeping(fn, keeps)(state, batch)
    jitted_state, jitted_metrics = jax.jit(fn)(state, batch)
    for name in keeps:
      for kept, given, jitted in zip(*(jax.tree_util.tree_leaves(getattr(s, name))
                                       for s in (kept_state, state, jitted_state))):
        assert kept is given and jitted is not given
    chex.assert_trees_all_close(kept_state, jitted_state)
    chex.assert_trees_all_close(kept_metrics, jitted_metrics)
  assert int(kept_state.step) == 3 and not np.allclose(kept_state.target_params['head']['w'],
                                                       state.target_params['head']['w'])  # Step 2's copy, inside.
  with pytest.raises(ValueError, match='target_params'):
    jit_keeping(lambda state, batch: (state._replace(target_params=state.params), {}), UPDATE_KEEPS)(state, None)


def test_learner_logs_its_final_step_even_below_log_every(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8)
  records = []
  learner = Learner(make_agent(config, num_actions=3), config, random_batches(8), np.zeros((4, 4, 1), np.uint8),
                    logger=records.append, log_every=100)
  learner.run(max_steps=7)
  assert [r['learner_step'] for r in records] == [7]
  assert learner.get_params()[0] == learner.get_snapshot()[0] == 7


def test_a_diverging_learner_stops_at_the_first_nonfinite_step_and_keeps_the_last_finite_state(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8, learning_rate=1e6)
  agent = make_agent(config, num_actions=3)
  logger = JsonlLogger(str(tmp_path / 'learner.jsonl'))
  learner = Learner(agent, config, random_batches(8), np.zeros((4, 4, 1), np.uint8),
                    checkpoint_dir=str(tmp_path / 'checkpoints'), checkpoint_every=1, logger=logger, log_every=1)
  with pytest.raises(Diverged, match='learner step'):
    learner.run(max_steps=1000)
  records = read_jsonl(str(tmp_path / 'learner.jsonl'))
  last = records[-1]
  assert last['diverged'] is True and last['learner_step'] == learner.diverged_at
  assert learner.step_count == learner.diverged_at - 1 < 1000  # Stopped at once, the bad step not applied.
  assert all(not r.get('diverged') for r in records[:-1])
  # The latest checkpoint is the last finite state.
  step, state = checkpointing.load(checkpointing.latest(str(tmp_path / 'checkpoints')), learner.state)
  assert step == learner.step_count
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state.params))
  # Non-finite values are written as null and named, not replaced by a stand-in number.
  assert last['td_loss'] is None and 'td_loss' in last['nonfinite']
  assert all(last[key] is None for key in last['nonfinite'])


def test_logger_writes_nonfinite_values_as_null_and_names_them(tmp_path):
  logger = JsonlLogger(str(tmp_path / 'x.jsonl'))
  logger({'learner_step': 1, 'a': float('nan'), 'b': np.float32('inf'), 'c': 1.5, 'd': [1.0, -np.inf],
          'e': np.array([2.0, 3.0])})
  record, = read_jsonl(str(tmp_path / 'x.jsonl'))
  assert record['a'] is None and record['b'] is None and record['d'] == [1.0, None]
  assert record['c'] == 1.5 and record['e'] == [2.0, 3.0]
  assert record['nonfinite'] == ['a', 'b', 'd']


@pytest.mark.parametrize('epsilon, reward_clip', [(1.0, 1.0), (0.0, None)])
def test_actor_takes_epsilon_and_reward_clip_from_the_agent_config(epsilon, reward_clip):
  config = AgentConfig(width_multiplier=1 / 32, epsilon=epsilon, reward_clip=reward_clip)
  agent = make_agent(config, num_actions=3)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.uint8))
  stored, episodes = [], []
  Actor(agent, config, ThreeStepEpisodes(), params_source=lambda: (0, params), add=stored.append,
        logger=episodes.append).run(num_steps=30)
  assert [t.reward for t in stored] == [5.0 if reward_clip is None else 1.0] * 30
  assert [e['episode_return'] for e in episodes] == [15.0] * 10  # Unclipped.
  greedy = {int(o[0, 0, 0]): int(np.argmax(agent.network.apply(params, o[None]).outputs[0])) for o in
            (t.observation for t in stored[:3])}
  acted = {(int(t.observation[0, 0, 0]), int(t.action)) for t in stored}
  if epsilon == 0.0:
    assert acted == set(greedy.items())
  else:
    assert {action for _, action in acted} == {0, 1, 2}


def test_a_restarted_actor_counts_on_from_its_last_episode_and_pulls_parameters_first():
  config = AgentConfig(width_multiplier=1 / 32)
  agent = make_agent(config, num_actions=3)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.uint8))
  pulls, episodes = [], []

  def params_source():
    pulls.append(True)
    return 0, params

  # 13 steps before: not a multiple of the pull period, so only "no parameters yet" makes the first pull.
  Actor(agent, config, ThreeStepEpisodes(), params_source=params_source, add=lambda t: None,
        logger=episodes.append, params_update_period=100, episodes=[4], env_steps=13).run(num_steps=6)
  assert [(e['episode'], e['env_steps']) for e in episodes] == [(5, 16), (6, 19)]
  assert len(pulls) == 1


class SeededEpisodes(dm_env.Environment):
  """Random 4x4x1 observations and episode lengths (2 to 6 steps) drawn from its seed: distinct per seed."""

  def __init__(self, seed: int):
    self._rng = np.random.default_rng(seed)
    self._t, self._length = 0, 0

  def _observation(self) -> np.ndarray:
    return self._rng.integers(1, 256, (4, 4, 1)).astype(np.uint8)

  def reset(self) -> dm_env.TimeStep:
    self._t, self._length = 0, int(self._rng.integers(2, 7))
    return dm_env.restart(self._observation())

  def step(self, action) -> dm_env.TimeStep:
    self._t += 1
    reward = float(action) + 10 * self._t
    if self._t == self._length:
      return dm_env.termination(reward, self._observation())
    return dm_env.transition(reward, self._observation())

  def observation_spec(self):
    return specs.Array((4, 4, 1), np.uint8)

  def action_spec(self):
    return specs.DiscreteArray(3)


def test_an_actor_of_several_environments_steps_each_as_its_own_actor_would():
  """One batched policy call for 3 environments: greedy, each environment's transitions are those of a one-
  environment actor on the same seed, frame for frame; each logs its own episodes, numbered from 1."""
  from agents.actor import environment_seeds
  config = AgentConfig(width_multiplier=1 / 32, epsilon=0.0, reward_clip=None)
  agent = make_agent(config, num_actions=3)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.uint8))
  seeds = environment_seeds(7, 3)
  stored, episodes = [], []
  actor = Actor(agent, config, [SeededEpisodes(s) for s in seeds], params_source=lambda: (0, params),
                add=stored.append, logger=episodes.append)
  actor.run(num_steps=58)  # Rounded up to whole batches: 20 steps of each environment.
  assert actor.env_steps == 60 and len(stored) == 60
  for index, seed in enumerate(seeds):
    alone, alone_episodes = [], []
    Actor(agent, config, SeededEpisodes(seed), params_source=lambda: (0, params), add=alone.append,
          logger=alone_episodes.append).run(num_steps=20)
    mine = stored[index::3]
    for field in Transition._fields:
      np.testing.assert_array_equal(np.stack([getattr(t, field) for t in mine]),
                                    np.stack([getattr(t, field) for t in alone]), err_msg=field)
    logged = [e for e in episodes if e['env_index'] == index]
    assert [e['episode'] for e in logged] == list(range(1, len(logged) + 1)) and len(logged) >= 3
    assert [(e['episode_length'], e['episode_return']) for e in logged] == [
        (e['episode_length'], e['episode_return']) for e in alone_episodes]
  assert len({t.observation.tobytes() for t in stored[:3]}) == 3  # Three distinct seeds.


def test_environment_seeds_are_distinct_within_and_across_actors():
  from agents.actor import actor_seed, environment_seeds
  seeds = [s for actor_id in range(50) for s in environment_seeds(actor_seed(0, actor_id), 16)]
  assert len(set(seeds)) == 50 * 16 and all(0 <= s < 2**63 for s in seeds)
  assert environment_seeds(3, 4) == environment_seeds(3, 4) and environment_seeds(3, 4)[:2] == environment_seeds(3, 2)


def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_it_used(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8)
  agent = make_agent(config, num_actions=3)
  dummy = np.zeros((4, 4, 1), np.uint8)
  learner = Learner(agent, config, random_batches(8), dummy, checkpoint_dir=str(tmp_path), checkpoint_every=5)
  learner.run(max_steps=10)  # Checkpoints at 5 and 10.
  latest = checkpointing.path_for(str(tmp_path), 10)
  with open(latest, 'r+b') as f:
    f.truncate(100)  # A write cut short.
  path, (step, _), problems = checkpointing.latest_loadable(str(tmp_path), learner.state)
  assert step == 5 and path == checkpointing.path_for(str(tmp_path), 5)
  assert len(problems) == 1 and latest in problems[0]
  assert Learner(agent, config, random_batches(8), dummy, checkpoint_dir=str(tmp_path)).step_count == 5
  with open(checkpointing.path_for(str(tmp_path), 5), 'w') as f:
    f.write('not a checkpoint')
  with pytest.raises(checkpointing.CheckpointError, match='No checkpoint .* is readable'):
    Learner(agent, config, random_batches(8), dummy, checkpoint_dir=str(tmp_path))
  # A checkpoint of another configuration's state is refused by name, not fed to the update.
  other = str(tmp_path / 'other')
  Learner(agent, config, random_batches(8), dummy, checkpoint_dir=other, checkpoint_every=1).run(max_steps=1)
  rmsprop = AgentConfig(width_multiplier=1 / 32, batch_size=8, optimizer='rmsprop')
  with pytest.raises(checkpointing.CheckpointError, match='another shape'):
    Learner(make_agent(rmsprop, 3), rmsprop, random_batches(8), dummy, checkpoint_dir=other)


def test_a_planted_checkpoint_runs_no_code_and_is_skipped_for_the_one_before_it(tmp_path):
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8)
  agent, dummy, folder = make_agent(config, num_actions=3), np.zeros((4, 4, 1), np.uint8), str(tmp_path / 'ckpt')
  Learner(agent, config, random_batches(8), dummy, checkpoint_dir=folder, checkpoint_every=5).run(max_steps=10)
  marker = str(tmp_path / 'code_ran')
  planted = checkpointing.path_for(folder, 999999999, suffix=checkpointing.PICKLED_SUFFIX)
  with open(planted, 'wb') as f:  # A pickle, as checkpoints were: read, it would run code.
    pickle.dump({'step': 999999999, 'state': RunsCode(marker)}, f)
  foreign = checkpointing.path_for(folder, 999999998)
  with open(foreign, 'wb') as f:
    f.write(b'\x81\xa6format\xb2plasticity-rl tree')  # Begins as one of ours, then is nothing.
  resumed = Learner(agent, config, random_batches(8), dummy, checkpoint_dir=folder)
  assert resumed.step_count == 10 and not os.path.exists(marker)
  _, _, problems = checkpointing.latest_loadable(folder, resumed.state)
  assert len(problems) == 2 and planted in problems[0] and checkpointing.MIGRATE_COMMAND in problems[0]
  assert foreign in problems[1] and 'not a readable checkpoint' in problems[1]
  assert not os.path.exists(marker)
  # A checkpoint whose pickle names functions is not read by the snapshot reader either.
  os.makedirs(tmp_path / 'snapshots')
  with open(tmp_path / 'snapshots' / f'{500:09d}.pkl', 'wb') as f:
    pickle.dump({'step': 500, 'state': RunsCode(marker)}, f)
  assert snapshots.saved(str(tmp_path / 'snapshots')) == [] and not os.path.exists(marker)


def test_4096_zeroed_bytes_in_a_checkpoint_are_refused_and_the_one_before_used(tmp_path):
  config = AgentConfig(width_multiplier=1 / 8, batch_size=8)
  agent, dummy, folder = make_agent(config, num_actions=3), np.zeros((4, 4, 1), np.uint8), str(tmp_path)
  learner = Learner(agent, config, random_batches(8), dummy, checkpoint_dir=folder, checkpoint_every=5)
  learner.run(max_steps=10)  # Checkpoints at 5 and 10.
  latest = checkpointing.path_for(folder, 10)
  with open(latest, 'r+b') as f:  # Zeros in an array's bytes: the file still decodes.
    size = f.seek(0, os.SEEK_END)
    assert size > 4 * 4096
    f.seek(size // 2 - 2048)
    f.write(bytes(4096))
  path, (step, _), problems = checkpointing.latest_loadable(folder, learner.state)
  assert (path, step) == (checkpointing.path_for(folder, 5), 5)
  assert problems == [f'{latest} is damaged: its content does not match its checksum.']
  assert Learner(agent, config, random_batches(8), dummy, checkpoint_dir=folder).step_count == 5
  # A probe snapshot likewise.
  snapshot = snapshots.save(str(tmp_path / 'snapshots'), 10, learner.state.params, learner.state.target_params)
  with open(snapshot, 'r+b') as f:
    f.seek(f.seek(0, os.SEEK_END) // 2 - 2048)
    f.write(bytes(4096))
  with pytest.raises(checkpointing.Damaged, match='does not match its checksum'):
    snapshots.load(snapshot)


@pytest.mark.slow
def test_every_optimizer_state_is_restored_into_the_structure_the_code_builds(tmp_path):
  dummy = np.zeros((4, 4, 1), np.uint8)
  for name in optimizers.OPTIMIZERS.names():
    config = AgentConfig(width_multiplier=1 / 32, optimizer=name, interventions=('weight_decay',))
    learner = Learner(make_agent(config, 3), config, random_batches(8), dummy, checkpoint_dir=str(tmp_path / name),
                      checkpoint_every=2)
    learner.run(max_steps=2)
    template = jax.eval_shape(lambda: initial_state(make_agent(config, 3), 0, dummy))  # What the launcher reads into.
    step, state = checkpointing.load(checkpointing.latest(str(tmp_path / name)), template)
    assert step == 2 and jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(learner.state)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, jax.device_get(learner.state))


@pytest.mark.slow
def test_updates_per_second_count_from_the_first_update_not_from_the_replay_fill():
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8)

  def slow_start():
    time.sleep(2.0)  # The replay filling before the first batch.
    yield from random_batches(8)

  records = []
  learner = Learner(make_agent(config, num_actions=3), config, slow_start(), np.zeros((4, 4, 1), np.uint8),
                    logger=records.append, log_every=20)
  learner.run(max_steps=40)
  assert [r['learner_step'] for r in records] == [20, 40]
  # Counted from the wait's end, 19 updates take well under the 2 s the wait would add (then <= 10 updates/s).
  assert records[0]['updates_per_s'] > 20


@pytest.mark.slow
def test_learner_records_its_input_bound_share_and_the_parameter_pulls_it_served():
  """What a cluster's placement costs (launch.benchmarks.cluster) is read from these two fields."""
  config = AgentConfig(width_multiplier=1 / 32, batch_size=8)

  class Waiting:
    """A prefetching iterator's interface: each batch costs 0.05 s of waiting, counted in `wait_seconds`."""
    wait_seconds = 0.0

    def __init__(self):
      self._batches = random_batches(8)

    def __iter__(self):
      return self

    def __next__(self):
      time.sleep(0.05)
      self.wait_seconds += 0.05
      return next(self._batches)

  records = []
  learner = Learner(make_agent(config, num_actions=3), config, Waiting(), np.zeros((4, 4, 1), np.uint8),
                    logger=lambda record: records.append({**record, 'time': time.time()}), log_every=20)
  learner.run(max_steps=20)
  step = learner.get_params()[0]
  assert learner.get_params(step) is None  # Unchanged parameters: no pull counted.
  learner.get_params(None)
  learner.get_params(step - 1)  # Older than the published ones: a pull.
  learner.run(max_steps=40)
  first, second = records
  # 19 waits of 0.05 s (the first batch's wait comes before the count starts) in the first record's interval.
  assert 0.3 < first['input_wait_fraction'] <= 1.0 and first['param_pulls_per_s'] == 0.0
  assert second['param_pulls_per_s'] > 0 and second['param_pulls_per_s'] * (second['time'] - first['time']) == \
      pytest.approx(3, rel=0.05)


def test_actor_seeds_are_distinct_for_many_actors_and_new_at_each_launch():
  from agents.actor import actor_seed
  seeds = {actor_seed(0, i) for i in range(20_000)}
  assert len(seeds) == 20_000 and all(0 <= s < 2**63 for s in seeds)
  assert actor_seed(0, 5) == actor_seed(0, 5) and actor_seed(0, 5) != actor_seed(0, 5, attempt=2)
  assert actor_seed(0, 1000) != actor_seed(1, 0)  # seed * 1000 + i made these equal.
  # An actor restarted in place draws a new seed each time; restart 0 is the seed of its first start.
  restarted = {actor_seed(0, 5, restart=r) for r in range(1, 4)}
  assert len(restarted) == 3 and not restarted & seeds  # Nor any other actor's.
  assert actor_seed(0, 5, restart=0) == actor_seed(0, 5)


def _fused_and_single(tmp_path, config, updates_per_call, batches, **options):
  """Learners with K = updates_per_call and K = 1 on the same batches, each in its own directories, every
  checkpoint step and call recorded."""
  agent = make_agent(config, num_actions=3)
  learners, saved, calls, records = {}, {}, {}, {}
  for k in (1, updates_per_call):
    records[k], saved[k], calls[k] = [], [], []
    learner = Learner(agent, config, iter(batches), np.zeros((8, 8, 1), np.uint8), logger=records[k].append,
                      checkpoint_dir=str(tmp_path / f'k{k}' / 'checkpoints'),
                      snapshot_dir=str(tmp_path / f'k{k}' / 'snapshots'), updates_per_call=k, **options)
    learner.save = lambda learner=learner, k=k: saved[k].append(learner.step_count) or Learner.save(learner)
    learner.step = (lambda max_updates=None, learner=learner, k=k:
                    calls[k].append(1) or Learner.step(learner, max_updates))
    learners[k] = learner
  return learners, saved, calls, records


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['mlp', 'cnn'])  # One scan per call; on CPU, a CNN's updates dispatched one by one.
def test_fused_updates_give_the_parameters_and_events_of_single_updates_on_their_steps(tmp_path, arch):
  """K = 16 against K = 1 on the same 200 batches, target period 50 with reset_last_layer and ReDo: the same
  parameters, the same snapshot files (before the step's interventions) and checkpoints on the same steps, the same
  records; target updates inside the calls (50, 150), at their ends (100, 200)."""
  config = AgentConfig(arch=arch, width_multiplier=0.05, batch_size=8, target_update_period=50,
                       interventions=('reset_last_layer', 'redo'), redo_every=70, redo_threshold=1.0)
  batches = list(itertools.islice(random_batches(8, shape=(8, 8, 1)), 200))
  learners, saved, calls, records = _fused_and_single(tmp_path, config, 16, batches, checkpoint_every=60,
                                                       snapshot_every=100, log_every=40)
  for learner in learners.values():
    learner.run(max_steps=200)
  single, fused = learners[1], learners[16]
  assert single.step_count == fused.step_count == 200 and fused.updates_per_call == 16
  assert len(calls[1]) == 200 and len(calls[16]) < 40  # Fused: one host sync per call.
  close = lambda a, b: chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), rtol=1e-4, atol=1e-5)
  close(fused.state.params, single.state.params)
  close(fused.state.target_params, single.state.target_params)
  close(fused.state.opt_state, single.state.opt_state)
  np.testing.assert_array_equal(fused.state.rng, single.state.rng)  # The same keys drawn: every hook and ReDo ran.
  assert saved[1] == saved[16] == [60, 120, 180, 200]
  folders = {k: str(tmp_path / f'k{k}' / 'snapshots') for k in learners}
  assert [step for step, _ in snapshots.saved(folders[16])] == [step for step, _ in snapshots.saved(folders[1])] == [
      0, 100, 200]
  for step in (100, 200):
    close(snapshots.load(snapshots.path_for(folders[16], step)), snapshots.load(snapshots.path_for(folders[1], step)))
  # Step 100's snapshot is what training produced, not the reset head the learner went on from.
  assert not np.allclose(snapshots.load(snapshots.path_for(folders[1], 100))[1]['head']['w'],
                         jax.device_get(single.state.params['head']['w']))
  assert [r['learner_step'] for r in records[16]] == [r['learner_step'] for r in records[1]] == [40, 80, 120, 160, 200]
  for a, b in zip(records[16], records[1]):
    assert a.keys() - {'updates_per_s'} == b.keys() - {'updates_per_s'}
    np.testing.assert_allclose(a['td_loss'], b['td_loss'], rtol=1e-3)
  assert [r.get('redo_recycled_units') for r in records[16]] == [r.get('redo_recycled_units') for r in records[1]]


@pytest.mark.slow
def test_a_nonfinite_update_inside_a_fused_call_keeps_the_state_before_it_and_names_its_step(tmp_path):
  """A NaN reward in the batch of update 37 of a call of 64: the learner stops at step 36's state (that of 36
  single updates), checkpoints and records it, and `Diverged` names step 37, as with K = 1."""
  config = AgentConfig(width_multiplier=0.05, batch_size=8, target_update_period=10,
                       interventions=('shrink_and_perturb',))
  batches = list(itertools.islice(random_batches(8, shape=(8, 8, 1)), 100))
  batches[36] = batches[36]._replace(reward=np.full(8, np.nan, np.float32))
  learners, saved, calls, records = _fused_and_single(tmp_path, config, 64, batches, checkpoint_every=1000,
                                                       log_every=1000)
  for learner in learners.values():
    with pytest.raises(Diverged, match='learner step 37'):
      learner.run(max_steps=100)
    assert learner.step_count == learner.diverged_at - 1 == 36
    assert records[learner.updates_per_call][-1]['diverged'] is True
  single, fused = learners[1], learners[64]
  assert len(calls[64]) == 1 and saved[1] == saved[64] == [36]
  chex.assert_trees_all_close(jax.device_get(fused.state), jax.device_get(single.state), rtol=1e-4, atol=1e-5)
  step, state = checkpointing.load(checkpointing.latest(str(tmp_path / 'k64' / 'checkpoints')), single.state)
  assert step == 36 and all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(state))
  chex.assert_trees_all_close(state.params, jax.device_get(single.state.params), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fused_calls_end_at_every_event_and_are_powers_of_two_below_k():
  config = AgentConfig(width_multiplier=0.05, batch_size=8, interventions=('redo',), redo_every=70)
  learner = Learner(make_agent(config, 3), config, random_batches(8, shape=(8, 8, 1)), np.zeros((8, 8, 1), np.uint8),
                    log_every=40, updates_per_call=16)
  sizes = []
  while learner.step_count < 100:
    before = learner.step_count
    learner.step(max_updates=100)
    sizes.append(learner.step_count - before)
  # Events at 40, 70, 80 (and the end, 100): 16, 16, 8 | 16, 8, 4, 2 | 8, 2 | 16, 4.
  assert sizes == [16, 16, 8, 16, 8, 4, 2, 8, 2, 16, 4]
  with pytest.raises(ValueError, match='--updates_per_call=0'):
    Learner(make_agent(config, 3), config, random_batches(8), np.zeros((8, 8, 1), np.uint8), updates_per_call=0)


def test_the_actors_epsilon_draws_are_the_keys_split_per_step_from_its_seed():
  """The policy splits the actor's key inside its one compiled call: each step's epsilon-greedy draws are those
  of `rng, key = split(rng)` then one key per environment, as when the actor split it itself."""
  import rlax
  config = AgentConfig(width_multiplier=1 / 32, epsilon=0.5, reward_clip=None)
  agent = make_agent(config, num_actions=3)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.uint8))
  stored = []
  Actor(agent, config, [ThreeStepEpisodes(), ThreeStepEpisodes()], params_source=lambda: (0, params),
        add=stored.append, seed=11).run(num_steps=40)
  rng, expected = jax.random.PRNGKey(11), []
  for step in range(20):
    rng, key = jax.random.split(rng)
    observations = np.stack([t.observation for t in stored[2 * step:2 * step + 2]])
    q_values = agent.network.apply(params, observations).outputs
    keys = jax.random.split(key, 2)
    expected += [int(rlax.epsilon_greedy(0.5).sample(k, q)) for k, q in zip(keys, q_values)]
  assert [int(t.action) for t in stored] == expected and len(set(expected)) == 3


@pytest.mark.parametrize('backend, arch, expected', [('cpu', 'mlp', 16), ('cpu', 'cnn', 1), ('gpu', 'mlp', 64),
                                                      ('gpu', 'cnn', 64)])
def test_the_default_updates_per_call_is_the_backends_and_networks(monkeypatch, backend, arch, expected):
  monkeypatch.setattr(learner_module.jax, 'default_backend', lambda: backend)
  network = make_agent(AgentConfig(arch=arch, width_multiplier=0.125), 10).network
  assert resolve_updates_per_call(None, network, np.zeros((28, 28, 1), np.uint8)) == expected
  assert resolve_updates_per_call(4, network, np.zeros((28, 28, 1), np.uint8)) == 4
  with pytest.raises(ValueError, match='--updates_per_call=0'):
    resolve_updates_per_call(0, network, np.zeros((28, 28, 1), np.uint8))
