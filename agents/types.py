"""Types shared by the agent, the probes and the launch program."""

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

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
  """A pure network: `init(rng, obs)` and `apply(params, obs, *, is_training=False, rng=None)`.

  `apply` is deterministic (no dropout) unless `is_training=True`, which needs
  `rng`, the dropout key: only the learner's online forward pass trains; acting,
  targets and probes evaluate. Training mode is asked for, never inferred from
  a key being passed.

  `apply(params, obs)` is `apply_prepared(prepare(params), obs)`: `prepare` does
  the work that depends on the parameters only (spectral normalisation's power
  iteration), which an actor does once per parameter pull instead of per step.
  """
  init: Callable[[PRNGKey, jax.Array], Params]
  apply: Callable[..., NetworkOutput]
  prepare: Optional[Callable[[Params], Params]] = None  # None: nothing to prepare.
  apply_prepared: Optional[Callable[..., NetworkOutput]] = None  # None: `apply`.


class Transition(NamedTuple):
  """One replay item: (s_{t-1}, a_t, r_t, gamma_t, s_t)."""
  observation: Any
  action: Any
  reward: Any
  discount: Any
  next_observation: Any


# Where the actor and the learner send their records (a JSONL logger in a run, a list's append in a test).
Logger = Callable[[Dict[str, object]], None]


class StopRequested(Exception):
  """Raised by a wait or a long computation that gave up because a stop was requested: the end, not a failure."""
