"""Interventions against plasticity loss (section 5.2 and after): a registry of small effects.

An intervention is a few optional effects, each built from the agent's
configuration (builders take `(config, network, optimizer)`):
  (a) `arch_options`: options of `networks.ArchConfig` (layernorm, spectral_norm);
  (b) `optimizer_options`: options of `optimizers.OptimizerConfig` (weight_decay);
  (c) `target_update_hook`: a change of the training state at every target
      update, given one fresh initialisation (shrink_and_perturb, reset_*);
  (d) `loss_term`: a term added to the TD loss in the pure update, a function
      of the online parameters, the initial ones and the batch (l2_init);
  (e) `periodic_action` with its `period`: a change of the training state every
      `period(config)` learner steps, made on that step's batch (redo).
Its own configuration is the `AgentConfig` fields named in `options` (each a
flag of that name and `agent.<name>` in config.json); `architectures`, when
set, is the architectures it applies to. They compose:
`--interventions=layernorm,reset_optimizer` applies both, hooks in the order
given. A new intervention is one entry here (and its fields in AgentConfig).
"""

import dataclasses
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

from agents import networks
from agents.config import AgentConfig
from environments.registry import Registry
from agents.types import Network, Params, Transition
from agents.update import LossTerm, Metrics, StateAction, TargetUpdateHook, TrainingState, check_batch

Optimizer = optax.GradientTransformation


@dataclasses.dataclass(frozen=True)
class Intervention:
  doc: str
  # The AgentConfig fields it reads: its own configuration.
  options: Tuple[str, ...] = ()
  # The architectures it applies to; None: all.
  architectures: Optional[FrozenSet[str]] = None
  arch_options: Callable[[AgentConfig], Dict[str, object]] = lambda config: {}
  optimizer_options: Callable[[AgentConfig], Dict[str, object]] = lambda config: {}
  target_update_hook: Optional[Callable[[AgentConfig, Network, Optimizer], TargetUpdateHook]] = None
  loss_term: Optional[Callable[[AgentConfig, Network, Optimizer], LossTerm]] = None
  periodic_action: Optional[Callable[[AgentConfig, Network, Optimizer], StateAction]] = None
  period: Optional[Callable[[AgentConfig], int]] = None

  def __post_init__(self):
    if (self.periodic_action is None) != (self.period is None):
      raise ValueError('An intervention has a periodic_action exactly when it has a period.')
    unknown = set(self.options) - {field.name for field in dataclasses.fields(AgentConfig)}
    if unknown:
      raise ValueError(f'Intervention options {sorted(unknown)} are not AgentConfig fields.')

  def applies_to(self, arch: str) -> bool:
    return self.architectures is None or arch in self.architectures


INTERVENTIONS: Registry[Intervention] = Registry('intervention', '--interventions')


def reset_last_layer_hook(config: AgentConfig, network: Network, optimizer: Optimizer) -> TargetUpdateHook:
  del config, network, optimizer

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    params = {name: (fresh[name] if name.startswith(networks.HEAD) else value) for name, value in state.params.items()}
    return state._replace(params=params)

  return hook


def reset_optimizer_hook(config: AgentConfig, network: Network, optimizer: Optimizer) -> TargetUpdateHook:
  del config, network

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    del fresh
    return state._replace(opt_state=optimizer.init(state.params))

  return hook


def shrink_and_perturb_hook(config: AgentConfig, network: Network, optimizer: Optimizer) -> TargetUpdateHook:
  del network, optimizer

  def hook(state: TrainingState, fresh: Params) -> TrainingState:
    params = jax.tree_util.tree_map(lambda p, f: config.shrink * p + config.perturb * f, state.params, fresh)
    return state._replace(params=params)

  return hook


def l2_init_term(config: AgentConfig, network: Network, optimizer: Optimizer) -> LossTerm:
  """(c / 2) ||theta - theta_0||^2 over every parameter, c = --l2_init.

  Kumar et al. (2023)'s L2 Init with their lambda = c / 2: its gradient
  c (theta - theta_0) is the pull --weight_decay=c exerts towards 0.
  """
  del network, optimizer

  def term(params: Params, initial_params: Params, batch: Transition) -> jax.Array:
    del batch
    chex.assert_trees_all_equal_shapes(params, initial_params)
    squares = jax.tree_util.tree_map(lambda p, p0: jnp.sum(jnp.square(p - p0)), params, initial_params)
    return 0.5 * config.l2_init * sum(jax.tree_util.tree_leaves(squares))

  return term


def relative_activity(activity: Sequence[jax.Array]) -> Tuple[jax.Array, ...]:
  """Sokar et al.'s score s_i = a_i / mean_j a_j per layer from each unit's mean |h| a_i; a silent layer scores 0.

  The one definition of dormancy: ReDo recycles on it, and the diagnostics'
  dormant units (probes/measures/statistics.py) count it.
  """
  scores = []
  for layer in activity:
    mean = jnp.mean(layer)
    scores.append(jnp.where(mean > 0, layer / jnp.where(mean > 0, mean, 1.0), 0.0))
  return tuple(scores)


def dormancy_scores(hidden: Sequence[jax.Array]) -> Tuple[jax.Array, ...]:
  """Per hidden layer, s_i over the batch; a conv channel is a unit, its |h| averaged over positions."""
  return relative_activity([jnp.mean(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0) for h in hidden])


