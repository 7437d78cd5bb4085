"""Evaluation episodes (probes/evaluation.py) and the Atari reference scores (environments/atari_scores.py)."""

import dataclasses
import os

import dm_env
from dm_env import specs
import jax
import numpy as np
import pytest

from agents.actor import actor_seed
from agents.builder import make_agent
from agents.config import AgentConfig, ReplayConfig
from agents.types import StopRequested
from environments import atari, atari_scores
from probes.evaluation import EpisodeEvaluator, EvaluationConfig, FrameSchedule, evaluation_seed, final_evaluation
from probes.records.run_dir import ExperimentConfig, RunLayout, write_or_check_config
from tests.conftest import SMALL_RUN, train


def test_reference_scores_cover_the_57_games_by_our_names():
  assert sorted(atari_scores.REFERENCE_SCORES) == sorted(atari.GAMES) and len(atari.GAMES) == 57
  assert atari_scores.reference('pong') == (-20.7, 14.6)  # Mnih et al. 2015, extended data table 2.
  assert atari_scores.reference('skiing') == (-17098.1, -4336.9)
  assert all(scores.human > scores.random for scores in atari_scores.REFERENCE_SCORES.values())
  with pytest.raises(ValueError, match='pongg.*alien'):
    atari_scores.reference('pongg')
  assert atari_scores.game_of('atari:ms_pacman') == 'ms_pacman'
  assert atari_scores.game_of('mdp:mnist:easy') is None


def test_human_normalised_scores_match_hand_computations():
  # Breakout: random 1.7, human 30.5, so human - random = 28.8.
  assert atari_scores.human_normalised('breakout', 1.7) == 0.0
  assert atari_scores.human_normalised('breakout', 30.5) == pytest.approx(1.0)
  assert atari_scores.human_normalised('breakout', 16.1) == pytest.approx(14.4 / 28.8)  # 0.5
  assert atari_scores.human_normalised('pong', -20.7 - 35.3) == pytest.approx(-1.0)  # Below random: negative.
  # Wang et al.'s improvement: over a baseline below the human, the human's range is the scale ...
  assert atari_scores.human_normalised_improvement('breakout', 16.1, baseline=1.7) == pytest.approx(0.5)
  assert atari_scores.human_normalised_improvement('breakout', 1.7, baseline=16.1) == pytest.approx(-0.5)
  # ... over a baseline above it, the baseline's own: (88.1 - 59.3) / (59.3 - 1.7) = 28.8 / 57.6.
  assert atari_scores.human_normalised_improvement('breakout', 88.1, baseline=59.3) == pytest.approx(0.5)
  # A score below random: Skiing, (-9000 - -12000) / (-4336.9 - -17098.1) = 3000 / 12761.2.
  assert atari_scores.human_normalised_improvement('skiing', -9000.0, baseline=-12000.0) == pytest.approx(
      3000 / 12761.2)


def test_the_frame_schedule_counts_frames_by_the_rate_limiter():
  # 1,000 transitions before learning, then 32 / 8 = 4 environment steps per update, 4 frames per step.
  schedule = FrameSchedule(2000, ReplayConfig(min_size=1000, samples_per_insert=8.0), batch_size=32,
                           frames_per_step=4)
  assert schedule.frames(0) == 4000 and schedule.frames(100) == (1000 + 400) * 4
  # Frame points 0, 2,000 and 4,000 all fall at step 0; 6,000 frames = 1,500 steps at update (1,500 - 1,000) / 4.
  assert schedule.next_step(None) == 0
  assert schedule.next_step(0) == 125 and schedule.frames(125) == 6000
  assert schedule.next_step(125) == 250 and schedule.next_step(130) == 250
  with pytest.raises(ValueError, match='--samples_per_insert'):
    FrameSchedule(2000, ReplayConfig(samples_per_insert=0.0), batch_size=32, frames_per_step=4)


