"""The command line of a training run: `ExperimentConfig`'s fields as flags, and the presets.

Every flag is generated from its field's declaration (agents/config_flags.py),
so a new knob is one field; `--preset` (launch/presets.py) sets the values of
every flag not given on the command line.
"""

from absl import flags

from agents import config_flags
import environments
from launch.presets import PRESETS
from probes.records.run_dir import ExperimentConfig

PRESET = flags.DEFINE_enum('preset', 'auto', ['auto', *PRESETS],
                           'Values of the flags not given: atari (DQN Zoo double DQN, appendix A.3), mdp (the '
                           'paper\'s classification-MDP settings, DQN Zoo\'s RMSProp) or mdp_adam (the same with '
                           'appendix A.1\'s Adam, which kills units: section 3.1); auto picks the one --env\'s family '
                           'asks for.')
FIELDS = config_flags.define(ExperimentConfig, presets=PRESETS)


def preset_name() -> str:
  """The preset in force: --preset, or the one --env's family asks for."""
  if PRESET.value != 'auto':
    return PRESET.value
  return environments.family(flags.FLAGS.env).preset


def experiment_config() -> ExperimentConfig:
  """The configuration the parsed flags describe (validated further by the builders)."""
  config = config_flags.build(ExperimentConfig, FIELDS, PRESETS[preset_name()])
  if not config.run_dir:
    raise ValueError('--run_dir is required (a new directory, or an existing run to resume).')
  family = environments.family(config.env)
  for field in FIELDS:  # An environment option set for a family that does not take it.
    takers = environments.families_taking(field.path[-1])
    if takers and field.path[-1] not in family.options and config_flags.value_of(config, field) != field.default:
      raise ValueError(f'--{field.flag} applies to {", ".join(f"{name}:*" for name in takers)} envs only, not '
                       f'--env={config.env}.')
  if config.replay.min_size > config.replay.capacity:
    raise ValueError(f'--min_replay_size={config.replay.min_size} exceeds --replay_capacity={config.replay.capacity} '
                     f'(preset {preset_name()}).')
  return config
