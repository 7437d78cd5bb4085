"""Evaluation episodes: the learner's policy played at a small epsilon every N training frames (DQN Zoo's protocol).

DQN Zoo's double DQN (Quan & Ostrovski 2020), whose Atari protocol Lyle et
al. 2023 follow for figure 7, pauses training every 1,000,000 frames and plays
500,000 frames at epsilon 0.01 (`eval_exploration_epsilon`) with the training
preprocessing (up to 30 no-op starts, 108,000-frame episodes); its score is the
mean return of those episodes. Here a node plays them beside training, with the
learner's published parameters, through the training actor (`agents.Actor`,
its epsilon replaced, its transitions dropped), so acting is written once.

Frames are ALE frames: environment steps x the environment's `action_repeat`
(4 for Atari; environments without one, the MDPs, count a step as a frame).
Training frames are counted from the learner's step, by the replay's rate
limiter: it lets the learner sample only once `min_replay_size` transitions
are in, and then `samples_per_insert` items per inserted one, so after s
updates of `batch_size` the actors have taken min_replay_size + s x batch_size
/ samples_per_insert environment steps (within the limiter's error buffer).
This count is the same for every run of a configuration, so evaluation points
of compared runs (with and without layer norm) fall at the same learner steps,
and a relaunch resumes it from the checkpoint's step; counting the actors' own
steps would need every actor's count, lost with a killed actor.
"""

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Tuple

import dm_env
import numpy as np

from agents.actor import Actor
from agents.builder import AgentParts
from agents.config import AgentConfig, ReplayConfig, option
from agents.types import Logger, Params, StopRequested
from environments import atari_scores


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """Evaluation episodes; their flags are `--eval_<field>`."""
  every_frames: int = option(0, 'Training frames between evaluations of the learner\'s policy in evaluation '
                             'episodes, written to the evaluation stream (0: none; DQN Zoo: 1,000,000).',
                             lower_bound=0)
  frames: int = option(500_000, 'Frames an evaluation plays at least: episodes start until this many frames are '
                       'played, each played to its end (DQN Zoo: 500,000).', lower_bound=1)
  epsilon: float = option(0.01, 'Epsilon of the evaluation episodes (DQN Zoo\'s eval_exploration_epsilon).',
                          lower_bound=0.0, upper_bound=1.0)

  @property
  def enabled(self) -> bool:
    return self.every_frames > 0


def evaluation_seed(run_seed: int, attempt: int) -> int:
  """The evaluation environment's and policy's seed: new at each launch, apart from every actor's
  (`agents.actor.actor_seed` hashes [run_seed, attempt, actor_id]; a spawn key sets this one apart)."""
  low, high = np.random.SeedSequence([run_seed, attempt], spawn_key=(1,)).generate_state(2, np.uint32)
  return (int(high) << 31) ^ int(low)


def final_evaluation(records: List[Dict[str, object]]) -> Dict[str, object]:
  """A run's evaluation record at its last evaluated learner step (the last written, when a relaunch
  evaluated that step again): its `mean_return` is the run's score."""
  if not records:
    raise ValueError('No evaluation records: was the run launched with --eval_every_frames > 0?')
  last = max(record['learner_step'] for record in records)
  return [record for record in records if record['learner_step'] == last][-1]


def action_repeat(environment: dm_env.Environment) -> int:
  """Frames per environment step: an environment that repeats actions says so with an `action_repeat` attribute."""
  return int(getattr(environment, 'action_repeat', 1))


class FrameSchedule:
  """Training frames at a learner step, and the learner steps at which evaluations fall (see the module's doc)."""

  def __init__(self, every_frames: int, replay: ReplayConfig, batch_size: int, frames_per_step: int):
    if replay.samples_per_insert <= 0:
      raise ValueError('--eval_every_frames counts training frames through the replay\'s rate limiter: it needs '
                       f'--samples_per_insert > 0; got {replay.samples_per_insert}.')
    self._every_frames = every_frames
    self._min_size = replay.min_size
    self._steps_per_update = batch_size / replay.samples_per_insert
    self._frames_per_step = frames_per_step

  def frames(self, learner_step: int) -> int:
    return int(round((self._min_size + learner_step * self._steps_per_update) * self._frames_per_step))

  def _step_of(self, point: int) -> int:
    """The first learner step at which the training frames reach `point` x every_frames."""
    env_steps = point * self._every_frames / self._frames_per_step
    return max(0, math.ceil((env_steps - self._min_size) / self._steps_per_update - 1e-9))

  def next_step(self, after: Optional[int]) -> int:
    """The first evaluation step after learner step `after` (None: the first of the run, step 0)."""
    if after is None:
      return 0
    point = self.frames(after) // self._every_frames + 1
    while self._step_of(point) <= after:
      point += 1
    return self._step_of(point)


