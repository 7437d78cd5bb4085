"""The evaluator's curvature and representation diagnostics (sections 3.2 and 4.2).

One call on a parameter snapshot and a batch of replay observations gives:
the Hessian eigenvalue density and top eigenvalue, the gradient covariance
C_k (equation 3) of the probe loss, C_k of the agent's own TD loss on replay
transitions (given the target parameters), and the statistics of section 4.2
(parameter norm, weight rank, dead units, feature rank) plus Sokar et al.'s
dormant units. Definitions are in `probes/measures/curvature.py` and `probes/measures/statistics.py`.

    diag = make_diagnostics(agent.network, DiagnosticsConfig(), jax.random.PRNGKey(seed), transition_loss)
    result = diag(params, observations, jax.random.PRNGKey(0), target_params, transitions)
    record = result.as_record(); np.save(path, result.covariance)

The perturbation network (curvature.py) is drawn once from the key given to
`make_diagnostics`, so every call of one `diagnose` regresses towards the same
function of the inputs; the call's own key only draws Lanczos start vectors.

The jit-compiled pieces are built once per `make_diagnostics`, so only the
first call pays compilation (and one more per new input shape).
"""

import dataclasses
import time
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from agents import host_memory
from agents.config import option
from agents.types import Network, Params, StopRequested, Transition
from probes.measures import curvature
from probes.measures import statistics


@dataclasses.dataclass(frozen=True)
class DiagnosticsConfig:
  # The probe loss of section 3.2: targets = f(x; theta_t) + noise_scale * p(x), p a fixed random
  # network's outputs scaled to unit RMS per input (probes/measures/curvature.py).
  noise_scale: float = option(1.0, 'Scale of the fixed perturbation of the curvature loss\'s targets.',
                              lower_bound=0.0)
  # Hessian spectrum by stochastic Lanczos quadrature (Ghorbani et al. 2019).
  hessian_batch_size: int = option(2048, 'Probe inputs in the Hessian\'s batch ("a single large batch"; rounded '
                                   'down to a multiple of the chunk).', lower_bound=1)
  hessian_chunk_size: int = option(512, 'Examples per Hessian-vector-product chunk (bounds memory).', lower_bound=1)
  lanczos_steps: int = option(90, 'Lanczos steps of the Hessian density (Ghorbani et al.\'s 90; clipped to the '
                              'parameter count).', lower_bound=2)
  # One draw: the quadrature of v^T g(H) v / |v|^2 concentrates around tr g(H) / n
  # (variance O(1 / n)) for networks of 10^5+ parameters.
  lanczos_draws: int = option(1, 'Random start vectors of stochastic Lanczos quadrature.', lower_bound=1)
  density_grid_size: int = option(512, 'Points of the Hessian density\'s grid.', lower_bound=2)
  density_sigma: float = option(0.01, 'Gaussian width of the density, as a fraction of the Ritz values\' range.',
                                lower_bound=0.0)
  # Gradient covariance C_k (equation 3; k = 512, the training batch of section 3.2).
  covariance_samples: int = option(512, 'k of the gradient covariance C_k of the probe loss.', lower_bound=2)
  # Two blocks are held at a time, and fewer when 2 blocks of float32 gradients would exceed the budget.
  # Block pairs recompute gradients, so the cost grows as k^2 / block: 2 GiB holds blocks of 20 gradients
  # of the 12.9M-parameter CNN (C_512 in ~560 s on 2 CPU cores, against ~2,500 s in blocks of 5 at 512 MiB).
  covariance_chunk_size: int = option(64, 'Per-example gradients per block of C_k.', lower_bound=1)
  covariance_memory_mb: float = option(2048.0, 'Memory budget of the blocks of per-example gradients (MiB).',
                                       lower_bound=0.0)
  td_covariance_samples: int = option(512, 'Replay transitions in the TD-loss gradient covariance (appendix A.1; '
                                      '0: off).', lower_bound=0)
  kmeans_clusters: int = option(10, 'k-means clusters ordering C_k (appendix A.1: the number of latent states).',
                                lower_bound=1)
  kmeans_seed: int = option(0, 'Seed of the k-means ordering.')
  # Statistics (section 4.2, Sokar et al. 2023).
  rank_delta: float = option(0.01, 'delta of srank, of features and weights (Kumar et al. 2020).', lower_bound=0.0,
                             upper_bound=1.0)
  weight_rank_rtol: Optional[float] = option(None, 'Relative tolerance of the numerical weight rank (default: '
                                             'max(shape) * eps(float32)).', lower_bound=0.0)
  dormant_threshold: float = option(0.1, 'Sokar et al.\'s tau: a unit is dormant when its score is at most this.',
                                    lower_bound=0.0)
  activation_chunk_size: int = option(512, 'Inputs per forward pass of the statistics and targets.', lower_bound=1)


class DiagnosticsResult(NamedTuple):
  spectrum: curvature.Spectrum
  gradients: curvature.Covariance  # Of the probe loss.
  td_gradients: Optional[curvature.Covariance]  # Of the TD loss; None without transitions.
  statistics: statistics.Statistics
  hessian_batch_size: int
  wall_times: Dict[str, float]  # Seconds per diagnostic, keyed by name.

  @property
  def covariance(self) -> np.ndarray:
    """C_k in k-means order [k, k], for saving (.npy) and plotting."""
    return self.gradients.matrix

  @property
  def td_covariance(self) -> Optional[np.ndarray]:
    return None if self.td_gradients is None else self.td_gradients.matrix

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
        **_covariance_record('covariance', gradients),
    }
    if self.td_gradients is not None:
      record.update(_covariance_record('td_covariance', self.td_gradients))
    record.update(self.statistics.as_record())
    record.update({f'time_{name}_s': float(seconds) for name, seconds in self.wall_times.items()})
    return record


