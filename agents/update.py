"""The double-DQN learning step as pure, jit-able functions (no I/O, no state).

Shapes are asserted with chex at the functions' boundaries (as rlax and DQN Zoo
do): a batch is B transitions, every field [B, ...], action, reward and
discount [B]; Q-values are [B, A] and targets [B]. The checks run at trace
time and cost nothing in the compiled step.
"""

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import chex
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
  # theta_0, what l2_init pulls towards (a checkpoint of an earlier version, without it, gets it from the run's seed
  # through launch.migrate).
  initial_params: Params


# A target-update hook: (state after the target copy, fresh random parameters) -> state.
TargetUpdateHook = Callable[[TrainingState, Params], TrainingState]
# An extra loss term: (online parameters, initial parameters theta_0, batch) -> scalar, added to the TD loss.
LossTerm = Callable[[Params, Params, Transition], jax.Array]
# A change of the training state made on a batch, with metrics saying what it did.
StateAction = Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]]


class PeriodicAction(NamedTuple):
  """A change of the training state every `period` learner steps, made on that step's batch (ReDo).

  The learner runs `act` (jitted on its own, as the target update is) after
  each update whose step count is a multiple of `period`; the metrics it
  returns say what it did and join that step's record.
  """
  period: int
  act: StateAction


def init_state(network: Network, optimizer: optax.GradientTransformation, rng: jax.Array,
               dummy_observation: jax.Array) -> TrainingState:
  init_rng, state_rng = jax.random.split(rng)
  params = network.init(init_rng, dummy_observation)
  return TrainingState(params=params, target_params=params, opt_state=optimizer.init(params),
                       step=jnp.zeros((), jnp.int32), rng=state_rng, initial_params=params)


def check_batch(batch: Transition) -> int:
  """Asserts a batch's layout (every field [B, ...]; action, reward, discount [B]) and returns B."""
  chex.assert_rank([batch.action, batch.reward, batch.discount], 1)
  chex.assert_type([batch.action, batch.reward, batch.discount], [int, float, float])
  chex.assert_equal_shape_prefix(jax.tree_util.tree_leaves(batch), 1)
  return batch.action.shape[0]


def double_q_loss(network: Network, encoding: Encoding, discount: float,
                  params: Params, target_params: Params, batch: Transition,
                  rng: Optional[jax.Array] = None, *, is_training: bool = False) -> Tuple[jax.Array, Metrics]:
  """Double Q-learning (van Hasselt et al. 2016) through the chosen output encoding.

  The online network selects the next action and the target network evaluates
  it (`rlax.double_q_learning`); the resulting scalar target is then fitted by
  the encoding's loss on the chosen action's outputs. `is_training` runs the
  differentiated online pass in training mode (dropout keyed by `rng`), as the
  update does; the per-transition loss of the diagnostics evaluates. The
  bootstrap passes always evaluate.
  """
  batch_size = check_batch(batch)
  outputs_tm1 = network.apply(params, batch.observation, is_training=is_training, rng=rng).outputs
  q_tm1 = encoding.q_values(outputs_tm1)
  q_t_selector = encoding.q_values(network.apply(params, batch.next_observation).outputs)
  q_t_value = encoding.q_values(network.apply(target_params, batch.next_observation).outputs)
  chex.assert_rank(q_tm1, 2)
  chex.assert_axis_dimension(q_tm1, 0, batch_size)
  chex.assert_equal_shape([q_tm1, q_t_selector, q_t_value])
  num_actions = q_tm1.shape[1]
  actions = batch.action.astype(jnp.int32)
  td_errors = jax.vmap(rlax.double_q_learning)(
      q_tm1, actions, batch.reward, discount * batch.discount, q_t_value, q_t_selector)
  q_taken = q_tm1[jnp.arange(batch_size), actions]
  targets = jax.lax.stop_gradient(q_taken + td_errors)
  chex.assert_shape([q_taken, targets], (batch_size,))
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


