"""The command line of a training run: `ExperimentConfig`'s fields as flags, and the presets.

Every flag is generated from its field's declaration (agents/config_flags.py),
so a new knob is one field. Defaults are the paper's settings for the
classification MDPs (see agents/config.py for the sources); `--preset` swaps in
another set of values for every flag not given on the command line.
"""

from typing import Any, Dict

from absl import flags

from agents import config_flags
import environments
from probes.run_dir import ExperimentConfig

# Whole-experiment presets: flag name -> value, used where the flag is not given.
PRESETS: Dict[str, Dict[str, Any]] = {
    # The field defaults: the paper's classification-MDP settings (sections 4.1, 5.2, appendix A.1/A.2).
    'mdp': {},
    # DQN Zoo's double DQN (Quan & Ostrovski 2020) as the paper's section 5.3 and
    # appendix A.3 run it: centred RMSProp at 2.5e-4 (no gradient-norm clip, as in
    # DQN Zoo's double_q), TD-error gradient clipped to 1/32, a replay of
    # 100,000 transitions (the paper's; DQN Zoo starts learning at 5% of its 1M,
    # i.e. 50,000), epsilon 0.1, one update of 32 per 4 environment steps
    # (32 / 4 = 8 samples per insert), the target network every 1.2e5 frames =
    # 30,000 agent steps = 7,500 updates. Add --interventions=layernorm for the
    # paper's modification.
    'atari': {
        'arch': 'nature_dqn', 'optimizer': 'rmsprop', 'learning_rate': 2.5e-4, 'td_error_clip': 1 / 32,
        'batch_size': 32, 'discount': 0.99, 'epsilon': 0.1, 'target_update_period': 7_500,
        'replay_capacity': 100_000, 'min_replay_size': 50_000, 'samples_per_insert': 8.0,
    },
}
PRESET = flags.DEFINE_enum('preset', 'auto', ['auto', *PRESETS],
                           'Values of the flags not given: atari (DQN Zoo double DQN, appendix A.3) or mdp (the '
                           'paper\'s classification-MDP settings); auto picks the one --env\'s family asks for.')
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
    takers = environments.families_taking(field.path[0])
    if takers and field.path[0] not in family.options and config_flags.value_of(config, field) != field.default:
      raise ValueError(f'--{field.flag} applies to {", ".join(f"{name}:*" for name in takers)} envs only, not '
                       f'--env={config.env}.')
  if config.replay.min_size > config.replay.capacity:
    raise ValueError(f'--min_replay_size={config.replay.min_size} exceeds --replay_capacity={config.replay.capacity} '
                     f'(preset {preset_name()}).')
  return config
