"""The flags -> ExperimentConfig mapping: presets fill only the flags not given."""

from absl import flags
from absl.testing import flagsaver
import pytest

from launch import flags as run_flags


def experiment_config(*argv: str):
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['train', '--run_dir=/nonexistent/run', *argv])
    try:
      return run_flags.experiment_config()
    finally:
      flags.FLAGS.unparse_flags()


def test_mdp_envs_get_the_paper_classification_defaults():
  config = experiment_config('--env=mdp:mnist:hard')
  assert (config.agent.arch, config.agent.optimizer, config.agent.learning_rate) == ('mlp', 'adam', 1e-3)
  assert config.agent.target_update_period == 1000
  assert config.replay.samples_per_insert == run_flags._REPLAY.samples_per_insert


def test_atari_envs_get_dqn_zoo_double_dqn_unless_a_flag_says_otherwise():
  config = experiment_config('--env=atari:pong')
  agent, replay = config.agent, config.replay
  assert (agent.arch, agent.optimizer, agent.learning_rate, agent.td_error_clip) == ('nature_dqn', 'rmsprop', 2.5e-4,
                                                                                      1 / 32)
  assert (agent.epsilon, agent.batch_size, agent.target_update_period) == (0.1, 32, 7500)
  # One update of 32 transitions per 4 environment steps.
  assert (replay.capacity, replay.min_size, replay.samples_per_insert) == (100_000, 50_000, 32 / 4)
  given = experiment_config('--env=atari:pong', '--learning_rate=1e-4', '--min_replay_size=1000')
  assert (given.agent.learning_rate, given.replay.min_size, given.agent.optimizer) == (1e-4, 1000, 'rmsprop')
  assert experiment_config('--env=atari:pong', '--preset=mdp').agent.optimizer == 'adam'
  assert experiment_config('--env=mdp:mnist:easy', '--preset=atari').agent.arch == 'nature_dqn'


def test_a_preset_clash_names_the_flags():
  with pytest.raises(ValueError, match='--min_replay_size=50000 exceeds --replay_capacity=1000'):
    experiment_config('--env=atari:pong', '--replay_capacity=1000')


def test_sticky_actions_reach_atari_envs_only():
  config = experiment_config('--env=atari:breakout', '--sticky_action_probability=0.25')
  assert config.env_options() == {'sticky_action_probability': 0.25}
  assert experiment_config('--env=mdp:mnist:easy').env_options() == {}
  with pytest.raises(ValueError, match='--sticky_action_probability applies to atari'):
    experiment_config('--env=mdp:mnist:easy', '--sticky_action_probability=0.25')
