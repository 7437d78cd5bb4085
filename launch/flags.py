"""absl flags of a training run, and their mapping to `ExperimentConfig`.

Defaults are the paper's settings for the classification MDPs (see
agents/config.py for the sources); `--preset` swaps in another set of defaults
(DQN Zoo's double DQN for Atari) for every flag not given on the command line.
Every choice-valued flag lists its accepted values in `--helpfull` and in the
error a bad value raises.
"""

import dataclasses
from typing import Any, Dict

from absl import flags

from agents import encodings, interventions, networks, optimizers
from agents.config import AgentConfig
from launch.experiment import ExperimentConfig
from launch.replay import ReplayConfig
from probes.diagnostics import DiagnosticsConfig
from probes.plasticity import ProbeConfig

_AGENT, _REPLAY, _PROBE, _DIAGNOSTICS = AgentConfig(), ReplayConfig(), ProbeConfig(), DiagnosticsConfig()

# Whole-experiment presets: flag name -> default, used where the flag is not given.
PRESETS: Dict[str, Dict[str, Any]] = {
    # The flag defaults: the paper's classification-MDP settings (sections 4.1, 5.2, appendix A.1/A.2).
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
                           'Defaults for the flags not given: atari (DQN Zoo double DQN, appendix A.3) or mdp (the '
                           'paper\'s classification-MDP settings); auto picks atari for atari:* envs, else mdp.')

ENV = flags.DEFINE_string('env', 'mdp:mnist:easy', 'Environment spec, e.g. mdp:mnist:easy, mdp:cifar10:hard, atari:pong.')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'Directory holding the datasets (else $PLASTICITY_DATA_DIR, '
                               'the user cache, a download, or the embedded MNIST sample).')
STICKY_ACTION_PROBABILITY = flags.DEFINE_float(
    'sticky_action_probability', 0.0, 'atari:* only: probability that ALE repeats the previous action instead '
    '(0.25 is Machado et al. 2018\'s setting; 0 is DQN Zoo\'s).', lower_bound=0.0, upper_bound=1.0)
RUN_DIR = flags.DEFINE_string('run_dir', None, 'Run directory; relaunching with the same flags resumes it.')
NUM_ACTORS = flags.DEFINE_integer('num_actors', 2, 'Number of actor nodes.', lower_bound=1)
LAUNCH_TYPE = flags.DEFINE_enum('launch_type', 'local_mp', ['local_mp', 'local_mt'],
                                'local_mp: one process per node; local_mt: threads in one process.')
MAX_LEARNER_STEPS = flags.DEFINE_integer('max_learner_steps', 100_000, 'Learner updates of the run.', lower_bound=1)
SEED = flags.DEFINE_integer('seed', 0, 'Random seed.')
CHECKPOINT_EVERY = flags.DEFINE_integer('checkpoint_every', 5000, 'Learner steps between checkpoints.', lower_bound=1)
LOG_EVERY = flags.DEFINE_integer('log_every', 100, 'Learner steps between logged records and parameter snapshots.',
                                 lower_bound=1)

ARCH = flags.DEFINE_enum('arch', _AGENT.arch, sorted(networks.ARCHITECTURES), 'Network architecture.')
WIDTH_MULTIPLIER = flags.DEFINE_float('width_multiplier', _AGENT.width_multiplier, 'Width multiplier of the network.',
                                      lower_bound=0.0)
OUTPUT = flags.DEFINE_enum('output', _AGENT.output, sorted(encodings.ENCODINGS), 'Output encoding.')
NUM_BINS = flags.DEFINE_integer('num_bins', _AGENT.num_bins, 'Bins of the categorical encodings (two_hot, hl_gauss).',
                                lower_bound=2)
SUPPORT_MIN = flags.DEFINE_float('support_min', _AGENT.support_min, 'Lowest value of the categorical support.')
SUPPORT_MAX = flags.DEFINE_float('support_max', _AGENT.support_max, 'Highest value of the categorical support.')
INTERVENTIONS = flags.DEFINE_list('interventions', [], 'Comma-separated interventions: '
                                  + ', '.join(sorted(interventions.INTERVENTIONS)) + '.')
