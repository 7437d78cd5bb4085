"""Curvature and representation diagnostics against exact computations on tiny networks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from scipy import integrate

from agents.builder import make_agent
from agents.config import AgentConfig
from agents.update import make_transition_loss
from agents.types import Network, NetworkOutput, Transition
from environments.datasets import EMBEDDED_DIR as EMBEDDED
from probes.measures import curvature
from probes.measures import statistics
from probes.measures.diagnostics import DiagnosticsConfig, covariance_block_size, make_diagnostics


@pytest.fixture(scope='module')
def problem():
  """A 16-input MLP of width 8 (235 parameters: small enough for `jax.hessian`), chunked targets."""
  network = make_agent(AgentConfig(width_multiplier=1 / 64), num_actions=3).network
  inputs = np.random.default_rng(0).integers(0, 256, (64, 4, 4, 1), dtype=np.uint8)
  params = network.init(jax.random.PRNGKey(0), inputs[:1])
  output_fn = lambda p, x: network.apply(p, x).outputs
  phi = network.init(jax.random.PRNGKey(1), inputs[:1])
  targets = curvature.perturbed_targets(output_fn(params, inputs), output_fn(phi, inputs), 1.0)
  flat, unravel = ravel_pytree(params)
  loss = lambda theta: jnp.mean(curvature.per_example_loss(output_fn, unravel(theta), inputs, targets))
  hessian = np.asarray(jax.hessian(loss)(flat), np.float64)
  chunked = (inputs.reshape(2, 32, 4, 4, 1), targets.reshape(2, 32, -1))
  return network, output_fn, params, inputs, targets, chunked, (hessian + hessian.T) / 2


def test_hvp_is_the_hessian_times_v(problem):
  _, output_fn, params, _, _, (x, y), hessian = problem
  flat, hvp = curvature.make_hvp(output_fn, params, x, y)
  v = jax.random.normal(jax.random.PRNGKey(2), flat.shape)
  np.testing.assert_allclose(hvp(v), hessian @ np.asarray(v), rtol=1e-4, atol=1e-5)


def test_stepwise_lanczos_and_unrolled_hvp_match_the_compiled_loops(problem):
  """The CPU path for convolutional networks (probes/measures/compiled_loops.py) computes the same tridiagonal."""
  _, output_fn, params, _, _, (x, y), _ = problem
  flat, hvp = curvature.make_hvp(output_fn, params, x, y)
  _, unrolled_hvp = curvature.make_hvp(output_fn, params, x, y, unrolled=True)
  v = jax.random.normal(jax.random.PRNGKey(2), flat.shape)
  np.testing.assert_allclose(unrolled_hvp(v), hvp(v), rtol=1e-5, atol=1e-6)
  key = jax.random.PRNGKey(4)
  looped = curvature.make_lanczos(output_fn, num_steps=12, stepwise=False)(params, x, y, key)
  stepwise = curvature.make_lanczos(output_fn, num_steps=12, stepwise=True)(params, x, y, key)
  for a, b in zip(looped, stepwise):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_lanczos_top_eigenvalue_and_quadrature_moments(problem):
  _, output_fn, params, _, _, (x, y), hessian = problem
  exact = np.linalg.eigvalsh(hessian)
  n = exact.size
  run = curvature.make_lanczos(output_fn, num_steps=90)
  key = jax.random.PRNGKey(3)
  values, weights = curvature.ritz(*run(params, x, y, key))
  assert values.max() == pytest.approx(exact.max(), rel=1e-2)
  # Gauss quadrature with 90 nodes is exact for low moments of the draw's measure v^T H^p v / |v|^2.
  v = np.asarray(jax.random.normal(jax.random.split(key)[0], (n,)), np.float64)
  v /= np.linalg.norm(v)
  assert weights.sum() == pytest.approx(1.0, rel=1e-5)
  assert np.sum(weights * values) == pytest.approx(v @ hessian @ v, rel=1e-3, abs=1e-6)
  assert np.sum(weights * values**2) == pytest.approx(v @ hessian @ hessian @ v, rel=1e-3)
  # Averaged over draws the moments estimate the spectrum's: tr(H^p) / n (Hutchinson), within 4 standard errors.
  spectrum = curvature.hessian_spectrum(run, params, x, y, key, num_draws=24, grid_size=2048, relative_sigma=0.01)
  for power in (1, 2):
    per_draw = np.sum(spectrum.ritz_weights * spectrum.ritz_values**power, axis=1)
    stderr = per_draw.std(ddof=1) / np.sqrt(len(per_draw))
    assert abs(per_draw.mean() - np.mean(exact**power)) < 4 * stderr + 1e-6
  # The smoothed density integrates to 1, keeps the mean and adds sigma^2 to the second moment.
  grid, density = spectrum.grid, spectrum.density
  mean = np.sum(spectrum.ritz_weights * spectrum.ritz_values) / 24
  second = np.sum(spectrum.ritz_weights * spectrum.ritz_values**2) / 24
  assert integrate.trapezoid(density, grid) == pytest.approx(1.0, rel=1e-6)
  assert integrate.trapezoid(grid * density, grid) == pytest.approx(mean, rel=1e-3, abs=1e-4)
  assert integrate.trapezoid(grid**2 * density, grid) == pytest.approx(second + spectrum.sigma**2, rel=1e-3)


def test_full_lanczos_recovers_the_whole_spectrum(problem):
  """n steps, through the restarts that degenerate (dead-unit) eigenvalues force."""
  _, output_fn, params, _, _, (x, y), hessian = problem
  exact = np.linalg.eigvalsh(hessian)
  values, weights = curvature.ritz(*curvature.make_lanczos(output_fn, num_steps=10_000)(
      params, x, y, jax.random.PRNGKey(4)))
  assert values.size == exact.size
  np.testing.assert_allclose(values, exact, atol=1e-4 * np.abs(exact).max())
  assert weights.sum() == pytest.approx(1.0, rel=1e-5)


def test_gradient_covariance_matches_a_per_example_loop(problem):
  _, output_fn, params, inputs, targets, _, _ = problem
  k = 20
  rows = []
  for i in range(k):
    loss = lambda p: curvature.per_example_loss(output_fn, p, inputs[i:i + 1], targets[i:i + 1])[0]
    rows.append(np.asarray(ravel_pytree(jax.grad(loss)(params))[0], np.float64))
  g = np.stack(rows)
  expected = (g @ g.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1))
  per_example = curvature.make_per_example_gradients(curvature.regression_example_loss(output_fn))
  examples = (inputs[:k], targets[:k])
  gram = curvature.gradient_gram(per_example, params, None, examples, chunk_size=8)  # Blocks 8, 8, 4.
  np.testing.assert_allclose(curvature.normalise_gram(gram), expected, atol=1e-5)
  result = curvature.gradient_covariance(per_example, params, None, examples, 8, num_clusters=4, seed=0)
  assert sorted(result.order) == list(range(k))
  np.testing.assert_allclose(result.matrix, expected[np.ix_(result.order, result.order)], atol=1e-5)
  off = expected[~np.eye(k, dtype=bool)]
  assert result.mean_offdiag == pytest.approx(off.mean(), abs=1e-5)
  assert result.frac_negative == pytest.approx(np.mean(off < 0), abs=1.5 / off.size)


def test_kmeans_order_recovers_planted_blocks():
  labels = np.repeat([0, 1, 2], [7, 5, 3])
  shuffle = np.random.default_rng(5).permutation(labels.size)
  planted = labels[shuffle]
  matrix = np.where(planted[:, None] == planted[None], 0.9, -0.2) + 0.01 * np.eye(labels.size)
  found = curvature.kmeans(matrix, 3, seed=0)
  order = curvature.cluster_order(found)
  assert list(planted[order]) == list(labels)  # Largest cluster first, each contiguous.
  assert np.array_equal(curvature.kmeans(matrix, 3, seed=0), found)


def _toy_network() -> Network:
  """Hand-written layers: a dense layer of 4 units and a conv-shaped layer of 3 channels."""

  def apply(params, x, rng=None):
    del rng
    dense = jax.nn.relu(x @ params['linear_0']['w'] + params['linear_0']['b'])
    conv = jax.nn.relu(x[:, :, None, None] * params['conv']['w'])  # [B, 2, 1, 3]
    return NetworkOutput(dense.sum(-1, keepdims=True), (conv, dense))

  return Network(init=None, apply=apply)


def test_statistics_on_constructed_cases():
  x = np.abs(np.random.default_rng(6).normal(size=(40, 2))).astype(np.float32) + 0.1
  params = {
      'linear_0': {'w': np.array([[1.0, 1.0, 0.02, 1.0], [1.0, 1.0, 0.02, -1.0]], np.float32),
                   'b': np.array([0.0, -100.0, 0.0, 0.0], np.float32)},  # Unit 1 dead; unit 2 dormant.
      'conv': {'w': np.array([1.0, 0.0, 2.0], np.float32)},  # Channel 1 dead at every position.
  }
  activity, features = statistics.make_activation_pass(_toy_network().apply, chunk_size=16)(params, x)
  first_layer = np.maximum(x @ params['linear_0']['w'] + params['linear_0']['b'], 0)
  np.testing.assert_allclose(activity[1], np.abs(first_layer).mean(0), rtol=1e-5)
  assert features.shape == (40, 4)
  stats = statistics.compute_statistics(params, activity, features, delta=0.01, weight_rtol=None, dormant_tau=0.1)
  record = stats.as_record()
  assert record['dead_units'] == 2 and record['num_hidden_units'] == 7
  assert record['dead_unit_fraction'] == pytest.approx(2 / 7)
  assert record['dormant_units'] == 3  # The dead ones and the dense layer's unit 2 (score ~0.02).
  assert stats.parameter_norm == pytest.approx(np.sqrt(sum(np.sum(np.square(v)) for m in params.values()
                                                          for v in m.values())))
  # tau = 0 counts exactly the dead units.
  assert sum(mask.sum() for mask in statistics.dormant_masks(activity, 0.0)) == 2


def test_ranks_on_constructed_matrices():
  rng = np.random.default_rng(7)
  low_rank = (rng.normal(size=(16, 3)) @ rng.normal(size=(3, 8))).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
  params = {'dense': {'w': low_rank, 'b': np.zeros(8, np.float32)}, 'conv': {'w': kernel}}
  matrices = statistics.weight_matrices(params)
  assert matrices['conv/w'].shape == (18, 4) and 'dense/b' not in matrices
  ranks = {name: statistics.numerical_rank(statistics.singular_values(m), m.shape) for name, m in matrices.items()}
  assert ranks == {'conv/w': 4, 'dense/w': 3}
  # srank: the fewest singular values holding 99% of their sum.
  assert statistics.approximate_rank(np.array([10.0, 5.0, 4.0, 0.1]), 0.01) == 3
  assert statistics.approximate_rank(np.array([10.0, 5.0, 4.0, 0.3]), 0.01) == 4
  # Features with r equal singular values have feature rank r.
  left, right = np.linalg.qr(rng.normal(size=(100, 5)))[0], np.linalg.qr(rng.normal(size=(32, 5)))[0]
  features = 3.0 * left @ right.T  # [100, 32], singular values (3, 3, 3, 3, 3).
  assert statistics.approximate_rank(statistics.singular_values(features), 0.01) == 5


def test_make_diagnostics_record(problem):
  network, _, params, inputs, _, _, _ = problem
  config = DiagnosticsConfig(hessian_batch_size=48, hessian_chunk_size=16, lanczos_steps=30, covariance_samples=24,
                             covariance_chunk_size=10, kmeans_clusters=3, density_grid_size=64)
  result = make_diagnostics(network, config, jax.random.PRNGKey(1))(params, inputs, jax.random.PRNGKey(8))
  record = json.loads(json.dumps(result.as_record()))
  assert result.covariance.shape == (24, 24)
  np.testing.assert_allclose(np.diag(result.covariance), 1.0, rtol=1e-5)
  assert record['hessian_batch_size'] == 48 and record['lanczos_steps'] == 30
  assert len(record['density']) == len(record['density_grid']) == 64
  assert record['top_eigenvalue'] == max(record['ritz_values'][0])
  assert sum(record['covariance_cluster_sizes']) == 24 and record['covariance_block_size'] == 10
  # Two blocks of 3 gradients of the 235 parameters fit in this budget, not two of 4.
  budget = dataclasses.replace(config, covariance_memory_mb=2 * 3.5 * 235 * 4 / 2**20)
  assert covariance_block_size(budget, params) == 3
  for name in ('statistics', 'targets', 'hessian', 'covariance', 'total'):
    assert record[f'time_{name}_s'] >= 0
  for key in ('parameter_norm', 'weight_rank_mean', 'dead_unit_fraction', 'feature_rank', 'dormant_fraction',
              'covariance_mean_offdiag', 'covariance_frac_negative'):
    assert key in record


SMALL = DiagnosticsConfig(hessian_batch_size=32, hessian_chunk_size=16, lanczos_steps=8, covariance_samples=32,
                          covariance_chunk_size=16, kmeans_clusters=2, density_grid_size=32, td_covariance_samples=24)


def _unsorted(result_matrix: np.ndarray, order: np.ndarray) -> np.ndarray:
  """C_k back in the inputs' order (undoes the k-means permutation)."""
  inverse = np.argsort(order)
  return result_matrix[np.ix_(inverse, inverse)]


