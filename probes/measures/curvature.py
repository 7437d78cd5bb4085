"""Loss-landscape diagnostics of section 3.2: Hessian spectrum and gradient covariance.

Both are taken on section 3.2's probe loss, a regression towards a perturbation
of the network's current outputs (not the TD loss, whose structure trivially
differs between agents):

    l_i(theta) = mean_k (f(x_i; theta)_k - y_ik)^2,
    y_i = stop_gradient(f(x_i; theta_t)) + noise_scale * p(x_i),
    p(x) = g(x; phi) / rms_k g(x; phi)_k,

g a fixed random network of the same architecture (phi drawn once per run from
a seed), so the perturbation is a fixed, smooth function of the input: the same
at every probe point, identical for identical inputs, similar for similar ones.
At theta_t the gradient of l_i is -(2 noise_scale / K) J_i^T p(x_i), so C_k
depends on the network (J) and the inputs only; i.i.d. noise per example would
make every off-diagonal sign a coin flip. The Hessian is the Gauss-Newton term
(2/K) J^T J plus the perturbation-weighted curvature of the outputs: how easily
the network can move its predictions in arbitrary directions.

Hessian spectrum: stochastic Lanczos quadrature (Ghorbani et al. 2019). Each
draw runs `num_steps` Lanczos iterations with full reorthogonalisation on
Hessian-vector products (forward-over-reverse, `jax.jvp` of `jax.grad` on the
flattened parameters) from a Gaussian start vector v; the tridiagonal matrix's
eigenvalues (Ritz values) and squared first eigenvector components (weights)
form a Gauss quadrature of the spectral measure v^T delta(H - lambda) v / |v|^2,
exact for polynomials of degree < 2 * num_steps. The top eigenvalue reported is
the largest Ritz value (Lanczos converges fastest at the extremes).

Gradient covariance (equation 3): C_ij = <g_i, g_j> / (|g_i| |g_j|) with g_i
the gradient of one example's loss (any per-example loss: the probe loss above,
or the agent's TD loss on one transition), its Gram matrix built block by block
so that only two blocks of per-example gradients are ever held.
"""

from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import chex
import numpy as np
from jax.flatten_util import ravel_pytree
from scipy import integrate

from agents import loops
from agents.types import Params
from probes.measures import compiled_loops

OutputFn = Callable[[Params, jax.Array], jax.Array]  # (params, inputs [N, ...]) -> outputs [N, K]
# (params, context, one example) -> that example's loss; `context` holds what every example shares
# (the target network's parameters for a TD loss), passed as an argument so that jit does not bake it in.
ExampleLoss = Callable[[Params, Any, Any], jax.Array]

# A Lanczos residual below this fraction of the largest tridiagonal entry so far
# means the Krylov space is exhausted (e.g. repeated eigenvalues): restart with
# a fresh orthogonal vector and a zero off-diagonal, which keeps the quadrature exact.
BREAKDOWN_TOL = 1e-5


def fixed_perturbation(perturbation_outputs: jax.Array) -> jax.Array:
  """p(x) = g(x; phi) / rms_k g(x; phi)_k from the fixed network's outputs [N, K]: unit RMS per input."""
  chex.assert_rank(perturbation_outputs, 2)
  rms = jnp.sqrt(jnp.mean(jnp.square(perturbation_outputs), axis=-1, keepdims=True))
  return perturbation_outputs / jnp.maximum(rms, jnp.finfo(perturbation_outputs.dtype).tiny)


def perturbed_targets(outputs: jax.Array, perturbation_outputs: jax.Array, noise_scale: float) -> jax.Array:
  """y = stop_gradient(f(x; theta_t)) + noise_scale * p(x): a fixed function of the inputs."""
  chex.assert_equal_shape([outputs, perturbation_outputs])
  return jax.lax.stop_gradient(outputs) + noise_scale * fixed_perturbation(perturbation_outputs)