def recycling_masks(params: Params, chain: Sequence[str], dormant: Sequence[jax.Array]) -> Tuple[Params, Params]:
  """(re-initialised, zeroed): boolean trees shaped like `params` marking each dormant unit's weights.

  Unit i of layer `chain[l]` is re-initialised in every leaf of that layer
  and its `_layer_norm` (last axis: w's column, b, scale, offset) and zeroed
  in the next layer's `w` (its rows reading unit i: `w` seen as
  [-1, units, out], which covers dense, conv and flattened-conv inputs).
  """
  blank = lambda: jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, bool), params)
  reinit, zero = blank(), blank()
  for layer, following, mask in zip(chain[:-1], chain[1:], dormant):
    units = mask.shape[0]
    for module in (layer, f'{layer}_layer_norm'):
      for name, value in params.get(module, {}).items():
        chex.assert_axis_dimension(value, -1, units)
        reinit[module][name] = jnp.broadcast_to(mask, value.shape)
    w = params[following]['w']
    chex.assert_is_divisible(w.size, units * w.shape[-1])
    rows = jnp.broadcast_to(mask[None, :, None], (w.size // (units * w.shape[-1]), units, w.shape[-1]))
    zero[following]['w'] = rows.reshape(w.shape)
  return reinit, zero


def reset_moments(opt_state: optax.OptState, touched: Params) -> optax.OptState:
  """Zeroes the touched entries of every optimizer-state subtree shaped like the parameters.

  Those are the per-parameter statistics (Adam's mu and nu, RMSProp's nu and
  mu); step counts and everything else are kept, as Sokar et al.'s code does.
  """
  structure = jax.tree_util.tree_structure(touched)
  is_moments = lambda node: jax.tree_util.tree_structure(node) == structure
  reset = lambda moments: jax.tree_util.tree_map(lambda m, t: jnp.where(t, jnp.zeros_like(m), m), moments, touched)
  return jax.tree_util.tree_map(lambda node: reset(node) if is_moments(node) else node, opt_state, is_leaf=is_moments)


def redo_action(config: AgentConfig, network: Network, optimizer: Optimizer) -> StateAction:
  """ReDo (Sokar et al. 2023, algorithm 1) on the batch's observations.

  Each hidden unit with s_i <= --redo_threshold gets its incoming weights and
  bias (and layer-norm scale and offset) from a fresh initialisation and its
  outgoing weights set to 0, so the network's function is unchanged when no
  layer norm renormalises over the layer; the optimizer's moments of those
  weights are zeroed. Reports `redo_recycled_units`.
  """
  del optimizer
  chain = networks.CHAINS[config.arch]

  def act(state: TrainingState, batch: Transition) -> Tuple[TrainingState, Metrics]:
    check_batch(batch)
    rng, init_rng = jax.random.split(state.rng)
    fresh = network.init(init_rng, batch.observation[:1])
    hidden = network.apply(state.params, batch.observation).hidden
    chex.assert_equal(len(hidden), len(chain) - 1)
    dormant = [score <= config.redo_threshold for score in dormancy_scores(hidden)]
    reinit, zero = recycling_masks(state.params, chain, dormant)
    params = jax.tree_util.tree_map(lambda p, f, r, z: jnp.where(z, jnp.zeros_like(p), jnp.where(r, f, p)),
                                    state.params, fresh, reinit, zero)
    opt_state = reset_moments(state.opt_state, jax.tree_util.tree_map(jnp.logical_or, reinit, zero))
    recycled = sum(jnp.sum(mask) for mask in dormant)
    return state._replace(params=params, opt_state=opt_state, rng=rng), {'redo_recycled_units': recycled}

  return act


INTERVENTIONS.add('layernorm', Intervention(
    doc='a layer norm after each hidden convolutional and fully connected layer (the ViT: its pre-norms)',
    arch_options=lambda config: {'layer_norm': True}))
INTERVENTIONS.add('spectral_norm', Intervention(
    doc='spectral normalisation of the first linear or convolutional layer',
    arch_options=lambda config: {'spectral_norm': True}))
INTERVENTIONS.add('weight_decay', Intervention(
    doc='an l2 penalty (--weight_decay, 1e-5 by default)', options=('weight_decay',),
    optimizer_options=lambda config: {'l2_penalty': config.weight_decay}))
INTERVENTIONS.add('shrink_and_perturb', Intervention(
    doc='theta <- shrink * theta + perturb * theta_fresh at each target update', options=('shrink', 'perturb'),
    target_update_hook=shrink_and_perturb_hook))
INTERVENTIONS.add('reset_last_layer', Intervention(
    doc='re-initialise the output layer at each target update', target_update_hook=reset_last_layer_hook))
INTERVENTIONS.add('reset_optimizer', Intervention(
    doc='reset the optimizer state at each target update', target_update_hook=reset_optimizer_hook))
INTERVENTIONS.add('l2_init', Intervention(
    doc='(l2_init / 2) ||theta - theta_0||^2 added to the loss (Kumar et al. 2023, "L2 Init")', options=('l2_init',),
    loss_term=l2_init_term))
INTERVENTIONS.add('redo', Intervention(
    doc='every --redo_every steps, recycle the units whose dormancy score is <= --redo_threshold (Sokar et al. 2023)',
    options=('redo_every', 'redo_threshold'), architectures=frozenset(networks.CHAINS),
    periodic_action=redo_action, period=lambda config: config.redo_every))


def validate(names: Sequence[str], arch: str) -> None:
  """Raises a ValueError naming the flag and the accepted values."""
  for name in names:
    intervention = INTERVENTIONS.get(name)
    if not intervention.applies_to(arch):
      raise ValueError(f'Intervention {name!r} (--interventions) does not apply to --arch={arch}; '
                       f'it applies to: {", ".join(sorted(intervention.architectures))}.')
  if len(set(names)) != len(names):
    raise ValueError(f'--interventions lists an intervention twice: {",".join(names)}.')