class FiveStepEpisodes(dm_env.Environment):
  """Episodes of 5 steps repeating each action 4 frames: reward 1 for action 0, and `bonuses[k]` at the end of
  episode k; a different constant observation at each step."""
  action_repeat = 4

  def __init__(self, bonuses):
    self._bonuses = list(bonuses)
    self._episode, self._t = -1, 0

  def observation(self, t: int) -> np.ndarray:
    return np.full((4, 4, 1), 20 + 40 * t, np.uint8)

  def reset(self) -> dm_env.TimeStep:
    self._episode, self._t = self._episode + 1, 0
    return dm_env.restart(self.observation(0))

  def step(self, action) -> dm_env.TimeStep:
    self._t += 1
    reward = float(action == 0)
    if self._t == 5:
      return dm_env.termination(reward + self._bonuses[self._episode], self.observation(5))
    return dm_env.transition(reward, self.observation(self._t))

  def observation_spec(self):
    return specs.Array((4, 4, 1), np.uint8)

  def action_spec(self):
    return specs.DiscreteArray(3)


def _agent(training_epsilon: float):
  config = AgentConfig(width_multiplier=1 / 32, epsilon=training_epsilon)
  agent = make_agent(config, num_actions=3)
  return agent, config, agent.network.init(jax.random.PRNGKey(0), np.zeros((1, 4, 4, 1), np.uint8))


def test_an_evaluation_plays_whole_episodes_at_the_evaluation_epsilon_and_writes_one_record():
  agent, config, params = _agent(training_epsilon=1.0)  # Were the training epsilon used, the returns would vary.
  env = FiveStepEpisodes(bonuses=[0.0, 10.0, 30.0, 100.0])
  schedule = FrameSchedule(1000, ReplayConfig(min_size=100, samples_per_insert=8.0), batch_size=32,
                           frames_per_step=4)
  records = []
  evaluator = EpisodeEvaluator(agent, config, env, EvaluationConfig(every_frames=1000, frames=50, epsilon=0.0),
                               schedule, logger=records.append, game='pong')
  record = evaluator.evaluate(7, params)
  # Greedy: the same action at each step of every episode; 20 frames an episode, so 3 reach 50 frames.
  greedy = sum(int(np.argmax(agent.network.apply(params, env.observation(t)[None]).outputs[0])) == 0
               for t in range(5))
  assert record['returns'] == [greedy, greedy + 10.0, greedy + 30.0]
  assert record['episodes'] == 3 and record['eval_frames'] == 60 and record['epsilon'] == 0.0
  assert record['mean_return'] == pytest.approx(greedy + 40 / 3) and record['median_return'] == greedy + 10.0
  assert record['learner_step'] == 7 and record['frames'] == (100 + 7 * 4) * 4
  assert record['human_normalised'] == pytest.approx((greedy + 40 / 3 + 20.7) / 35.3)
  assert records == [record]
  assert EvaluationConfig().epsilon == 0.01  # DQN Zoo's evaluation epsilon, by default.


def test_an_evaluation_cut_short_by_a_stop_writes_nothing():
  agent, config, params = _agent(training_epsilon=0.1)
  records, calls = [], []
  evaluator = EpisodeEvaluator(agent, config, FiveStepEpisodes(bonuses=[0.0] * 9), EvaluationConfig(frames=50),
                               FrameSchedule(1000, ReplayConfig(), 32, 4), logger=records.append)
  stop = lambda: calls.append(1) or len(calls) > 12  # Within the third episode.
  assert evaluator.evaluate(0, params, should_stop=stop) is None and not records


class FakeLearner:
  """Publishes steps 0, 4, ..., 28, 30, the next at each `get_step`; finished once 30 is published."""

  def __init__(self, params):
    self.steps, self.index, self.params = [*range(0, 30, 4), 30], -1, params

  def get_step(self):
    self.index = min(self.index + 1, len(self.steps) - 1)
    return self.steps[self.index]

  def get_params(self):
    return self.steps[self.index], self.params

  def is_finished(self):
    return self.index == len(self.steps) - 1