WEIGHT_DECAY = flags.DEFINE_float('weight_decay', _AGENT.weight_decay, 'l2 coefficient of --interventions=weight_decay.')
SHRINK = flags.DEFINE_float('shrink', _AGENT.shrink, 'Shrink factor of shrink_and_perturb.')
PERTURB = flags.DEFINE_float('perturb', _AGENT.perturb, 'Perturbation scale of shrink_and_perturb.')
OPTIMIZER = flags.DEFINE_enum('optimizer', _AGENT.optimizer, sorted(optimizers.OPTIMIZERS), 'Optimizer preset.')
LEARNING_RATE = flags.DEFINE_float('learning_rate', _AGENT.learning_rate, 'Learning rate.', lower_bound=0.0)
TD_ERROR_CLIP = flags.DEFINE_float('td_error_clip', None, 'Clip the TD error gradient to +-this (None: no clip).')
DISCOUNT = flags.DEFINE_float('discount', _AGENT.discount, 'Discount factor gamma.', lower_bound=0.0, upper_bound=1.0)
BATCH_SIZE = flags.DEFINE_integer('batch_size', _AGENT.batch_size, 'Learner batch size.', lower_bound=1)
TARGET_UPDATE_PERIOD = flags.DEFINE_integer('target_update_period', _AGENT.target_update_period,
                                            'Learner steps between target-network updates.', lower_bound=1)
EPSILON = flags.DEFINE_float('epsilon', _AGENT.epsilon, 'Training epsilon.', lower_bound=0.0, upper_bound=1.0)
REWARD_CLIP = flags.DEFINE_float('reward_clip', _AGENT.reward_clip, 'Clip rewards to +-this for learning.')

REPLAY_CAPACITY = flags.DEFINE_integer('replay_capacity', _REPLAY.capacity, 'Replay capacity.', lower_bound=1)
MIN_REPLAY_SIZE = flags.DEFINE_integer('min_replay_size', _REPLAY.min_size, 'Transitions before learning starts.',
                                       lower_bound=1)
SAMPLES_PER_INSERT = flags.DEFINE_float('samples_per_insert', _REPLAY.samples_per_insert,
                                        'Sampled items per inserted item held by the rate limiter.', lower_bound=0.0)

PROBE_EVERY = flags.DEFINE_integer('probe_every', 5000, 'Learner steps between plasticity probes (0: no evaluator).',
                                   lower_bound=0)
PROBE_STEPS = flags.DEFINE_integer('probe_steps', _PROBE.steps, 'Optimizer steps of each probe fit.', lower_bound=1)
PROBE_TARGETS = flags.DEFINE_integer('probe_targets', _PROBE.num_targets, 'Random target functions per probe.',
                                     lower_bound=1)
PROBE_BATCH_SIZE = flags.DEFINE_integer('probe_batch_size', _PROBE.batch_size, 'Minibatch size of the probe fits.',
                                        lower_bound=1)
PROBE_INPUTS = flags.DEFINE_integer('probe_inputs', _PROBE.num_inputs, 'Distinct replay observations in the probe '
                                    'input set (fewer if the replay holds fewer at the first probe point).',
                                    lower_bound=1)
PROBE_FRESH_INPUTS = flags.DEFINE_bool('probe_fresh_inputs', _PROBE.fresh_inputs, 'Draw new probe inputs, targets and '
                                       'transitions at every probe point (default: one set for the whole run, drawn '
                                       'at the first point and saved as probe_set.npz).')

DIAGNOSTICS = flags.DEFINE_bool('diagnostics', True, 'Run the curvature and representation diagnostics at every '
                                'probe point (--nodiagnostics: the probe only).')
HESSIAN_BATCH_SIZE = flags.DEFINE_integer('hessian_batch_size', _DIAGNOSTICS.hessian_batch_size,
                                          'Probe inputs in the Hessian\'s batch.', lower_bound=1)
LANCZOS_STEPS = flags.DEFINE_integer('lanczos_steps', _DIAGNOSTICS.lanczos_steps,
                                     'Lanczos steps of the Hessian density.', lower_bound=2)
