"""The double-DQN learning step as pure, jit-able functions (no I/O, no state)."""

from typing import Callable, Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
import rlax

from agents.encodings import Encoding
from agents.types import Network, Params, Transition

Metrics = Dict[str, jax.Array]


class TrainingState(NamedTuple):
  params: Params
  target_params: Params
  opt_state: optax.OptState
  step: jax.Array  # Number of updates applied so far.
  rng: jax.Array


# A target-update hook: (state after the target copy, fresh random parameters) -> state.
TargetUpdateHook = Callable[[TrainingState, Params], TrainingState]


def init_state(network: Network, optimizer: optax.GradientTransformation, rng: jax.Array,
               dummy_observation: jax.Array) -> TrainingState:
  init_rng, state_rng = jax.random.split(rng)
  params = network.init(init_rng, dummy_observation)
  return TrainingState(params=params, target_params=params, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32), rng=state_rng)


def double_q_loss(network: Network, encoding: Encoding, discount: float,
                  params: Params, target_params: Params, batch: Transition,
                  rng: jax.Array) -> Tuple[jax.Array, Metrics]:
  """Double Q-learning (van Hasselt et al. 2016) through the chosen output encoding.

  The online network selects the next action and the target network evaluates
  it (`rlax.double_q_learning`); the resulting scalar target is then fitted by
  the encoding's loss on the chosen action's outputs.
  """
  outputs_tm1 = network.apply(params, batch.observation, rng).outputs
  q_tm1 = encoding.q_values(outputs_tm1)
  q_t_selector = encoding.q_values(network.apply(params, batch.next_observation).outputs)
  q_t_value = encoding.q_values(network.apply(target_params, batch.next_observation).outputs)
  batch_size, num_actions = q_tm1.shape
  actions = batch.action.astype(jnp.int32)
  td_errors = jax.vmap(rlax.double_q_learning)(
      q_tm1, actions, batch.reward, discount * batch.discount, q_t_value, q_t_selector)
  q_taken = q_tm1[jnp.arange(batch_size), actions]
  targets = jax.lax.stop_gradient(q_taken + td_errors)
  action_outputs = outputs_tm1.reshape(batch_size, num_actions, -1)[jnp.arange(batch_size), actions]
  loss = jnp.mean(encoding.loss(action_outputs, targets))
  return loss, {'td_loss': loss, 'mean_q': jnp.mean(q_taken), 'mean_target': jnp.mean(targets)}


def make_transition_loss(network: Network, encoding: Encoding,
                         discount: float) -> Callable[[Params, Params, Transition], jax.Array]:
  """(params, target params, one transition) -> its TD loss, deterministic (no dropout).

  The per-example loss whose gradients form the TD-gradient covariance (appendix A.1).
  """

  def loss(params: Params, target_params: Params, transition: Transition) -> jax.Array:
    batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], transition)
    return double_q_loss(network, encoding, discount, params, target_params, batch, None)[0]

  return loss


def make_update(network: Network, encoding: Encoding, optimizer: optax.GradientTransformation,
                discount: float) -> Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]]:
  """Returns the pure update `(state, batch) -> (state, metrics)`."""

  def loss_fn(params, target_params, batch, rng):
    return double_q_loss(network, encoding, discount, params, target_params, batch, rng)

  def update(state: TrainingState, batch: Transition) -> Tuple[TrainingState, Metrics]:
    rng, loss_rng = jax.random.split(state.rng)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state.target_params, batch, loss_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    # Checked by the learner before it keeps the step (agents/learner.py: `Diverged`).
    metrics['finite'] = jnp.isfinite(metrics['td_loss']) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(params)]))
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1, rng=rng), metrics

  return update


def make_target_update(network: Network, hooks: Sequence[TargetUpdateHook],
                       dummy_observation: jax.Array) -> Callable[[TrainingState], TrainingState]:
  """Copies online to target parameters, then applies the interventions' hooks in order.

  Hooks that re-initialise (reset_last_layer, shrink_and_perturb) share one
  fresh random initialisation per target update.
  """

  def target_update(state: TrainingState) -> TrainingState:
    rng, init_rng = jax.random.split(state.rng)
    state = state._replace(target_params=state.params, rng=rng)
    if hooks:
      fresh_params = network.init(init_rng, dummy_observation)
      for hook in hooks:
        state = hook(state, fresh_params)
    return state

  return target_update
