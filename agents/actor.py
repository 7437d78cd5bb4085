"""The epsilon-greedy actor: steps its environments and hands transitions to a sink.

The sink is any `add(Transition)` callable (a Reverb writer in a Launchpad
node, a list in a unit test), so acting knows nothing of replay.

An actor steps `--envs_per_actor` environments in lock-step with one batched
policy call per step: the environments are a Python loop over
`environments.make(...)` instances, each with its own seed and episodes.
ale-py's C++ vector environment (`ale_py.vector_env.AtariVectorEnv`) was not used: it imports
gymnasium (not in the lock), and its defaults differ from DQN Zoo's
preprocessing in `environments/atari.py` (fire on reset, reward clipping);
the loop keeps one implementation of that preprocessing for one and for many
environments.
"""

import dataclasses
import time
from typing import Callable, List, Optional, Sequence, Tuple, Union

import chex
import dm_env
import jax
import numpy as np
import rlax

from agents.builder import AgentParts
from agents.config import AgentConfig
from agents.types import Logger, Params, Transition


def make_policy(agent: AgentParts) -> Callable[[Params, np.ndarray, jax.Array, float], Tuple[jax.Array, jax.Array]]:
  """A jit-compiled epsilon-greedy policy on a batch of observations [N, ...] -> (actions [N], the next rng): one
  network call for all of an actor's environments, an independent epsilon draw for each, the actor's key split
  inside (one dispatch a step, not two). It takes prepared parameters (`make_prepare`)."""
  apply = agent.network.apply_prepared or agent.network.apply

  def policy(params: Params, observations: jax.Array, rng: jax.Array,
             epsilon: float) -> Tuple[jax.Array, jax.Array]:
    rng, key = jax.random.split(rng)
    q_values = agent.encoding.q_values(apply(params, observations).outputs)
    chex.assert_rank(q_values, 2)
    keys = jax.random.split(key, q_values.shape[0])
    return jax.vmap(rlax.epsilon_greedy(epsilon).sample)(keys, q_values), rng

  return jax.jit(policy)


def make_prepare(agent: AgentParts) -> Callable[[Params], Params]:
  """The policy's parameters from the learner's: `Network.prepare`, jit-compiled (spectral normalisation's power
  iteration then runs once per pull, not once per step: 20 times faster acting for the MLP)."""
  return jax.jit(agent.network.prepare) if agent.network.prepare else (lambda params: params)


def actor_seed(run_seed: int, actor_id: int, attempt: int = 1, restart: int = 0) -> int:
  """A 63-bit seed per (run, launch, actor, in-place restart), from numpy's SeedSequence: distinct for any number
  of actors (the former `seed * 1000 + i` collided past 1,000), and new for each relaunch and each restart of the
  actor, so a restarted actor does not replay its first trajectories. (A trailing 0 leaves SeedSequence's state
  as it was: restart 0 keeps the seeds of before restarts existed.)"""
  low, high = np.random.SeedSequence([run_seed, attempt, actor_id, restart]).generate_state(2, np.uint32)
  return (int(high) << 31) ^ int(low)


def environment_seeds(seed: int, count: int) -> List[int]:
  """The seeds of an actor's `count` environments: SeedSequence children of its seed (`actor_seed`), so distinct
  within the actor and from every other actor's."""
  children = np.random.SeedSequence(seed).spawn(count)
  return [int(np.random.default_rng(child).integers(2**63)) for child in children]


@dataclasses.dataclass
class _Episode:
  """One environment's episode in progress, logged on its own when it ends."""
  timestep: dm_env.TimeStep
  start_env_steps: int  # The actor's, over all its environments.
  steps: int = 0
  episode_return: float = 0.0
  start: float = dataclasses.field(default_factory=time.time)


class Actor:
  """Acts with `agent`'s network as `config` says (epsilon, reward_clip), as the Learner learns from it."""

  def __init__(self, agent: AgentParts, config: AgentConfig,
               environment: Union[dm_env.Environment, Sequence[dm_env.Environment]],
               params_source: Callable[[], Optional[Tuple[int, Params]]], add: Callable[[Transition], None],
               seed: int = 0, params_update_period: int = 100, logger: Optional[Logger] = None,
               episodes: Sequence[int] = (), env_steps: int = 0):
    """`episodes` (per environment) and `env_steps` are where a restarted actor's counters go on from."""
    # One environment, or several stepped in lock-step with one batched policy call.
    self._environments = list(environment) if isinstance(environment, Sequence) else [environment]
    self._epsilon = config.epsilon
    self._params_source = params_source
    self._add = add
    self._reward_clip = config.reward_clip
    self._params_update_period = params_update_period
    self._logger = logger
    self._policy, self._prepare = make_policy(agent), make_prepare(agent)
    self._rng = jax.random.PRNGKey(seed)
    # Read at the first step and every `params_update_period` steps; a source that returns None ends `run`.
    self._learner_step, self._params = 0, None
    self._env_steps = env_steps
    # Finished episodes of each environment (an environment added at a relaunch starts at 0).
    self._episodes = [*episodes, *[0] * len(self._environments)][:len(self._environments)]

  @property
  def env_steps(self) -> int:
    return self._env_steps

  def _clip(self, reward: float) -> float:
    if self._reward_clip is None:
      return reward
    return float(np.clip(reward, -self._reward_clip, self._reward_clip))

  def run(self, num_steps: Optional[int] = None, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Acts for `num_steps` environment steps, over all environments, rounded up to whole batches (or until
    `should_stop()`)."""
    episodes = [_Episode(environment.reset(), self._env_steps) for environment in self._environments]
    steps_done = 0
    while (num_steps is None or steps_done < num_steps) and not should_stop():
      if self._params is None or self._env_steps % self._params_update_period < len(episodes):  # Once a period.
        update = self._params_source()
        if update is None:  # The source gave up waiting: a stop was requested.
          break
        self._learner_step, self._params = update[0], self._prepare(update[1])
      observations = np.stack([episode.timestep.observation for episode in episodes])
      actions, self._rng = self._policy(self._params, observations, self._rng, self._epsilon)
      actions = np.asarray(actions)
      for index, action in enumerate(actions):
        episodes[index] = self._step(index, episodes[index], int(action))
      steps_done += len(episodes)

  def _step(self, index: int, episode: _Episode, action: int) -> _Episode:
    """One step of environment `index`: its transition to the sink; its episode logged when it ends, and the
    episode that goes on (a new one after a reset)."""
    timestep = episode.timestep
    next_timestep = self._environments[index].step(action)
    self._add(Transition(
        observation=timestep.observation, action=np.int32(action),
        reward=np.float32(self._clip(next_timestep.reward)),
        discount=np.float32(next_timestep.discount), next_observation=next_timestep.observation))
    episode.episode_return += float(next_timestep.reward)
    episode.steps += 1
    self._env_steps += 1
    episode.timestep = next_timestep
    if not next_timestep.last():
      return episode
    self._episodes[index] += 1
    if self._logger:
      elapsed = time.time() - episode.start
      self._logger({'env_index': index, 'episode': self._episodes[index], 'episode_return': episode.episode_return,
                    'episode_length': episode.steps, 'env_steps': self._env_steps,
                    'learner_step': self._learner_step,
                    'env_steps_per_s': (self._env_steps - episode.start_env_steps) / max(elapsed, 1e-9)})
    return _Episode(self._environments[index].reset(), self._env_steps)
