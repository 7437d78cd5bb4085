"""The ALE environments (`atari:<game>`) and DQN Zoo's preprocessing."""

import dm_env
import jax
import numpy as np
import pytest

import environments
from agents.actor import Actor
from agents.builder import make_agent
from agents.config import AgentConfig
from environments import atari


@pytest.mark.parametrize('game', atari.GAMES)
def test_every_game_loads_and_steps(game):
  env = environments.make(f'atari:{game}', seed=0, noop_max=0)
  timestep = env.reset()
  assert timestep.first()
  assert env.observation_spec().shape == (84, 84, 4) and env.action_spec().num_values >= 3
  for action in range(3):
    timestep = env.step(action % env.action_spec().num_values)
    assert timestep.observation.shape == (84, 84, 4) and timestep.observation.dtype == np.uint8
    assert np.isfinite(timestep.reward)


def test_the_57_games_of_figure_7():
  assert len(atari.GAMES) == len(set(atari.GAMES)) == 57
  assert {'pong', 'montezuma_revenge', 'space_invaders', 'video_pinball'} <= set(atari.GAMES)
  assert len([s for s in environments.valid_specs() if s.startswith('atari:')]) == 57


def rollout(seed, steps=150, **options):
  env = environments.make('atari:breakout', seed=seed, **options)
  rng = np.random.default_rng(0)
  observations, rewards = [env.reset().observation], []
  for _ in range(steps):
    timestep = env.step(int(rng.integers(env.action_spec().num_values)))
    observations.append(timestep.observation)
    rewards.append(timestep.reward)
  return np.stack(observations), np.array(rewards)


def test_same_seed_same_observations_and_rewards():
  first, second, other = rollout(3), rollout(3), rollout(4)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  assert not np.array_equal(first[0], other[0])  # Another seed: other no-op starts.
  sticky, sticky_again = rollout(5, sticky_action_probability=0.25), rollout(5, sticky_action_probability=0.25)
  np.testing.assert_array_equal(sticky[0], sticky_again[0])


def test_frame_stack_shifts_one_frame_per_step():
  env = environments.make('atari:pong', seed=0)
  first = env.reset().observation
  assert all(np.array_equal(first[..., i], first[..., 0]) for i in range(4))  # A reset repeats its frame.
  previous = first
  for _ in range(5):
    observation = env.step(0).observation
    np.testing.assert_array_equal(observation[..., :3], previous[..., 1:])
    previous = observation


def test_pooling_takes_the_pixelwise_max_and_resize_is_bilinear():
  resize = lambda frame: atari.resize(frame, (84, 84))
  last, previous = np.zeros((210, 160), np.uint8), np.zeros((210, 160), np.uint8)
  last[20:40, 20:40] = 200  # A sprite drawn only on even frames...
  previous[100:140, 80:120] = 120  # ...and one drawn only on odd frames: flicker.
  pooled = atari.process_frames(last, previous, (84, 84))
  np.testing.assert_array_equal(pooled, resize(np.maximum(last, previous)))
  assert pooled[12, 12] == 200 and pooled[48, 52] == 120 and pooled[70, 70] == 0  # Both sprites survive.
  alone = atari.process_frames(last, None, (84, 84))
  assert alone[12, 12] == 200 and alone[48, 52] == 0
  # Bilinear: a constant stays constant; a horizontal ramp is sampled at the output pixel centres.
  np.testing.assert_array_equal(resize(np.full((210, 160), 77, np.uint8)), 77)
  ramp = np.tile(np.arange(160, dtype=np.uint8), (210, 1))
  centres = np.clip((np.arange(84) + 0.5) * 160 / 84 - 0.5, 0, 159)
  np.testing.assert_allclose(resize(ramp)[0], centres, atol=1.0)  # OpenCV's weights are fixed-point.
  # Any frame: within one grey level (fixed-point weights) of the 2-tap formula at half-pixel centres.
  frame = np.random.default_rng(0).integers(0, 256, (210, 160)).astype(np.float64)
  taps = [np.clip((np.arange(84) + 0.5) * n / 84 - 0.5, 0, n - 1) for n in (210, 160)]
  (row, row_weight), (col, col_weight) = ((np.floor(t).astype(int), t - np.floor(t)) for t in taps)
  lerp = lambda a, b, w: a * (1 - w) + b * w
  rows = lerp(frame[row], frame[np.minimum(row + 1, 209)], row_weight[:, None])
  expected = lerp(rows[:, col], rows[:, np.minimum(col + 1, 159)], col_weight)
  np.testing.assert_allclose(resize(frame.astype(np.uint8)), expected, atol=1.0)
  assert resize(frame.astype(np.uint8)).shape == (84, 84)


def test_rewards_are_unclipped_from_the_env_and_clipped_in_replay():
  env = environments.make('atari:space_invaders', seed=0, max_episode_frames=4000)
  # Epsilon 1: every action uniform whatever the Q-values, so a narrow network acts as the full one would, each of
  # its 1,000 forward passes a fraction of the cost.
  agent = make_agent(AgentConfig(width_multiplier=0.1), env.action_spec().num_values)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 84, 84, 4), np.uint8))
  stored, episodes = [], []
  actor = Actor(agent, AgentConfig(epsilon=1.0, reward_clip=1.0), env, params_source=lambda: (0, params),
                add=stored.append, logger=episodes.append)
  actor.run(num_steps=1000)
  assert max(t.reward for t in stored) == 1.0 and min(t.reward for t in stored) >= -1.0
  assert episodes, 'the 4,000-frame cap should end an episode within 1,000 steps'
  assert episodes[0]['episode_return'] >= 5  # Space Invaders scores 5+ points per invader: unclipped.
  assert episodes[0]['episode_return'] > sum(t.reward for t in stored[:episodes[0]['episode_length']])
  length = episodes[0]['episode_length']
  assert length <= 1000  # The cap: 4,000 frames / 4 per step.
  assert stored[length - 1].discount == (1.0 if length == 1000 else 0.0)  # Truncated by the cap, or game over.


def test_game_over_terminates_with_discount_zero():
  env = environments.make('atari:pong', seed=0, max_episode_frames=10_000_000)
  env.reset()
  for _ in range(10_000):
    timestep = env.step(0)
    if timestep.last():
      break
  assert timestep.step_type == dm_env.StepType.LAST and timestep.discount == 0.0
  assert env.step(0).first()


@pytest.mark.parametrize('spec', ['atari:pongg', 'atari:', 'atari:pong:extra'])
def test_unknown_games_list_the_valid_names(spec):
  with pytest.raises(ValueError) as error:
    environments.make(spec)
  assert '--env' in str(error.value) and 'montezuma_revenge' in str(error.value)