def test_covariance_of_identical_inputs_is_one_and_independent_of_the_key(problem):
  """The perturbation is a function of the input: equal inputs give equal gradients, whatever the key."""
  network, _, params, inputs, _, _, _ = problem
  groups = np.concatenate([np.repeat(inputs[:1], 16, axis=0), np.repeat(inputs[1:2], 16, axis=0)])
  diagnose = make_diagnostics(network, SMALL, jax.random.PRNGKey(1))
  first = diagnose(params, groups, jax.random.PRNGKey(2))
  second = diagnose(params, groups, jax.random.PRNGKey(3))
  matrix = _unsorted(first.covariance, first.gradients.order)
  same_group = np.kron(np.eye(2, dtype=bool), np.ones((16, 16), bool))
  np.testing.assert_allclose(matrix[same_group], 1.0, atol=1e-5)
  assert first.gradients.cluster_sizes == [16, 16]
  np.testing.assert_allclose(second.covariance, first.covariance, atol=1e-6)
  # Other inputs, other keys: still the same C_k on the same parameters and inputs.
  again = [diagnose(params, inputs[:32], jax.random.PRNGKey(k)).covariance for k in (4, 5)]
  np.testing.assert_allclose(again[0], again[1], atol=1e-6)


def test_covariance_of_a_trained_network_is_not_a_coin_flip():
  """After training, C_k's off-diagonal signs follow the network; i.i.d. noise targets made them ~50/50."""
  with np.load(os.path.join(EMBEDDED, 'mnist-10k.npz')) as digits:  # Real digits the repo ships.
    inputs, labels = digits['x_train'][:512, :, :, None], digits['y_train'][:512].astype(np.int32)
  network = make_agent(AgentConfig(width_multiplier=1 / 16), num_actions=10).network  # Width 32.
  params = network.init(jax.random.PRNGKey(0), inputs[:1])
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss = lambda p: jnp.mean(jnp.square(network.apply(p, x).outputs - jax.nn.one_hot(y, 10)))
    updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
    return optax.apply_updates(params, updates), opt_state

  for step in range(300):
    batch = np.arange(step * 32, step * 32 + 32) % len(inputs)
    params, opt_state = train_step(params, opt_state, inputs[batch], labels[batch])
  config = dataclasses.replace(SMALL, covariance_samples=128, covariance_chunk_size=64)
  result = make_diagnostics(network, config, jax.random.PRNGKey(1))(params, inputs, jax.random.PRNGKey(2))
  assert result.gradients.frac_negative < 0.3
  assert result.gradients.mean_offdiag > 0.1
  # The old definition, an independent N(0, 1) per example and output: signs are coin flips.
  output_fn = lambda p, x: network.apply(p, x).outputs
  noisy = output_fn(params, inputs[:128]) + jax.random.normal(jax.random.PRNGKey(3), (128, 10))
  per_example = curvature.make_per_example_gradients(curvature.regression_example_loss(output_fn))
  coin = curvature.gradient_covariance(per_example, params, None, (inputs[:128], noisy), 64, 2, 0)
  assert abs(coin.frac_negative - 0.5) < 0.05


