"""The one configuration of the double-DQN agent (DQN Zoo style: one config per agent).

Defaults follow the paper's classification-MDP experiments (sections 4.1, 5.2
and appendix A.1/A.2). Where the paper disagrees with itself, the choice and the
reason are noted beside the field.
"""

import dataclasses
import importlib
from typing import Any, Callable, Iterable, Optional, Tuple


def option(default: Any, help: str, *, flag: Optional[str] = None,  # pylint: disable=redefined-builtin
           choices: Optional[Callable[[], Iterable[str]]] = None, lower_bound: Optional[float] = None,
           upper_bound: Optional[float] = None) -> Any:
  """A configuration field, declared once: its default, its help and how the command line takes it.

  `agents/config_flags.py` turns every such field of the experiment's
  configuration into an absl flag (named `flag`, else after the field), so a
  new knob is one field here and nowhere else.
  """
  return dataclasses.field(default=default, metadata={
      'help': help, 'flag': flag, 'choices': choices, 'lower_bound': lower_bound, 'upper_bound': upper_bound})


def registered(module: str, registry: str) -> Callable[[], Iterable[str]]:
  """The names in a registry, looked up when asked (the registries import this module)."""
  return lambda: sorted(getattr(importlib.import_module(module), registry))


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  # Network and output encoding (registries in agents/networks.py, agents/encodings.py).
  arch: str = option('mlp', 'Network architecture.', choices=registered('agents.networks', 'ARCHITECTURES'))
  width_multiplier: float = option(1.0, 'Width multiplier of the network.', lower_bound=0.0)
  output: str = option('regress', 'Output encoding.', choices=registered('agents.encodings', 'ENCODINGS'))
  # Categorical encodings (two_hot, hl_gauss): see agents/encodings.py for the defaults' reason.
  num_bins: int = option(101, 'Bins of the categorical encodings (two_hot, hl_gauss).', lower_bound=2)
  support_min: float = option(-100.0, 'Lowest value of the categorical support.')
  support_max: float = option(100.0, 'Highest value of the categorical support.')
  # Composable interventions (registry in agents/interventions.py).
  interventions: Tuple[str, ...] = option((), 'Comma-separated interventions (they compose).',
                                          choices=registered('agents.interventions', 'INTERVENTIONS'))
  weight_decay: float = option(1e-5, 'l2 coefficient of --interventions=weight_decay (section 5.2).')
  shrink: float = option(0.8, 'Shrink factor lambda of shrink_and_perturb: theta <- shrink * theta + perturb * '
                         'theta_fresh.')
  perturb: float = option(0.2, 'Perturbation scale sigma of shrink_and_perturb.')
  # l2_init's c: the loss gains (c / 2) ||theta - theta_0||^2, whose gradient c (theta - theta_0) is the pull
  # --weight_decay=c exerts towards 0; the default is weight_decay's, so the two differ only in where they pull.
  l2_init: float = option(1e-5, 'Coefficient c of --interventions=l2_init: the loss gains (c / 2) ||theta - '
                          'theta_0||^2 (Kumar et al. 2023).', lower_bound=0.0)
  # ReDo (Sokar et al. 2023): their recycling period (1,000 updates) and their tau for DQN at replay ratio 0.25
  # (one update per 4 environment steps, ours), 0.025; they use 0.1 at higher replay ratios, the diagnostics'
  # dormant-unit threshold.
  redo_every: int = option(1000, 'Learner steps between the recyclings of --interventions=redo.', lower_bound=1)
  redo_threshold: float = option(0.025, 'Dormancy score tau at or below which --interventions=redo recycles a unit.',
                                 lower_bound=0.0)
  # Optimizer preset (registry in agents/optimizers.py); appendix A.1's Adam by default, DQN Zoo's RMSProp in the mdp
  # run preset (launch/presets.py says why).
  optimizer: str = option('adam', 'Optimizer preset.', choices=registered('agents.optimizers', 'OPTIMIZERS'))
  learning_rate: float = option(1e-3, 'Learning rate.', lower_bound=0.0)
  td_error_clip: Optional[float] = option(None, 'Clip the TD error gradient to +-this (None: no clip).')
  # Double DQN.
  discount: float = option(0.99, 'Discount factor gamma.', lower_bound=0.0, upper_bound=1.0)
  batch_size: int = option(32, 'Learner batch size.', lower_bound=1)
  # Section 4.1 says 1,000 learner steps, appendix A.2 says 10,000; the
  # experiments shown (figures 3-6, "100 iterations of 1000 steps") use 1,000.
  target_update_period: int = option(1000, 'Learner steps between target-network updates.', lower_bound=1)
  # Acting: the paper's training epsilon (appendix A.3); rewards clipped for learning.
  epsilon: float = option(0.1, 'Training epsilon.', lower_bound=0.0, upper_bound=1.0)
  reward_clip: Optional[float] = option(1.0, 'Clip rewards to +-this for learning (None: no clip).')


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
  """The replay the agent learns from (as Acme's agent configs hold theirs); launch/program/replay.py serves it."""
  capacity: int = option(100_000, 'Replay capacity (appendix A.3).', flag='replay_capacity', lower_bound=1)
  min_size: int = option(1_000, 'Transitions before learning starts.', flag='min_replay_size', lower_bound=1)
  # Items sampled per item inserted; batch 32 per 4 environment steps (DQN Zoo) is 8.
  samples_per_insert: float = option(8.0, 'Sampled items per inserted item held by the rate limiter.',
                                     lower_bound=0.0)
  # Slack of the ratio, as a fraction of samples_per_insert * min_size (as in Acme).
  samples_per_insert_tolerance: float = option(0.1, 'Slack of the samples-per-insert ratio, as a fraction of '
                                               'samples_per_insert * min_replay_size (as in Acme).', lower_bound=0.0)
  # Reverb's own checkpoints of both tables (data and rate-limiter counters) into the run directory, restored by a
  # relaunch; one more at a clean stop.
  checkpoint_every_minutes: float = option(10.0, 'Minutes between replay checkpoints; one more at a clean stop '
                                           '(0: no replay checkpoints, a relaunch refills the replay).',
                                           flag='replay_checkpoint_every_minutes', lower_bound=0.0)