def make_update(network: Network, encoding: Encoding, optimizer: optax.GradientTransformation, discount: float,
                loss_terms: Optional[Mapping[str, LossTerm]] = None,
                ) -> Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]]:
  """Returns the pure update `(state, batch) -> (state, metrics)`.

  The loss minimised is the TD loss (the online pass in training mode) plus
  the interventions' `loss_terms`, each also reported as `<name>_loss`;
  `td_loss` stays the TD loss alone.
  """
  loss_terms = dict(loss_terms or {})

  def loss_fn(params: Params, state: TrainingState, batch: Transition, rng: jax.Array):
    loss, metrics = double_q_loss(network, encoding, discount, params, state.target_params, batch, rng,
                                  is_training=True)
    for name, term in loss_terms.items():
      value = term(params, state.initial_params, batch)
      chex.assert_rank(value, 0)
      metrics[f'{name}_loss'] = value
      loss = loss + value
    return loss, metrics

  def update(state: TrainingState, batch: Transition) -> Tuple[TrainingState, Metrics]:
    rng, loss_rng = jax.random.split(state.rng)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, loss_rng)
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


# The fields of the training state an update (`make_update`) and a fused call of updates (`make_fused_update`) leave
# as they are. A jitted call that returned one would copy it (XLA gives every output a buffer of its own, and the
# learner does not donate its state: it keeps the last finite one): for the CNN, 51 MB of dense weight per field,
# 14 ms of a 150 ms update on 2 CPU cores.
UPDATE_KEEPS = ('target_params', 'initial_params')
FUSED_UPDATE_KEEPS = ('initial_params',)


def jit_keeping(fn: Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]], keeps: Sequence[str]
                ) -> Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]]:
  """`jax.jit(fn)` for a `fn` that leaves the state's fields `keeps` as they are: the compiled call returns only
  the others, and the state is put together again outside it, so that no kept field is copied."""

  def changing(state: TrainingState, batch: Transition) -> Tuple[Dict[str, object], Metrics]:
    new_state, metrics = fn(state, batch)
    for name in keeps:
      if not all(new is old for new, old in zip(jax.tree_util.tree_leaves(getattr(new_state, name)),
                                                 jax.tree_util.tree_leaves(getattr(state, name)))):
        raise ValueError(f'{getattr(fn, "__name__", fn)} changes the training state\'s {name}, which it was to keep.')
    return {name: getattr(new_state, name) for name in TrainingState._fields if name not in keeps}, metrics

  compiled = jax.jit(changing)

  def call(state: TrainingState, batch: Transition) -> Tuple[TrainingState, Metrics]:
    changed, metrics = compiled(state, batch)
    return state._replace(**changed), metrics

  return call


def make_fused_update(update: Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]],
                      target_update: Callable[[TrainingState], TrainingState],
                      target_update_period: int
                      ) -> Callable[[TrainingState, Transition], Tuple[TrainingState, Metrics]]:
  """Returns `(state, batches [n, B, ...]) -> (state, metrics [n])`: n updates in one `lax.scan` (`--updates_per_call`).

  Each step's target update (with the interventions' hooks) is made inside,
  after its update, as the learner makes it, except the last step's: the
  learner makes that one after the call, because what measurers see at a
  step is the state before its interventions (agents/learner.py). Every
  update is applied, finite or not: metrics' `finite` [n] says which were,
  and the learner keeps the state of the last finite one.
  """

  def fused(state: TrainingState, batches: Transition) -> Tuple[TrainingState, Metrics]:
    chex.assert_equal_shape_prefix(jax.tree_util.tree_leaves(batches), 2)
    last_step = state.step + jax.tree_util.tree_leaves(batches)[0].shape[0]
    initial_params = state.initial_params  # Read by the updates, never changed: not carried (FUSED_UPDATE_KEEPS).

    def one(carried: TrainingState, batch: Transition) -> Tuple[TrainingState, Metrics]:
      state, metrics = update(carried._replace(initial_params=initial_params), batch)
      due = (state.step % target_update_period == 0) & (state.step != last_step)
      state = jax.lax.cond(due, target_update, lambda state: state, state)
      return state._replace(initial_params=None), metrics

    carried, metrics = jax.lax.scan(one, state._replace(initial_params=None), batches)
    return carried._replace(initial_params=initial_params), metrics

  return fused