@pytest.mark.slow
def test_td_covariance_matches_a_per_transition_loop(problem):
  network, _, params, inputs, _, _, _ = problem
  agent = make_agent(AgentConfig(width_multiplier=1 / 64), num_actions=3)
  target_params = agent.network.init(jax.random.PRNGKey(9), inputs[:1])
  rng = np.random.default_rng(3)
  k = 24
  transitions = Transition(observation=inputs[:k], action=rng.integers(0, 3, k).astype(np.int32),
                           reward=rng.normal(size=k).astype(np.float32), discount=np.ones(k, np.float32),
                           next_observation=inputs[k:2 * k])
  transitions = transitions._replace(**{f: np.concatenate([v[:k - 1], v[:1]])  # The last repeats the first.
                                        for f, v in transitions._asdict().items()})
  loss = make_transition_loss(agent.network, agent.encoding, 0.99)
  rows = []
  for i in range(k):
    one = jax.tree_util.tree_map(lambda x: x[i], transitions)
    rows.append(np.asarray(ravel_pytree(jax.grad(loss)(params, target_params, one))[0], np.float64))
  g = np.stack(rows)
  expected = (g @ g.T) / np.outer(np.linalg.norm(g, axis=1), np.linalg.norm(g, axis=1))
  diagnose = make_diagnostics(network, SMALL, jax.random.PRNGKey(1), loss)
  result = diagnose(params, inputs, jax.random.PRNGKey(2), target_params, transitions)
  matrix = _unsorted(result.td_covariance, result.td_gradients.order)
  np.testing.assert_allclose(matrix, expected, atol=1e-5)
  assert matrix[0, k - 1] == pytest.approx(1.0, abs=1e-5)
  record = result.as_record()
  assert record['td_covariance_samples'] == k and record['time_td_covariance_s'] >= 0
  assert record['td_covariance_mean_offdiag'] == pytest.approx(
      expected[~np.eye(k, dtype=bool)].mean(), abs=1e-5)
  # Without transitions there is no TD covariance and no td_ key.
  assert not any(key.startswith('td_') for key in diagnose(params, inputs, jax.random.PRNGKey(2)).as_record())