def _covariance_record(prefix: str, covariance: curvature.Covariance) -> Dict[str, object]:
  return {
      f'{prefix}_samples': int(covariance.matrix.shape[0]),
      f'{prefix}_block_size': covariance.block_size,
      f'{prefix}_mean_offdiag': covariance.mean_offdiag,
      f'{prefix}_frac_negative': covariance.frac_negative,
      f'{prefix}_cluster_sizes': list(covariance.cluster_sizes),
  }


def _chunked(fn: Callable[[jax.Array], jax.Array], inputs: np.ndarray, chunk_size: int) -> np.ndarray:
  """fn over the inputs in chunks: bounds a conv net's activation memory."""
  return np.concatenate([jax.device_get(fn(inputs[i:i + chunk_size])) for i in range(0, len(inputs), chunk_size)])


def covariance_block_size(config: DiagnosticsConfig, params: Params) -> int:
  """Examples per block of per-example gradients: the chunk size, cut to fit the memory budget."""
  num_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
  fitting = int(config.covariance_memory_mb * 2**20 // (2 * 4 * num_params))
  return max(1, min(config.covariance_chunk_size, fitting))


TransitionLoss = Callable[[Params, Params, Transition], jax.Array]  # agents.update.make_transition_loss
Diagnose = Callable[..., DiagnosticsResult]


def make_diagnostics(network: Network, config: DiagnosticsConfig, perturbation_key: jax.Array,
                     transition_loss: Optional[TransitionLoss] = None) -> Diagnose:
  """Builds the jit-compiled pieces once; returns the `diagnose` function.

  diagnose(params, uint8 inputs [N, ...], rng, target_params=None, transitions=None): the TD
  covariance needs `transition_loss` here and the target parameters and transitions there.
  """
  host_memory.reuse_freed_memory()
  output_fn = lambda params, x: network.apply(params, x).outputs
  outputs = jax.jit(output_fn)
  run_lanczos = curvature.make_lanczos(output_fn, config.lanczos_steps)
  probe_gradients = curvature.make_per_example_gradients(curvature.regression_example_loss(output_fn))
  td_gradients = None if transition_loss is None else curvature.make_per_example_gradients(transition_loss)
  activation_pass = statistics.make_activation_pass(network.apply, config.activation_chunk_size)
  perturbation: Dict[str, Params] = {}  # The fixed network phi, drawn at the first call (it needs an input).

  def diagnose(params: Params, inputs: np.ndarray, rng: jax.Array, target_params: Optional[Params] = None,
               transitions: Optional[Transition] = None,
               should_stop: Callable[[], bool] = lambda: False) -> DiagnosticsResult:
    inputs = np.asarray(inputs)
    times = {}

    def check_stop(next_stage: str) -> None:
      if should_stop():
        raise StopRequested(f'stopped before the {next_stage}')

    start = time.time()
    activity, features = activation_pass(params, inputs)
    stats = statistics.compute_statistics(jax.device_get(params), activity, features, config.rank_delta,
                                          config.weight_rank_rtol, config.dormant_threshold)
    times['statistics'] = time.time() - start

    check_stop('Hessian')
    start = time.time()
    chunk = min(config.hessian_chunk_size, config.hessian_batch_size, len(inputs))
    batch = min(config.hessian_batch_size, len(inputs)) // chunk * chunk
    used = inputs[:max(batch, min(config.covariance_samples, len(inputs)))]
    if 'phi' not in perturbation:
      perturbation['phi'] = network.init(perturbation_key, inputs[:1])
    current = _chunked(lambda x: outputs(params, x), used, config.activation_chunk_size)
    perturbed = _chunked(lambda x: outputs(perturbation['phi'], x), used, config.activation_chunk_size)
    targets = np.asarray(curvature.perturbed_targets(jnp.asarray(current), jnp.asarray(perturbed),
                                                     config.noise_scale))
    times['targets'] = time.time() - start

    start = time.time()
    spectrum = curvature.hessian_spectrum(
        run_lanczos, params,
        inputs[:batch].reshape((batch // chunk, chunk) + inputs.shape[1:]),
        targets[:batch].reshape(batch // chunk, chunk, -1),
        rng, config.lanczos_draws, config.density_grid_size, config.density_sigma)
    times['hessian'] = time.time() - start

    check_stop('gradient covariance')
    start = time.time()
    k = min(config.covariance_samples, len(inputs))
    block = covariance_block_size(config, params)
    gradients = curvature.gradient_covariance(probe_gradients, params, None, (inputs[:k], targets[:k]), block,
                                              config.kmeans_clusters, config.kmeans_seed)
    times['covariance'] = time.time() - start

    td = None
    if td_gradients is not None and transitions is not None and config.td_covariance_samples > 0:
      if target_params is None:
        raise ValueError('The TD-gradient covariance needs the target parameters beside the transitions.')
      check_stop('TD-loss gradient covariance')
      start = time.time()
      k = min(config.td_covariance_samples, len(transitions.action))
      td = curvature.gradient_covariance(td_gradients, params, target_params,
                                         jax.tree_util.tree_map(lambda x: np.asarray(x)[:k], transitions),
                                         block, config.kmeans_clusters, config.kmeans_seed)
      times['td_covariance'] = time.time() - start
    times['total'] = sum(times.values())
    return DiagnosticsResult(spectrum, gradients, td, stats, batch, times)

  return diagnose