def per_example_loss(output_fn: OutputFn, params: Params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """l_i: squared error averaged over the K outputs, one value per input [B]."""
  return jnp.mean(jnp.square(output_fn(params, inputs) - targets), axis=-1)


def make_hvp(output_fn: OutputFn, params: Params, inputs: jax.Array, targets: jax.Array,
             unrolled: bool = False) -> Tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """(flat theta, v -> H v) of the batch-mean loss; inputs/targets are chunked [C, c, ...].

  Chunks are summed in a `lax.scan` so that memory is bounded by one chunk's
  forward-over-reverse pass, whatever the batch size; `unrolled` sums them in
  straight-line code instead (see probes/measures/compiled_loops.py).
  """
  flat, unravel = ravel_pytree(params)

  def chunk_loss(theta, x, y):
    return jnp.mean(per_example_loss(output_fn, unravel(theta), x, y))

  def hvp(v: jax.Array) -> jax.Array:
    def add_chunk(total, chunk):
      x, y = chunk
      return total + jax.jvp(lambda theta: jax.grad(chunk_loss)(theta, x, y), (flat,), (v,))[1], None

    total, _ = compiled_loops.scan(add_chunk, jnp.zeros_like(flat), (inputs, targets), unrolled)
    return total / inputs.shape[0]

  return flat, hvp


def _orthogonalise(w: jax.Array, basis: jax.Array) -> jax.Array:
  """Classical Gram-Schmidt against the basis rows (zero rows are harmless), twice ("twice is enough")."""
  for _ in range(2):
    w = w - basis.T @ (basis @ w)
  return w


def _restart(key: jax.Array, basis: jax.Array) -> jax.Array:
  """A random unit vector orthogonal to the basis."""
  v = _orthogonalise(jax.random.normal(key, basis.shape[1:], basis.dtype), basis)
  return v / jnp.linalg.norm(v)


def _lanczos_step(matvec: Callable[[jax.Array], jax.Array], key: jax.Array, i: jax.Array, carry: tuple) -> tuple:
  """Step i: (basis, alphas, betas, v, scale) -> the same after adding v to the basis."""
  basis, alphas, betas, v, scale = carry
  basis = basis.at[i].set(v)
  w = matvec(v)
  alpha = jnp.vdot(v, w)
  w = _orthogonalise(w, basis)  # Also removes alpha v and beta v_prev: the three-term recurrence.
  beta = jnp.linalg.norm(w)
  scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
  broken = beta <= BREAKDOWN_TOL * scale
  v_next = jax.lax.cond(broken, lambda: _restart(jax.random.fold_in(key, i), basis), lambda: w / beta)
  return (basis, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(broken, 0.0, beta)), v_next, scale)


def _lanczos_start(v0: jax.Array, num_steps: int) -> tuple:
  zeros = jnp.zeros((num_steps,), v0.dtype)
  return (jnp.zeros((num_steps, v0.shape[0]), v0.dtype), zeros, zeros, v0 / jnp.linalg.norm(v0),
          jnp.zeros((), v0.dtype))


