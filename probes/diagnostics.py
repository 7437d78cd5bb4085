"""The evaluator's curvature and representation diagnostics (sections 3.2 and 4.2).

One call on a parameter snapshot and a batch of replay observations gives:
the Hessian eigenvalue density and top eigenvalue, the gradient covariance
C_k (equation 3), and the statistics of section 4.2 (parameter norm, weight
rank, dead units, feature rank) plus Sokar et al.'s dormant units. Definitions
are in `probes/curvature.py` and `probes/statistics.py`.

    diag = make_diagnostics(agent.network, DiagnosticsConfig())
    result = diag(params, observations, jax.random.PRNGKey(0))
    record = result.as_record(); np.save(path, result.covariance)

The jit-compiled pieces are built once per `make_diagnostics`, so only the
first call pays compilation (and one more per new input shape).
"""

import dataclasses
import time
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from agents.types import Network, Params
from probes import curvature, statistics


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  # The probe loss of section 3.2: targets = f(x; theta_t) + noise_scale * N(0, 1).
  noise_scale: float = 1.0
  # Hessian spectrum by stochastic Lanczos quadrature (Ghorbani et al. 2019).
  hessian_batch_size: int = 2048  # "A single large batch"; rounded down to a multiple of the chunk.
  hessian_chunk_size: int = 512  # Examples per Hessian-vector-product chunk: bounds memory.
  lanczos_steps: int = 90  # Ghorbani et al.'s choice; clipped to the parameter count.
  # One draw: the quadrature of v^T g(H) v / |v|^2 concentrates around tr g(H) / n
  # (variance O(1 / n)) for networks of 10^5+ parameters.
  lanczos_draws: int = 1
  density_grid_size: int = 512
  density_sigma: float = 0.01  # Gaussian width, as a fraction of the Ritz values' range.
  # Gradient covariance C_k (equation 3; k = 512, the training batch of section 3.2).
  covariance_samples: int = 512
  covariance_chunk_size: int = 64  # Per-example gradients per block; two blocks are held at a time,
  # and fewer when 2 blocks of float32 gradients would exceed this. Block pairs recompute gradients, so
  # the cost grows as k^2 / block: 2 GiB holds blocks of 20 gradients of the 12.9M-parameter CNN
  # (C_512 in ~560 s on 2 CPU cores, against ~2,500 s in blocks of 5 at 512 MiB; probes.benchmark).
  covariance_memory_mb: float = 2048.0
  kmeans_clusters: int = 10  # Appendix A.1: the number of latent states.
  kmeans_seed: int = 0
  # Statistics (section 4.2, Sokar et al. 2023).
  rank_delta: float = 0.01  # srank_delta of features and weights (Kumar et al. 2020).
  weight_rank_rtol: Optional[float] = None  # None: max(shape) * eps(float32).
  dormant_threshold: float = 0.1  # Sokar et al.'s tau.
  activation_chunk_size: int = 512  # Inputs per forward pass for statistics and targets.


class DiagnosticsResult(NamedTuple):
  spectrum: curvature.Spectrum
  gradients: curvature.Covariance
  statistics: statistics.Statistics
  hessian_batch_size: int
  wall_times: Dict[str, float]  # Seconds per diagnostic, keyed by name.

  @property
  def covariance(self) -> np.ndarray:
    """C_k in k-means order [k, k], for saving (.npy) and plotting."""
    return self.gradients.matrix

  def as_record(self) -> Dict[str, object]:
    spectrum, gradients = self.spectrum, self.gradients
    record = {
        'top_eigenvalue': spectrum.top_eigenvalue,
        'bottom_eigenvalue': spectrum.bottom_eigenvalue,
        'hessian_batch_size': self.hessian_batch_size,
        'lanczos_steps': int(spectrum.ritz_values.shape[1]),
        'lanczos_draws': int(spectrum.ritz_values.shape[0]),
        'density_sigma': float(spectrum.sigma),
        'density_grid': spectrum.grid.tolist(),
        'density': spectrum.density.tolist(),
        'ritz_values': spectrum.ritz_values.tolist(),
        'ritz_weights': spectrum.ritz_weights.tolist(),
        'covariance_samples': int(gradients.matrix.shape[0]),
        'covariance_block_size': gradients.block_size,
        'covariance_mean_offdiag': gradients.mean_offdiag,
        'covariance_frac_negative': gradients.frac_negative,
        'covariance_cluster_sizes': list(gradients.cluster_sizes),
    }
    record.update(self.statistics.as_record())
    record.update({f'time_{name}_s': float(seconds) for name, seconds in self.wall_times.items()})
    return record


