"""Interventions against plasticity loss (section 5.2): a registry of small effects.

An intervention may (a) change the architecture's options, (b) change the
optimizer's options, and/or (c) add a hook run at every target-network update.
They compose: `--interventions=layernorm,reset_optimizer` applies both effects.
"""

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import jax
import optax

from agents.config import AgentConfig
from agents.learning import TargetUpdateHook, TrainingState
from agents.types import Params

# The output layer's module name: every architecture names its last layer so.
HEAD = 'head'


@dataclasses.dataclass(frozen=True)
class Intervention:
  # Options for `networks.ArchConfig` / `optimizers.OptimizerConfig`.
  arch_options: Callable[[AgentConfig], Dict[str, object]] = lambda config: {}
  optimizer_options: Callable[[AgentConfig], Dict[str, object]] = lambda config: {}
  # Builds the target-update hook from the config and the optimizer.
  target_update_hook: Optional[Callable[[AgentConfig, optax.GradientTransformation], TargetUpdateHook]] = None
  doc: str = ''


def reset_last_layer_hook(config: AgentConfig, optimizer: optax.GradientTransformation) -> TargetUpdateHook:
  del config, optimizer

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    params = {name: (fresh[name] if name.startswith(HEAD) else value) for name, value in state.params.items()}
    return state._replace(params=params)

  return hook


def reset_optimizer_hook(config: AgentConfig, optimizer: optax.GradientTransformation) -> TargetUpdateHook:
  del config

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    del fresh
    return state._replace(opt_state=optimizer.init(state.params))

  return hook


def shrink_and_perturb_hook(config: AgentConfig, optimizer: optax.GradientTransformation) -> TargetUpdateHook:
  del optimizer

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    params = jax.tree_util.tree_map(lambda p, f: config.shrink * p + config.perturb * f, state.params, fresh)
    return state._replace(params=params)

  return hook


INTERVENTIONS: Dict[str, Intervention] = {
    'layernorm': Intervention(
        arch_options=lambda config: {'layer_norm': True},
        doc='a layer norm after each hidden convolutional and fully connected layer (the ViT: its pre-norms)'),
    'spectral_norm': Intervention(
        arch_options=lambda config: {'spectral_norm': True},
        doc='spectral normalisation of the first linear or convolutional layer'),
    'weight_decay': Intervention(
        optimizer_options=lambda config: {'l2_penalty': config.weight_decay},
        doc='an l2 penalty (--weight_decay, 1e-5 by default)'),
    'shrink_and_perturb': Intervention(
        target_update_hook=shrink_and_perturb_hook,
        doc='theta <- shrink * theta + perturb * theta_fresh at each target update'),
    'reset_last_layer': Intervention(
        target_update_hook=reset_last_layer_hook,
        doc='re-initialise the output layer at each target update'),
    'reset_optimizer': Intervention(
        target_update_hook=reset_optimizer_hook,
        doc='reset the optimizer state at each target update'),
}


def validate(names: Sequence[str]) -> None:
  """Raises a ValueError naming the flag and the accepted values."""
  for name in names:
    if name not in INTERVENTIONS:
      raise ValueError(f'Unknown intervention {name!r} (--interventions); accepted: '
                       f'{", ".join(sorted(INTERVENTIONS))} (comma-separated, composable).')
  if len(set(names)) != len(names):
    raise ValueError(f'--interventions lists an intervention twice: {",".join(names)}.')
