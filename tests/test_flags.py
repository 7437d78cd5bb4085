"""The flags -> ExperimentConfig mapping: presets fill only the flags not given."""

from absl import flags
from absl.testing import flagsaver
import pytest

from agents import config_flags
from agents.config import ReplayConfig
from launch import flags as run_flags
from probes.records.run_dir import ExperimentConfig


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
  # Appendix A.2: the Atari agent's optimizer; appendix A.1's Adam is the mdp_adam preset.
  assert (config.agent.arch, config.agent.optimizer, config.agent.learning_rate) == ('mlp', 'rmsprop', 2.5e-4)
  adam = experiment_config('--env=mdp:mnist:hard', '--preset=mdp_adam').agent
  assert (adam.optimizer, adam.learning_rate, adam.arch) == ('adam', 1e-3, 'mlp')
  assert config.agent.target_update_period == 1000
  assert config.replay.samples_per_insert == ReplayConfig().samples_per_insert


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
  assert experiment_config('--env=atari:pong', '--preset=mdp').agent.arch == 'mlp'
  assert experiment_config('--env=mdp:mnist:easy', '--preset=atari').agent.arch == 'nature_dqn'


def test_a_preset_clash_names_the_flags():
  with pytest.raises(ValueError, match='--min_replay_size=50000 exceeds --replay_capacity=1000'):
    experiment_config('--env=atari:pong', '--replay_capacity=1000')


def test_sticky_actions_reach_atari_envs_only():
  config = experiment_config('--env=atari:breakout', '--sticky_action_probability=0.25')
  assert config.env_options() == {'sticky_action_probability': 0.25}
  assert experiment_config('--env=mdp:mnist:easy').env_options() == {}
  assert experiment_config('--env=mdp:mnist:easy', '--data_dir=/d').env_options() == {'data_dir': '/d'}
  with pytest.raises(ValueError, match='--sticky_action_probability applies to atari'):
    experiment_config('--env=mdp:mnist:easy', '--sticky_action_probability=0.25')


def _other_value(field: config_flags.ConfigField):
  """A valid value of the field's flag other than its default."""
  choices = field.metadata['choices']
  if field.kind is tuple:
    return [list(choices())[0]]
  if choices:
    return next(c for c in choices() if c != field.default)
  if field.kind is bool:
    return not field.default
  if field.kind is str:
    return 'mdp:mnist:hard' if field.flag == 'env' else '/some/where'
  base = field.default if field.default is not None else (field.metadata['lower_bound'] or 0) + 1
  upper = field.metadata['upper_bound']
  value = base / 2 if upper is not None and base > 0 else base + 1
  return field.kind(value) if field.kind is int else float(value)


def test_every_field_of_the_experiment_is_a_flag_and_can_be_set_by_a_preset(monkeypatch):
  fields = config_flags.fields(ExperimentConfig)
  assert {f.flag for f in fields} == {f.flag for f in run_flags.FIELDS}
  leaves = {f.path for f in fields}
  assert ('run_dir',) in leaves and ('probe', 'steps') in leaves and ('diagnostics', 'noise_scale') in leaves
  assert ('replay', 'samples_per_insert_tolerance') in leaves and ('agent', 'reward_clip') in leaves
  for field in fields:
    if field.flag in ('run_dir', 'env', 'data_dir', 'sticky_action_probability'):
      continue  # Set on the command line below; env options are checked against the env's family.
    value = _other_value(field)
    as_config = tuple(value) if field.kind is tuple else value
    given = experiment_config(f'--{field.flag}={",".join(value) if field.kind is tuple else value}')
    assert config_flags.value_of(given, field) == as_config, field.flag
    monkeypatch.setitem(run_flags.PRESETS, 'mdp', {field.flag: as_config})
    preset = experiment_config()
    assert config_flags.value_of(preset, field) == as_config, field.flag
    monkeypatch.setitem(run_flags.PRESETS, 'mdp', {})
  assert experiment_config('--data_dir=/data').launch.data_dir == '/data'
  assert experiment_config('--env=atari:pong', '--sticky_action_probability=0.25').sticky_action_probability == 0.25