@pytest.mark.parametrize('last_evaluated, expected', [(None, [0, 12, 20, 30]), (20, [30])])
def test_evaluations_fall_on_the_schedule_and_at_the_learner_end(last_evaluated, expected):
  agent, config, params = _agent(training_epsilon=0.1)
  records = []
  # 1 transition before learning, 4 environment steps an update, one frame a step: frames(s) = 1 + 4 s, so
  # evaluations are due at steps 0, 10 (40 frames), 20 (80), 30 (120); the learner publishes every 4 steps.
  evaluator = EpisodeEvaluator(agent, config, FiveStepEpisodes(bonuses=[0.0] * 99), EvaluationConfig(frames=5),
                               FrameSchedule(40, ReplayConfig(min_size=1, samples_per_insert=8.0), 32, 1),
                               logger=records.append)
  learner = FakeLearner(params)
  assert evaluator.run(learner.get_step, learner.get_params, learner.is_finished, should_stop=lambda: False,
                       last_evaluated=last_evaluated, poll_seconds=0.0)
  assert [r['learner_step'] for r in records] == expected


def test_a_stop_ends_the_evaluation_loop():
  agent, config, params = _agent(training_epsilon=0.1)

  def stopping():
    raise StopRequested('stop')

  evaluator = EpisodeEvaluator(agent, config, FiveStepEpisodes(bonuses=[0.0]), EvaluationConfig(frames=5),
                               FrameSchedule(40, ReplayConfig(), 32, 1), logger=lambda record: None)
  assert not evaluator.run(stopping, lambda: (0, params), lambda: False, should_stop=lambda: False)
  assert not evaluator.run(lambda: 0, lambda: (0, params), lambda: False, should_stop=lambda: True)


def test_a_runs_score_is_its_last_evaluation_from_the_last_launch_that_wrote_it():
  records = [{'learner_step': 0, 'mean_return': 1.0, 'attempt': 1},
             {'learner_step': 50, 'mean_return': 2.0, 'attempt': 1},
             {'learner_step': 50, 'mean_return': 3.0, 'attempt': 2},  # Written again by a relaunch.
             {'learner_step': 25, 'mean_return': 4.0, 'attempt': 2}]
  assert final_evaluation(records) == records[2]
  with pytest.raises(ValueError, match='--eval_every_frames'):
    final_evaluation([])


def test_evaluation_episodes_can_be_turned_on_when_a_run_resumes(tmp_path):
  """They do not change what is learnt; a changed learning flag is still refused."""
  config = ExperimentConfig(run_dir=str(tmp_path / 'run'))
  assert not write_or_check_config(config)
  assert write_or_check_config(dataclasses.replace(config, evaluation=EvaluationConfig(every_frames=1000)))
  with pytest.raises(ValueError, match='seed'):
    write_or_check_config(dataclasses.replace(config, seed=1))


def test_the_evaluation_seed_is_apart_from_every_actors_and_new_at_each_launch():
  seeds = {evaluation_seed(0, attempt) for attempt in (1, 2, 3)}
  assert len(seeds) == 3
  assert not seeds & {actor_seed(0, actor_id, attempt) for actor_id in range(1000) for attempt in (1, 2, 3)}


@pytest.mark.slow
def test_a_run_with_evaluation_episodes_writes_evaluation_jsonl(tmp_path):
  run_dir = str(tmp_path / 'run')
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every'))]
  # 200 transitions before learning, 4 environment steps (frames, on the MDP) per update: evaluations due at steps
  # 0 (frames 0 to 200), 25 (300), 100 (600, the end); the learner publishes every 50 steps.
  result = train(run_dir, '--launch_type=local_mt', *flags, '--max_learner_steps=100', '--probe_every=0',
                 '--eval_every_frames=300', '--eval_frames=200')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  layout = RunLayout(run_dir)
  records = layout.records(RunLayout.EVALUATION)
  steps = [r['learner_step'] for r in records]
  assert steps[0] == 0 and steps[-1] == 100 and steps == sorted(set(steps)) and set(steps) <= {0, 50, 100}
  for record in records:
    assert record['epsilon'] == 0.01 and record['attempt'] == 1
    assert record['episodes'] == 2 and record['eval_frames'] == 200  # MDP episodes: 100 steps, a frame each.
    assert record['frames'] == 200 + 4 * record['learner_step']
    assert len(record['returns']) == 2 and record['mean_return'] == pytest.approx(np.mean(record['returns']))
    assert 0 <= record['median_return'] <= 100 and 'human_normalised' not in record  # No reference scores.
  assert os.listdir(layout.tensorboard(RunLayout.EVALUATION))