COVARIANCE_SAMPLES = flags.DEFINE_integer('covariance_samples', _DIAGNOSTICS.covariance_samples,
                                          'k of the gradient covariance C_k of the probe loss.', lower_bound=2)
TD_COVARIANCE_SAMPLES = flags.DEFINE_integer('td_covariance_samples', _DIAGNOSTICS.td_covariance_samples,
                                             'Replay transitions in the TD-loss gradient covariance (0: off).',
                                             lower_bound=0)


def diagnostics_config() -> DiagnosticsConfig:
  return dataclasses.replace(_DIAGNOSTICS, hessian_batch_size=HESSIAN_BATCH_SIZE.value,
                             hessian_chunk_size=min(_DIAGNOSTICS.hessian_chunk_size, HESSIAN_BATCH_SIZE.value),
                             lanczos_steps=LANCZOS_STEPS.value, covariance_samples=COVARIANCE_SAMPLES.value,
                             td_covariance_samples=TD_COVARIANCE_SAMPLES.value)


def preset_name() -> str:
  """The preset in force: --preset, or the one --env's family implies."""
  if PRESET.value != 'auto':
    return PRESET.value
  return 'atari' if ENV.value.startswith('atari:') else 'mdp'


def _value(holder: flags.FlagHolder) -> Any:
  """A flag's value: given on the command line, else the preset's default, else the flag's."""
  if flags.FLAGS[holder.name].present:
    return holder.value
  return PRESETS[preset_name()].get(holder.name, holder.value)


def experiment_config() -> ExperimentConfig:
  """The configuration the parsed flags describe (validated by the builders)."""
  if not RUN_DIR.value:
    raise ValueError('--run_dir is required (a new directory, or an existing run to resume).')
  agent = AgentConfig(
      arch=_value(ARCH), width_multiplier=WIDTH_MULTIPLIER.value, output=OUTPUT.value, num_bins=NUM_BINS.value,
      support_min=SUPPORT_MIN.value, support_max=SUPPORT_MAX.value,
      interventions=tuple(INTERVENTIONS.value), weight_decay=WEIGHT_DECAY.value, shrink=SHRINK.value,
      perturb=PERTURB.value, optimizer=_value(OPTIMIZER), learning_rate=_value(LEARNING_RATE),
      td_error_clip=_value(TD_ERROR_CLIP), discount=_value(DISCOUNT), batch_size=_value(BATCH_SIZE),
      target_update_period=_value(TARGET_UPDATE_PERIOD), epsilon=_value(EPSILON), reward_clip=REWARD_CLIP.value)
  replay = ReplayConfig(capacity=_value(REPLAY_CAPACITY), min_size=_value(MIN_REPLAY_SIZE),
                        samples_per_insert=_value(SAMPLES_PER_INSERT))
  probe = dataclasses.replace(_PROBE, steps=PROBE_STEPS.value, num_targets=PROBE_TARGETS.value,
                              batch_size=PROBE_BATCH_SIZE.value, num_inputs=PROBE_INPUTS.value,
                              fresh_inputs=PROBE_FRESH_INPUTS.value)
  if STICKY_ACTION_PROBABILITY.value and not ENV.value.startswith('atari:'):
    raise ValueError(f'--sticky_action_probability applies to atari:* envs only, not --env={ENV.value}.')
  if replay.min_size > replay.capacity:
    raise ValueError(f'--min_replay_size={replay.min_size} exceeds --replay_capacity={replay.capacity} '
                     f'(preset {preset_name()}).')
  return ExperimentConfig(
      run_dir=RUN_DIR.value, env=ENV.value, data_dir=DATA_DIR.value,
      sticky_action_probability=STICKY_ACTION_PROBABILITY.value, num_actors=NUM_ACTORS.value,
      launch_type=LAUNCH_TYPE.value, max_learner_steps=MAX_LEARNER_STEPS.value, seed=SEED.value, agent=agent,
      replay=replay, probe=probe, probe_every=PROBE_EVERY.value, diagnostics_enabled=DIAGNOSTICS.value,
      diagnostics=diagnostics_config(), checkpoint_every=CHECKPOINT_EVERY.value,
      log_every=LOG_EVERY.value)
