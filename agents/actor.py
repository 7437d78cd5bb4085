"""The epsilon-greedy actor: steps an environment and hands transitions to a sink.

The sink is any `add(Transition)` callable (a Reverb writer in a Launchpad
node, a list in a unit test), so acting knows nothing of replay.
"""

import time
from typing import Callable, Optional, Tuple

import dm_env
import jax
import numpy as np
import rlax

from agents.builder import AgentParts
from agents.config import AgentConfig
from agents.types import Logger, Params, Transition


def make_policy(agent: AgentParts) -> Callable[[Params, np.ndarray, jax.Array, float], jax.Array]:
  """A jit-compiled epsilon-greedy policy on a single observation."""

  def policy(params: Params, observation: jax.Array, rng: jax.Array, epsilon: float) -> jax.Array:
    outputs = agent.network.apply(params, observation[None]).outputs
    q_values = agent.encoding.q_values(outputs)[0]
    return rlax.epsilon_greedy(epsilon).sample(rng, q_values)

  return jax.jit(policy)


def actor_seed(run_seed: int, actor_id: int, attempt: int = 1, restart: int = 0) -> int:
  """A 63-bit seed per (run, launch, actor, in-place restart), from numpy's SeedSequence: distinct for any number
  of actors (the former `seed * 1000 + i` collided past 1,000), and new for each relaunch and each restart of the
  actor, so a restarted actor does not replay its first trajectories. (A trailing 0 leaves SeedSequence's state
  as it was: restart 0 keeps the seeds of before restarts existed.)"""
  low, high = np.random.SeedSequence([run_seed, attempt, actor_id, restart]).generate_state(2, np.uint32)
  return (int(high) << 31) ^ int(low)


class Actor:
  """Acts with `agent`'s network as `config` says (epsilon, reward_clip), as the Learner learns from it."""

  def __init__(self, agent: AgentParts, config: AgentConfig, environment: dm_env.Environment,
               params_source: Callable[[], Optional[Tuple[int, Params]]], add: Callable[[Transition], None],
               seed: int = 0, params_update_period: int = 100, logger: Optional[Logger] = None,
               episodes: int = 0, env_steps: int = 0):
    """`episodes` and `env_steps` are where a restarted actor's counters go on from."""
    self._environment = environment
    self._epsilon = config.epsilon
    self._params_source = params_source
    self._add = add
    self._reward_clip = config.reward_clip
    self._params_update_period = params_update_period
    self._logger = logger
    self._policy = make_policy(agent)
    self._rng = jax.random.PRNGKey(seed)
    # Read at the first step and every `params_update_period` steps; a source that returns None ends `run`.
    self._learner_step, self._params = 0, None
    self._env_steps = env_steps
    self._episodes = episodes

  @property
  def env_steps(self) -> int:
    return self._env_steps

  def _clip(self, reward: float) -> float:
    if self._reward_clip is None:
      return reward
    return float(np.clip(reward, -self._reward_clip, self._reward_clip))

  def run(self, num_steps: Optional[int] = None, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Acts for `num_steps` environment steps (or until `should_stop()`)."""
    timestep = self._environment.reset()
    episode_return, episode_steps, episode_start = 0.0, 0, time.time()
    steps_done = 0
    while (num_steps is None or steps_done < num_steps) and not should_stop():
      if self._params is None or self._env_steps % self._params_update_period == 0:
        update = self._params_source()
        if update is None:  # The source gave up waiting: a stop was requested.
          break
        self._learner_step, self._params = update
      self._rng, key = jax.random.split(self._rng)
      action = int(self._policy(self._params, timestep.observation, key, self._epsilon))
      next_timestep = self._environment.step(action)
      self._add(Transition(
          observation=timestep.observation, action=np.int32(action),
          reward=np.float32(self._clip(next_timestep.reward)),
          discount=np.float32(next_timestep.discount), next_observation=next_timestep.observation))
      episode_return += float(next_timestep.reward)
      episode_steps += 1
      self._env_steps += 1
      steps_done += 1
      timestep = next_timestep
      if timestep.last():
        self._episodes += 1
        if self._logger:
          elapsed = time.time() - episode_start
          self._logger({'episode': self._episodes, 'episode_return': episode_return,
                        'episode_length': episode_steps, 'env_steps': self._env_steps,
                        'learner_step': self._learner_step,
                        'env_steps_per_s': episode_steps / max(elapsed, 1e-9)})
        timestep = self._environment.reset()
        episode_return, episode_steps, episode_start = 0.0, 0, time.time()