class EpisodeEvaluator:
  """Plays evaluation episodes with given parameters and writes one record per evaluation to `logger`.

  `game` (an Atari game, `atari_scores.game_of(spec)`) adds the human-normalised
  score of the mean return; other environments have no reference scores.
  """

  def __init__(self, agent: AgentParts, agent_config: AgentConfig, environment: dm_env.Environment,
               config: EvaluationConfig, schedule: FrameSchedule, logger: Logger, seed: int = 0,
               game: Optional[str] = None):
    self._config = config
    self._schedule = schedule
    self._logger = logger
    self._game = game
    self._frames_per_step = action_repeat(environment)
    self._current: Optional[Tuple[int, Params]] = None
    self._returns: List[float] = []
    self._frames_played = 0
    # One actor for every evaluation (its policy compiled once): the parameters of the evaluation under way at
    # every step, no transitions kept.
    self._actor = Actor(agent, dataclasses.replace(agent_config, epsilon=config.epsilon), environment,
                        params_source=lambda: self._current, add=lambda transition: None, seed=seed,
                        params_update_period=1, logger=self._on_episode)

  def _on_episode(self, record: Dict[str, object]) -> None:
    self._returns.append(float(record['episode_return']))
    self._frames_played += int(record['episode_length']) * self._frames_per_step

  def evaluate(self, learner_step: int, params: Params,
               should_stop: Callable[[], bool] = lambda: False) -> Optional[Dict[str, object]]:
    """Plays episodes until `config.frames` frames (each episode to its end); writes and returns their record,
    or None, writing nothing, when `should_stop()` cut them short."""
    self._current, self._returns, self._frames_played = (learner_step, params), [], 0
    start = time.time()
    # Checked at every step; the count changes only when an episode ends, so none is cut short.
    self._actor.run(should_stop=lambda: should_stop() or self._frames_played >= self._config.frames)
    if self._frames_played < self._config.frames:
      return None
    returns = np.asarray(self._returns)
    record = {'learner_step': learner_step, 'frames': self._schedule.frames(learner_step),
              'episodes': len(returns), 'eval_frames': self._frames_played, 'epsilon': self._config.epsilon,
              'mean_return': float(returns.mean()), 'median_return': float(np.median(returns)),
              'returns': returns.tolist(), 'eval_time_s': time.time() - start}
    if self._game is not None:
      record['human_normalised'] = atari_scores.human_normalised(self._game, record['mean_return'])
    self._logger(record)
    return record

  def run(self, learner_step: Callable[[], int], get_params: Callable[[], Tuple[int, Params]],
          learner_finished: Callable[[], bool], should_stop: Callable[[], bool],
          last_evaluated: Optional[int] = None, poll_seconds: float = 1.0) -> bool:
    """Evaluates at the schedule's learner steps after `last_evaluated` (a relaunch's last record), and the
    learner's last step once it has finished; an evaluation slower than training evaluates the latest parameters
    when it is done. Returns True when the last step is evaluated, False on a stop request; the Courier calls
    may raise `StopRequested`, which is a stop too."""
    due = self._schedule.next_step(last_evaluated)
    try:
      while not should_stop():
        finished = learner_finished()  # Before the step: the last step is published before the learner finishes.
        if finished or learner_step() >= due:
          step, params = get_params()
          if step != last_evaluated:
            if self.evaluate(step, params, should_stop) is None:
              return False
            last_evaluated = step
          if finished:
            return True
          due = self._schedule.next_step(step)
        else:
          time.sleep(poll_seconds)
    except StopRequested:
      pass
    return False
