"""Types shared by the agent, the probes and the launch program."""

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax

Params = Any  # A Haiku parameter tree.
PRNGKey = jax.Array


class NetworkOutput(NamedTuple):
  """What every architecture returns.

  `hidden` holds each hidden layer's post-activation output, in order, so that
  diagnostics (dead units, feature rank) need no knowledge of the architecture;
  the last entry is the penultimate representation, flattened to [B, D].
  """
  outputs: jax.Array  # [B, num_outputs]
  hidden: Tuple[jax.Array, ...]


class Network(NamedTuple):
  """A pure network: `init(rng, obs)` and `apply(params, obs, rng=None)`.

  `apply` with `rng=None` is deterministic (no dropout): it is used for acting,
  targets and probes; the learner passes a key for the online forward pass.
  """
  init: Callable[[PRNGKey, jax.Array], Params]
  apply: Callable[..., NetworkOutput]


class Transition(NamedTuple):
  """One replay item: (s_{t-1}, a_t, r_t, gamma_t, s_t)."""
  observation: Any
  action: Any
  reward: Any
  discount: Any
  next_observation: Any


OptionalKey = Optional[PRNGKey]
