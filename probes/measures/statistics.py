"""Parameter and representation statistics: section 4.2's candidate explanations, and dormancy.

The paper plots these quantities (figure 3) without defining them; the
definitions used here:

- parameter norm: the global l2 norm of every parameter (weights, biases, norms' scales).
- weight rank, per weight matrix (Haiku `w` leaves; a conv kernel [kh, kw, in, out]
  is read as the matrix [kh * kw * in, out]):
  * numerical rank: singular values > tol, tol = max(shape) * eps(float32) * sigma_max
    (numpy's `matrix_rank` convention at the parameters' precision), or
    rtol * sigma_max when a relative tolerance is given;
  * approximate rank srank_delta (Kumar et al. 2020): the fewest singular values
    whose sum reaches (1 - delta) of the total.
  Both are also averaged over the weight matrices.
- dead units: a hidden unit whose post-activation output is exactly 0 on every
  input of the batch (a ReLU that never fires); in a conv layer a unit is a
  channel, dead when zero at every position of every input.
- feature rank: srank_delta of the penultimate representation Phi [N, D]
  (the last `NetworkOutput.hidden` entry), delta = 0.01 (Kumar et al. 2020).
- dormant units (Sokar et al. 2023): score s_i = E_x |h_i(x)| / (mean over the
  layer's units of E_x |h_j(x)|), a conv channel's |h| averaged over positions;
  dormant when s_i <= tau. tau = 0 is exactly the dead units; the default tau = 0.1
  is Sokar et al.'s threshold for value-based agents.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from agents import interventions
from agents.types import NetworkOutput, Params

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def parameter_norm(params: Params) -> float:
  """Global l2 norm over every parameter leaf."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(params))))


def weight_matrices(params: Params) -> Dict[str, np.ndarray]:
  """Every Haiku `w` leaf of rank >= 2 as a matrix [fan_in, fan_out], keyed 'module/w'."""
  return {f'{module}/{name}': np.asarray(value).reshape(-1, value.shape[-1])
          for module, leaves in sorted(params.items()) for name, value in sorted(leaves.items())
          if name == 'w' and np.ndim(value) >= 2}


def singular_values(matrix: np.ndarray) -> np.ndarray:
  """Descending singular values, computed in float64."""
  return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def numerical_rank(values: np.ndarray, shape: Sequence[int], rtol: Optional[float] = None) -> int:
  """Singular values above rtol * sigma_max (default rtol: max(shape) * eps(float32))."""
  if values.size == 0 or values[0] == 0:
    return 0
  rtol = max(shape) * FLOAT32_EPS if rtol is None else rtol
  return int(np.sum(values > rtol * values[0]))


def approximate_rank(values: np.ndarray, delta: float) -> int:
  """srank_delta: the fewest leading singular values holding (1 - delta) of their sum."""
  total = float(np.sum(values))
  if total == 0:
    return 0
  return int(np.searchsorted(np.cumsum(values) / total, 1.0 - delta - 1e-12) + 1)


def unit_activity(hidden: Sequence[jax.Array]) -> Tuple[jax.Array, ...]:
  """Per layer, the sum of |h| per unit over the batch (and a conv layer's positions)."""
  return tuple(jnp.sum(jnp.abs(h.reshape(-1, h.shape[-1])), axis=0) for h in hidden)


def dead_unit_fraction(activity: Sequence[jax.Array]) -> jax.Array:
  """The fraction of units whose `unit_activity` is exactly 0: zero on every input."""
  return sum(jnp.sum(a == 0) for a in activity) / sum(a.shape[-1] for a in activity)


def make_activation_pass(apply_fn: Callable[[Params, jax.Array], NetworkOutput],
                         chunk_size: int) -> Callable[[Params, np.ndarray], Tuple[List[np.ndarray], np.ndarray]]:
  """(params, inputs [N, ...]) -> (per-layer E|h| per unit, penultimate features [N, D]), chunked."""

  @jax.jit
  def chunk_pass(params, x):
    hidden = apply_fn(params, x).hidden
    counts = tuple(h.size // h.shape[-1] for h in hidden)  # Inputs x positions per unit.
    return unit_activity(hidden), counts, hidden[-1]

  def run(params: Params, inputs: np.ndarray) -> Tuple[List[np.ndarray], np.ndarray]:
    sums, counts, features = None, None, []
    for start in range(0, inputs.shape[0], chunk_size):
      chunk_sums, chunk_counts, chunk_features = jax.device_get(chunk_pass(params, inputs[start:start + chunk_size]))
      sums = list(chunk_sums) if sums is None else [a + b for a, b in zip(sums, chunk_sums)]
      counts = list(chunk_counts) if counts is None else [a + b for a, b in zip(counts, chunk_counts)]
      features.append(chunk_features)
    return [s / c for s, c in zip(sums, counts)], np.concatenate(features)

  return run


def dormant_masks(activity: Sequence[np.ndarray], tau: float) -> List[np.ndarray]:
  """Sokar et al.'s s_i <= tau per layer (agents.interventions' definition); a silent layer is all dormant."""
  return [np.asarray(scores) <= tau for scores in interventions.relative_activity(activity)]


class Statistics(NamedTuple):
  parameter_norm: float
  weight_ranks: Dict[str, int]
  weight_sranks: Dict[str, int]
  dead_units: int
  dormant_units: int
  num_units: int
  feature_rank: int
  feature_dim: int

  def as_record(self) -> Dict[str, object]:
    return {
        'parameter_norm': self.parameter_norm,
        'weight_ranks': dict(self.weight_ranks),
        'weight_rank_mean': float(np.mean(list(self.weight_ranks.values()))) if self.weight_ranks else 0.0,
        'weight_sranks': dict(self.weight_sranks),
        'weight_srank_mean': float(np.mean(list(self.weight_sranks.values()))) if self.weight_sranks else 0.0,
        'dead_units': self.dead_units,
        'dead_unit_fraction': self.dead_units / max(self.num_units, 1),
        'dormant_units': self.dormant_units,
        'dormant_fraction': self.dormant_units / max(self.num_units, 1),
        'num_hidden_units': self.num_units,
        'feature_rank': self.feature_rank,
        'feature_dim': self.feature_dim,
    }


def compute_statistics(params: Params, activity: Sequence[np.ndarray], features: np.ndarray, delta: float,
                       weight_rtol: Optional[float], dormant_tau: float) -> Statistics:
  """All section-4.2 statistics from the parameters and one activation pass."""
  ranks, sranks = {}, {}
  for name, matrix in weight_matrices(params).items():
    values = singular_values(matrix)
    ranks[name] = numerical_rank(values, matrix.shape, weight_rtol)
    sranks[name] = approximate_rank(values, delta)
  return Statistics(
      parameter_norm=parameter_norm(params),
      weight_ranks=ranks,
      weight_sranks=sranks,
      dead_units=int(sum(np.sum(layer == 0) for layer in activity)),
      dormant_units=int(sum(np.sum(mask) for mask in dormant_masks(activity, dormant_tau))),
      num_units=int(sum(layer.size for layer in activity)),
      feature_rank=approximate_rank(singular_values(features), delta),
      feature_dim=int(features.shape[-1]))