def _chunked(fn: Callable[[jax.Array], jax.Array], inputs: np.ndarray, chunk_size: int) -> np.ndarray:
  """fn over the inputs in chunks: bounds a conv net's activation memory."""
  return np.concatenate([jax.device_get(fn(inputs[i:i + chunk_size])) for i in range(0, len(inputs), chunk_size)])


def covariance_block_size(config: DiagnosticsConfig, params: Params) -> int:
  """Examples per block of per-example gradients: the chunk size, cut to fit the memory budget."""
  num_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  fitting = int(config.covariance_memory_mb * 2**20 // (2 * 4 * num_params))
  return max(1, min(config.covariance_chunk_size, fitting))


def make_diagnostics(network: Network, config: DiagnosticsConfig) -> Callable[[Params, np.ndarray, jax.Array],
                                                                                 DiagnosticsResult]:
  """Builds the jit-compiled pieces once; returns (params, uint8 inputs [N, ...], rng) -> result."""
  output_fn = lambda params, x: network.apply(params, x).outputs
  outputs = jax.jit(output_fn)
  run_lanczos = curvature.make_lanczos(output_fn, config.lanczos_steps)
  per_example_gradients = curvature.make_per_example_gradients(output_fn)
  activation_pass = statistics.make_activation_pass(network.apply, config.activation_chunk_size)

  def diagnose(params: Params, inputs: np.ndarray, rng: jax.Array) -> DiagnosticsResult:
    inputs = np.asarray(inputs)
    noise_key, lanczos_key = jax.random.split(rng)
    times = {}

    start = time.time()
    activity, features = activation_pass(params, inputs)
    stats = statistics.compute_statistics(jax.device_get(params), activity, features, config.rank_delta,
                                          config.weight_rank_rtol, config.dormant_threshold)
    times['statistics'] = time.time() - start

    start = time.time()
    chunk = min(config.hessian_chunk_size, config.hessian_batch_size, len(inputs))
    batch = min(config.hessian_batch_size, len(inputs)) // chunk * chunk
    used = inputs[:max(batch, min(config.covariance_samples, len(inputs)))]
    current = _chunked(lambda x: outputs(params, x), used, config.activation_chunk_size)
    targets = np.asarray(curvature.perturbed_targets(jnp.asarray(current), noise_key, config.noise_scale))
    times['targets'] = time.time() - start

    start = time.time()
    spectrum = curvature.hessian_spectrum(
        run_lanczos, params,
        inputs[:batch].reshape((batch // chunk, chunk) + inputs.shape[1:]),
        targets[:batch].reshape(batch // chunk, chunk, -1),
        lanczos_key, config.lanczos_draws, config.density_grid_size, config.density_sigma)
    times['hessian'] = time.time() - start

    start = time.time()
    k = min(config.covariance_samples, len(inputs))
    gradients = curvature.gradient_covariance(per_example_gradients, params, inputs[:k], targets[:k],
                                              covariance_block_size(config, params), config.kmeans_clusters,
                                              config.kmeans_seed)
    times['covariance'] = time.time() - start
    times['total'] = sum(times.values())
    return DiagnosticsResult(spectrum, gradients, stats, batch, times)

  return diagnose