def lanczos(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_steps: int,
            key: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Lanczos with full reorthogonalisation from v0: the tridiagonal's (alphas [m], betas [m-1]).

  `key` draws the restart vectors used on breakdown. Needs num_steps <= v0.size.
  """
  _, alphas, betas, _, _ = jax.lax.fori_loop(0, num_steps, lambda i, carry: _lanczos_step(matvec, key, i, carry),
                                             _lanczos_start(v0, num_steps))
  return alphas, betas[:-1]


def make_lanczos(output_fn: OutputFn, num_steps: int, stepwise: Optional[bool] = None) -> Callable:
  """(params, inputs [C, c, ...], targets [C, c, K], key) -> (alphas, betas) of one SLQ draw.

  One jit-compiled loop, or on CPU for convolutional networks one compiled
  call per step (probes/measures/compiled_loops.py; `stepwise` forces either). The step count is clipped to the
  parameter count (a Krylov space can be no larger).
  """

  @jax.jit
  def run(params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array):
    flat, hvp = make_hvp(output_fn, params, inputs, targets)
    start_key, restart_key = jax.random.split(key)
    v0 = jax.random.normal(start_key, flat.shape, flat.dtype)
    return lanczos(hvp, v0, min(num_steps, flat.size), restart_key)

  @jax.jit
  def start(params: Params, key: jax.Array):
    flat = ravel_pytree(params)[0]
    start_key, restart_key = jax.random.split(key)
    return _lanczos_start(jax.random.normal(start_key, flat.shape, flat.dtype), min(num_steps, flat.size)), restart_key

  @jax.jit
  def step(i: jax.Array, carry: tuple, params: Params, inputs: jax.Array, targets: jax.Array, restart_key: jax.Array):
    _, hvp = make_hvp(output_fn, params, inputs, targets, unrolled=True)
    return _lanczos_step(hvp, restart_key, i, carry)

  def run_stepwise(params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array):
    carry, restart_key = start(params, key)
    for i in range(carry[1].shape[0]):
      carry = step(jnp.asarray(i, jnp.int32), carry, params, inputs, targets, restart_key)
    return carry[1], carry[2][:-1]

  def dispatch(params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array):
    use_steps = loops.avoid_compiled_loops(params) if stepwise is None else stepwise
    return (run_stepwise if use_steps else run)(params, inputs, targets, key)

  return dispatch


def ritz(alphas: np.ndarray, betas: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Ritz values (ascending) and quadrature weights (squared first eigenvector components)."""
  alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
  tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
  values, vectors = np.linalg.eigh(tridiagonal)
  return values, np.square(vectors[0])


def spectral_density(values: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian-smoothed SLQ density on `grid`, averaged over draws ([D, m] inputs), integrating to 1."""
  values, weights = np.atleast_2d(values), np.atleast_2d(weights)
  kernel = np.exp(-0.5 * np.square((grid[:, None, None] - values[None]) / sigma)) / (sigma * np.sqrt(2 * np.pi))
  density = np.sum(kernel * weights[None], axis=(1, 2)) / values.shape[0]
  return density / integrate.trapezoid(density, grid)  # np.trapz is gone from NumPy 2.


def density_grid(values: np.ndarray, size: int, relative_sigma: float) -> Tuple[np.ndarray, float]:
  """A grid covering the Ritz values +- 5 sigma, sigma = relative_sigma * spectral width."""
  low, high = float(np.min(values)), float(np.max(values))
  sigma = relative_sigma * max(high - low, 1e-12 * max(abs(high), 1.0))
  return np.linspace(low - 5 * sigma, high + 5 * sigma, size), sigma


class Spectrum(NamedTuple):
  ritz_values: np.ndarray  # [draws, m]
  ritz_weights: np.ndarray  # [draws, m]; each row sums to 1.
  grid: np.ndarray  # [grid size]
  density: np.ndarray  # [grid size]; integrates to 1 over `grid`.
  sigma: float  # The Gaussian's standard deviation.

  @property
  def top_eigenvalue(self) -> float:
    return float(self.ritz_values.max())

  @property
  def bottom_eigenvalue(self) -> float:
    return float(self.ritz_values.min())


def hessian_spectrum(run_lanczos: Callable, params: Params, inputs: jax.Array, targets: jax.Array,
                     key: jax.Array, num_draws: int, grid_size: int, relative_sigma: float) -> Spectrum:
  """SLQ: one jit-compiled Lanczos run per draw (draws run in turn to bound memory)."""
  quadratures = [ritz(*jax.device_get(run_lanczos(params, inputs, targets, k)))
                 for k in jax.random.split(key, num_draws)]
  values, weights = (np.stack(x) for x in zip(*quadratures))
  grid, sigma = density_grid(values, grid_size, relative_sigma)
  return Spectrum(values, weights, grid, spectral_density(values, weights, grid, sigma), sigma)


def regression_example_loss(output_fn: OutputFn) -> ExampleLoss:
  """The probe loss l_i of one example (x_i, y_i); it needs no context."""
  return lambda params, context, example: per_example_loss(output_fn, params, example[0][None], example[1][None])[0]


def make_per_example_gradients(example_loss: ExampleLoss) -> Callable:
  """jit (params, context, examples [c, ...] (a pytree)) -> flattened per-example gradients [c, P]."""

  def gradient(params, context, example):
    return ravel_pytree(jax.grad(example_loss)(params, context, example))[0]

  return jax.jit(jax.vmap(gradient, in_axes=(None, None, 0)))


@jax.jit
def _inner_products(rows: jax.Array, cols: jax.Array) -> jax.Array:
  return rows @ cols.T


def _num_examples(examples: Any) -> int:
  return len(jax.tree_util.tree_leaves(examples)[0])


def _slice(examples: Any, start: int, size: int) -> Any:
  return jax.tree_util.tree_map(lambda x: x[start:start + size], examples)


def gradient_gram(per_example_gradients: Callable, params: Params, context: Any, examples: Any,
                  chunk_size: int) -> np.ndarray:
  """G = g g^T [k, k] in float64, block by block: two blocks of gradients in memory at a time.

  Each lower-triangular block pair recomputes its column block's gradients,
  trading compute (k / c + 1) / 2 times the gradients for k / c times less memory.
  """
  k = _num_examples(examples)
  starts = list(range(0, k, chunk_size))
  gram = np.zeros((k, k))
  for a, i in enumerate(starts):
    rows = per_example_gradients(params, context, _slice(examples, i, chunk_size))
    for j in starts[:a + 1]:
      cols = rows if j == i else per_example_gradients(params, context, _slice(examples, j, chunk_size))
      block = np.asarray(_inner_products(rows, cols), np.float64)
      gram[i:i + chunk_size, j:j + chunk_size] = block
      gram[j:j + chunk_size, i:i + chunk_size] = block.T
  return gram


def normalise_gram(gram: np.ndarray) -> np.ndarray:
  """C_ij = G_ij / (|g_i| |g_j|) (equation 3); a zero gradient gives a zero row and column."""
  norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
  safe = np.where(norms > 0, norms, 1.0)
  return np.where(np.outer(norms, norms) > 0, gram / np.outer(safe, safe), 0.0)


def kmeans(points: np.ndarray, num_clusters: int, seed: int, max_iterations: int = 100) -> np.ndarray:
  """Deterministic Lloyd's k-means with k-means++ seeding: a cluster label per row."""
  rng = np.random.default_rng(seed)
  n = points.shape[0]
  num_clusters = min(num_clusters, n)
  centres = [points[rng.integers(n)]]
  for _ in range(1, num_clusters):
    distances = np.min(np.square(points[:, None] - np.stack(centres)[None]).sum(-1), axis=1)
    total = distances.sum()
    centres.append(points[rng.choice(n, p=distances / total) if total > 0 else rng.integers(n)])
  centres = np.stack(centres)
  labels = np.full(n, -1)
  for _ in range(max_iterations):
    new_labels = np.argmin(np.square(points[:, None] - centres[None]).sum(-1), axis=1)
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
    centres = np.stack([points[labels == c].mean(0) if np.any(labels == c) else centres[c]
                        for c in range(num_clusters)])
  return labels


def cluster_order(labels: np.ndarray) -> np.ndarray:
  """A permutation grouping rows by cluster, largest cluster first, original order within."""
  sizes = np.bincount(labels)
  rank = np.argsort(np.lexsort((np.arange(len(sizes)), -sizes)))
  return np.lexsort((np.arange(len(labels)), rank[labels]))


class Covariance(NamedTuple):
  matrix: np.ndarray  # [k, k] C_k, rows and columns in k-means order.
  order: np.ndarray  # [k] the permutation applied (indices into the sampled inputs).
  cluster_sizes: List[int]  # In display order.
  block_size: int  # Per-example gradients computed per block.

  @property
  def mean_offdiag(self) -> float:
    k = self.matrix.shape[0]
    return float((self.matrix.sum() - np.trace(self.matrix)) / max(k * (k - 1), 1))

  @property
  def frac_negative(self) -> float:
    """Fraction of off-diagonal entries < 0: interference between inputs."""
    off = ~np.eye(self.matrix.shape[0], dtype=bool)
    return float(np.mean(self.matrix[off] < 0)) if off.any() else 0.0


def gradient_covariance(per_example_gradients: Callable, params: Params, context: Any, examples: Any,
                        chunk_size: int, num_clusters: int, seed: int) -> Covariance:
  """C_k of equation 3 with rows and columns ordered by k-means on its rows (appendix A.1)."""
  matrix = normalise_gram(gradient_gram(per_example_gradients, params, context, examples, chunk_size))
  labels = kmeans(matrix, num_clusters, seed)
  order = cluster_order(labels)
  sizes = np.bincount(labels)
  return Covariance(matrix[np.ix_(order, order)], order, sorted((int(s) for s in sizes if s), reverse=True),
                    chunk_size)
