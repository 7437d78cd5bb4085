"""The plasticity probe (section 2.2, eq. 4), the evaluator's schedule, the report."""

import dataclasses
import json
import os
import pickle
import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agents import checkpointing, snapshots, storage
from agents.builder import make_agent
from agents.config import AgentConfig
from agents.types import Transition
from probes.measures import plasticity
from probes.figures import plots
from probes.figures import study_plots
from probes.measures import probe_set
from probes.measures.diagnostics import DiagnosticsConfig
from probes.evaluator import Evaluator
from probes.records.run_dir import ExperimentConfig, RunLayout, write_or_check_config
from tests.conftest import SMALL, RunsCode, run_module, zero_the_middle


CONFIG = plasticity.ProbeConfig(num_targets=4, steps=150, batch_size=32, num_inputs=256, curve_every=50)
SMALL_DIAGNOSTICS = DiagnosticsConfig(hessian_batch_size=128, hessian_chunk_size=64, lanczos_steps=10,
                                      covariance_samples=32, covariance_chunk_size=16, kmeans_clusters=3,
                                      density_grid_size=64, td_covariance_samples=24)


def source(observations: np.ndarray) -> probe_set.ArraySource:
  """A replay holding one transition per observation."""
  n = len(observations)
  return probe_set.ArraySource(Transition(observation=observations, action=np.arange(n, dtype=np.int32) % 3,
                                          reward=np.ones(n, np.float32), discount=np.ones(n, np.float32),
                                          next_observation=observations[::-1]))


@pytest.fixture(scope='module')
def setup():
  agent = make_agent(AgentConfig(width_multiplier=0.0625), num_actions=3)  # Hidden width 32.
  inputs = np.random.default_rng(0).integers(0, 256, (CONFIG.num_inputs, 8, 8, 1), dtype=np.uint8)
  params = agent.network.init(jax.random.PRNGKey(0), inputs[:1])
  apply_fn = lambda p, x: agent.network.apply(p, x).outputs
  return agent, apply_fn, params, inputs


@pytest.mark.slow
def test_vmapped_probe_equals_the_target_by_target_loop(setup):
  agent, apply_fn, params, inputs = setup
  key = jax.random.PRNGKey(3)
  vmapped = plasticity.agent_probe(agent, CONFIG)(params, inputs, key)
  looped = plasticity.agent_probe(agent, CONFIG, plasticity.make_sequential_probe)(
      params, inputs, key)
  np.testing.assert_allclose(vmapped.baselines, looped.baselines, rtol=1e-5)
  np.testing.assert_allclose(vmapped.step_losses, looped.step_losses, rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(vmapped.final_losses, looped.final_losses, rtol=2e-3)
  assert vmapped.step_losses.shape == (CONFIG.num_targets, CONFIG.steps)


@pytest.mark.slow
def test_steps_cut_into_calls_give_the_same_fits(setup):
  """The CPU path for convolutional networks (a call per few steps) computes what one scan does."""
  agent, apply_fn, params, inputs = setup
  key = jax.random.PRNGKey(5)
  chunked_config = dataclasses.replace(CONFIG, steps_per_call=4)  # 150 steps: 37 calls of 4 and one of 2.
  assert plasticity.steps_per_call(CONFIG, params) is None  # An MLP: one compiled loop.
  assert plasticity.steps_per_call(chunked_config, params) == 4
  # Convolution kernels on CPU: one unrolled step per call, even for a one-step probe.
  with_convolutions = dict(params, conv={'w': jnp.zeros((3, 3, 1, 4))})
  for steps in (1, CONFIG.steps):
    assert plasticity.steps_per_call(dataclasses.replace(CONFIG, steps=steps), with_convolutions) == 1
  whole = plasticity.agent_probe(agent, CONFIG)(params, inputs, key)
  for make in (plasticity.make_probe, plasticity.make_sequential_probe):
    chunked = plasticity.agent_probe(agent, chunked_config, make)(params, inputs, key)
    np.testing.assert_allclose(chunked.step_losses, whole.step_losses, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(chunked.final_losses, whole.final_losses, rtol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize('arch', ['cnn', 'nature_dqn', 'vit'])  # Convolutions (ResNet-18's: the same path as cnn's).
def test_on_cpu_a_convolutional_networks_targets_run_in_turn_with_the_vmapped_results(arch):
  """XLA:CPU runs vmapped convolutions of per-target weights (grouped) on slow kernels, so there the probe fits
  the targets in turn: the same fits, the same numbers, and its progress reaches the whole probe."""
  shape, width = SMALL[arch]
  agent = make_agent(AgentConfig(arch=arch, width_multiplier=width), num_actions=3)
  # A low frequency: the sine does not amplify the float rounding of two ways of computing q(x; theta0) 1e5 times.
  config = plasticity.ProbeConfig(num_targets=2, steps=4, batch_size=8, num_inputs=24, curve_every=2, frequency=1.0)
  inputs = np.random.default_rng(0).integers(0, 256, (24, *shape), dtype=np.uint8)
  params = agent.network.init(jax.random.PRNGKey(0), inputs[:1])
  apply_fn = lambda p, x: agent.network.apply(p, x).outputs
  make = lambda **options: plasticity.make_probe(apply_fn, agent.network.init, agent.optimizer, config,
                                                 plasticity.REGRESSION, **options)
  assert jax.default_backend() == 'cpu'
  done = []
  in_turn = make()(params, inputs, jax.random.PRNGKey(1), progress=done.append)
  vmapped = make(targets_in_turn=False)(params, inputs, jax.random.PRNGKey(1))
  np.testing.assert_allclose(in_turn.baselines, vmapped.baselines, rtol=1e-4)
  np.testing.assert_allclose(in_turn.step_losses, vmapped.step_losses, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(in_turn.final_losses, vmapped.final_losses, rtol=1e-4)
  np.testing.assert_allclose(in_turn.target_offset, vmapped.target_offset, rtol=1e-5, atol=1e-6)
  assert len(done) == 2 * 4 and done == sorted(done) and done[-1] == 4  # One call per step, target after target.


def test_targets_fitted_in_threads_give_the_fits_of_one_after_the_other(setup):
  """The in-turn probe's threads change when a target is fitted, not what: the same numbers, bit for bit, for
  any number of targets at once; progress never goes back and ends at the whole probe."""
  agent, apply_fn, params, inputs = setup
  config = dataclasses.replace(CONFIG, num_targets=3, steps=12, steps_per_call=4, curve_every=4)
  results, heard = {}, {}
  for at_once in (1, 2, 3):
    probe = plasticity.agent_probe(agent, dataclasses.replace(config, targets_at_once=at_once),
                                   plasticity.make_sequential_probe)
    heard[at_once] = []
    results[at_once] = probe(params, inputs, jax.random.PRNGKey(6), progress=heard[at_once].append)
  for at_once in (2, 3):
    for field in ('final_losses', 'baselines', 'step_losses', 'target_offset'):
      np.testing.assert_array_equal(getattr(results[at_once], field), getattr(results[1], field))
  for done in heard.values():
    assert len(done) == 3 * 3 and done == sorted(done) and done[-1] == 12  # 3 calls of 4 steps per target.
  assert heard[1] == [1, 2, 4, 5, 6, 8, 9, 10, 12]  # One target after the other: 4, 8, 12 steps of its own.


def test_a_failing_target_stops_the_others_and_leaves_no_thread_behind(setup):
  """An exception in one thread's fit (the evaluator's stop request is one, raised by its progress callback)
  reaches the caller after the other fits stopped at their next call; nothing runs on behind it."""
  agent, apply_fn, params, inputs = setup
  config = dataclasses.replace(CONFIG, num_targets=4, steps=400, steps_per_call=1, curve_every=4, targets_at_once=2)
  probe = plasticity.agent_probe(agent, config, plasticity.make_sequential_probe)
  heard = []

  def progress(done: int) -> None:
    heard.append(done)
    if done >= 30:
      raise KeyError('stop here')

  with pytest.raises(KeyError, match='stop here'):
    probe(params, inputs, jax.random.PRNGKey(7), progress=progress)
  assert not [thread for thread in threading.enumerate() if thread.name.startswith('probe-target')]
  assert max(heard) < 40  # Stopped at once: not the 400 steps of the first targets, let alone the others'.


def test_a_later_targets_failure_stops_an_earlier_running_one():
  """The failure of a target fitted after another (not the first one the caller would wait for) stops that one at
  its next check and reaches the caller as itself, at once: not after the earlier fit ran to its end."""
  checks = []

  def fit(index: int, stop: threading.Event) -> int:
    if index == 1:
      raise KeyError('target 1 failed')
    for check in range(1000):  # 10 s unless stopped.
      if stop.is_set():
        raise plasticity._Abandoned()
      checks.append(check)
      time.sleep(0.01)
    return index

  started = time.time()
  with pytest.raises(KeyError, match='target 1 failed'):
    plasticity._in_threads(fit, 2, 2)
  assert time.time() - started < 5 and len(checks) < 500


def test_targets_offset_and_baseline_follow_equation_4(setup):
  agent, apply_fn, params, inputs = setup
  key = jax.random.PRNGKey(4)
  result = plasticity.agent_probe(agent, CONFIG)(params, inputs, key)
  offset = np.asarray(apply_fn(params, inputs)).mean(axis=0)
  np.testing.assert_allclose(result.target_offset, offset, rtol=1e-5, atol=1e-6)
  # Rebuild target 0 by hand: the same key split the probe uses.
  target_key = jax.random.split(key, CONFIG.num_targets)[0]
  init_key, _ = jax.random.split(target_key)
  theta0 = agent.network.init(init_key, inputs[:1])
  targets = offset + np.sin(CONFIG.frequency * np.asarray(apply_fn(theta0, inputs)))
  # sin(1e5 * f) amplifies float32 rounding differences between numpy and XLA.
  np.testing.assert_allclose(result.baselines[0], targets.var(axis=0).mean(), rtol=2e-3)
  # High-frequency sines of a random network look like noise: variance near that of sin(U) = 1/2.
  assert 0.3 < result.baseline < 0.6
  record = result.as_record()
  assert record['plasticity'] == pytest.approx(record['baseline'] - record['final_loss_mean'])
  assert [point[0] for point in record['curve']] == [0, 50, 100]
  assert record['curve'][0][1] == pytest.approx(result.step_losses[:, :50].mean(), rel=1e-5)


def saturate(params):
  """Every hidden ReLU dead on every input: the network can only move its output bias."""
  params = jax.tree_util.tree_map(lambda x: x, params)
  params['linear_0'] = {**params['linear_0'], 'b': jnp.full_like(params['linear_0']['b'], -1e3)}
  return params


def test_probe_fits_a_fresh_network_better_than_a_saturated_one(setup):
  agent, apply_fn, params, inputs = setup
  probe = plasticity.agent_probe(agent, plasticity.ProbeConfig(num_targets=4, steps=400, batch_size=64,
                                                                num_inputs=64))
  inputs = inputs[:64]  # Few inputs: a fresh width-32 network can memorise much of them.
  fresh = probe(params, inputs, jax.random.PRNGKey(5))
  dead = probe(saturate(params), inputs, jax.random.PRNGKey(5))
  # The saturated network can only learn a constant: it ends at the target variance.
  assert dead.plasticity == pytest.approx(0.0, abs=0.02 * dead.baseline)
  assert fresh.plasticity > 0.2 * fresh.baseline
  assert fresh.final_losses.mean() < dead.final_losses.mean()


def test_regression_probe_is_the_one_before_output_encodings_were_probed_as_values():
  """Known answer: numbers the probe gave on this fixed case before categorical networks were probed on values
  (the commit before it): a regression run's records are unchanged. The targets' offset (the network's mean output)
  is exact to float32 rounding; on another CPU's kernels (another order of summation) sin(1e5 f) moves the targets'
  variances by up to 0.01% and 60 steps of training the fitted losses by up to 0.12% (an AVX-512 machine against
  the one that recorded them): those are checked to 0.1% and 0.5%."""
  config = plasticity.ProbeConfig(num_targets=3, steps=60, batch_size=16, num_inputs=64, curve_every=20)
  agent = make_agent(AgentConfig(width_multiplier=0.0625), num_actions=3)
  inputs = np.random.default_rng(7).integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
  params = agent.network.init(jax.random.PRNGKey(1), inputs[:1])
  result = plasticity.agent_probe(agent, config)(params, inputs, jax.random.PRNGKey(2))
  np.testing.assert_allclose(result.final_losses, [0.43242043, 0.40587625, 0.41142035], rtol=5e-3)
  np.testing.assert_allclose(result.baselines, [0.50466007, 0.49047923, 0.47840223], rtol=1e-3)
  np.testing.assert_allclose(result.target_offset, [0.034672268, 0.013555826, 0.043628953], rtol=1e-5)
  np.testing.assert_allclose(result.step_losses[:, ::20], [[0.5821445, 0.48367995, 0.40469122],
                                                           [0.44995314, 0.39097893, 0.4050941],
                                                           [0.52316296, 0.4673837, 0.3917454]], rtol=5e-3)
  assert result.as_record()['probe_fit_loss'] == 'mse'


CATEGORICAL = dict(width_multiplier=0.0625, num_bins=11, support_min=-10.0, support_max=10.0)


@pytest.fixture(scope='module', params=['two_hot', 'hl_gauss'])
def categorical(request, setup):
  inputs = setup[3]
  agent = make_agent(AgentConfig(output=request.param, **CATEGORICAL), num_actions=3)
  params = agent.network.init(jax.random.PRNGKey(0), inputs[:1])
  values = lambda p, x: agent.encoding.q_values(agent.network.apply(p, x).outputs)
  return agent, values, params, inputs


def test_categorical_probe_targets_are_equation_4_on_decoded_values(categorical):
  """a is the mean decoded value per action and q the decoded value of a fresh initialisation: targets and
  baseline on regression's footing, not on the 3 x 11 logits."""
  agent, values, params, inputs = categorical
  key = jax.random.PRNGKey(4)
  result = plasticity.agent_probe(agent, CONFIG)(params, inputs, key)
  offset = np.asarray(values(params, inputs)).mean(axis=0)
  assert result.target_offset.shape == (3,)
  np.testing.assert_allclose(result.target_offset, offset, rtol=1e-5, atol=1e-6)
  init_key, _ = jax.random.split(jax.random.split(key, CONFIG.num_targets)[0])
  targets = offset + np.sin(CONFIG.frequency * np.asarray(values(agent.network.init(init_key, inputs[:1]), inputs)))
  np.testing.assert_allclose(result.baselines[0], targets.var(axis=0).mean(), rtol=2e-3)
  assert 0.3 < result.baseline < 0.6  # A sine's variance, as for regression.
  assert result.as_record()['probe_fit_loss'] == 'cross_entropy'


def test_categorical_probe_steps_minimise_the_agents_cross_entropy_and_report_the_values_error(categorical):
  """One SGD step of the fit is params - lr * grad(mean cross-entropy to the targets' encoding); the loss it
  reports is the decoded values' squared error, which is 0 when the targets are the network's own values."""
  agent, values, params, inputs = categorical
  apply_fn = lambda p, x: agent.network.apply(p, x).outputs
  head = plasticity.head_for(agent.encoding)
  sgd = optax.sgd(0.5)
  config = dataclasses.replace(CONFIG, steps=1, batch_size=CONFIG.num_inputs)
  fit = plasticity._make_fit(apply_fn, agent.network.init, sgd, config, head)  # pylint: disable=protected-access
  inputs = jnp.asarray(inputs)
  own = values(params, inputs)
  opt_state, _, _, step_keys = fit.start(params, inputs, own.mean(axis=0), jax.random.PRNGKey(0))
  fitted, _, losses = fit.run_steps(params, opt_state, inputs, own, step_keys)
  assert float(losses[0]) == pytest.approx(0.0, abs=1e-10)  # The same values, up to float32 rounding.
  assert float(fit.final_loss(params, inputs, own)) == pytest.approx(0.0, abs=1e-10)
  # The same step by hand, on the batch the step drew.
  index = jax.random.randint(step_keys[0], (config.batch_size,), 0, inputs.shape[0])

  def cross_entropy(p):
    logits = apply_fn(p, inputs[index]).reshape(-1, 11)
    return jnp.mean(agent.encoding.loss(logits, own[index].reshape(-1)))

  expected = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, jax.grad(cross_entropy)(params))
  chex.assert_trees_all_close(fitted, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(fitted['head']['w'], params['head']['w'])  # Cross-entropy moves it: a real step.


@pytest.mark.slow
def test_categorical_head_that_can_only_learn_a_constant_keeps_no_plasticity(categorical):
  """Every hidden unit dead: the decoded value can only be a constant, whose best error is the targets' variance
  (the two-hot and HL-Gauss encodings of the targets average to a distribution whose mean is theirs)."""
  agent, values, params, inputs = categorical
  probe = plasticity.agent_probe(agent, plasticity.ProbeConfig(num_targets=4, steps=600, batch_size=64,
                                                                num_inputs=64))
  dead = probe(saturate(params), inputs[:64], jax.random.PRNGKey(5))
  assert dead.plasticity == pytest.approx(0.0, abs=0.03 * dead.baseline)
  fresh = probe(params, inputs[:64], jax.random.PRNGKey(5))
  assert fresh.plasticity > 0.2 * fresh.baseline


def test_categorical_probe_with_no_step_loses_exactly_the_offsets_error(categorical):
  """Learning rate 0 and dead hidden units: the values stay the constant a, so the final loss is the mean of the
  sines' squares and P = var(sine) - mean(sine^2) = -mean(sine)^2, averaged over actions."""
  agent, values, params, inputs = categorical
  frozen = agent._replace(optimizer=optax.sgd(0.0))
  config = dataclasses.replace(CONFIG, num_targets=1, steps=3)
  key = jax.random.PRNGKey(6)
  dead = saturate(params)
  result = plasticity.agent_probe(frozen, config)(dead, inputs, key)
  init_key, _ = jax.random.split(jax.random.split(key, 1)[0])
  sine = np.sin(CONFIG.frequency * np.asarray(values(agent.network.init(init_key, inputs[:1]), inputs),
                                               np.float64))
  assert result.plasticity == pytest.approx(-np.mean(sine.mean(axis=0)**2), abs=2e-3)


def test_categorical_targets_beyond_the_support_are_an_error_naming_the_flags(categorical):
  agent, values, params, inputs = categorical
  top = dict(params, head={**params['head'], 'b': jnp.tile(jnp.arange(11.0) * 10.0, 3)})  # All mass on 10.
  assert float(values(top, inputs[:4]).min()) > 9.99
  with pytest.raises(plasticity.TargetsOutsideSupport, match='--support_max'):
    plasticity.agent_probe(agent, CONFIG)(top, inputs, jax.random.PRNGKey(0))


def test_evaluator_probes_at_zero_every_period_and_at_the_end(setup, tmp_path):
  agent, _, params, inputs = setup
  clock = {'step': 0}
  finished = lambda: clock['step'] >= 230

  def learner_step():  # The learner moves 40 steps each time the evaluator looks.
    clock['step'] = min(clock['step'] + 40, 230)
    return clock['step']

  evaluator = Evaluator(agent, CONFIG, params_source=lambda: (clock['step'], params, params),
                        replay_source=source(inputs), out=RunLayout(str(tmp_path)))
  clock['step'] = -40  # The first look sees step 0.
  evaluator.run(100, learner_step=learner_step, learner_finished=finished, poll_seconds=0.0)
  steps = [r['learner_step'] for r in RunLayout(str(tmp_path)).records('probes')]
  assert steps == [0, 120, 200, 230]  # 0, the first look past each multiple of 100, and the final step.


@pytest.mark.slow
def test_evaluator_snapshots_on_schedule_while_it_probes(setup, tmp_path):
  """The first probe lasts until the learner has finished: the scheduled steps are measured anyway."""
  agent, _, params, inputs = setup
  for max_pending, expected in ((4, [0, 100, 200, 300]), (1, [0, 100, 300])):
    clock, probing = {'step': 0}, threading.Event()

    def learner_step():  # Still until the first probe starts, then 10 steps a look, up to 300.
      if probing.is_set():
        clock['step'] = min(clock['step'] + 10, 300)
      return clock['step']

    finished = lambda: clock['step'] >= 300
    out_dir = str(tmp_path / str(max_pending))
    evaluator = Evaluator(agent, CONFIG, params_source=lambda: (clock['step'], params, params),
                          replay_source=source(inputs), out=RunLayout(out_dir))
    probe = evaluator._probe  # pylint: disable=protected-access

    def slow_probe(*args, **kwargs):
      if not probing.is_set():
        probing.set()
        deadline = time.monotonic() + 30
        while not finished() and time.monotonic() < deadline:
          time.sleep(0.01)
        assert finished(), 'no snapshots were taken while the first probe ran'
      return probe(*args, **kwargs)

    evaluator._probe = slow_probe  # pylint: disable=protected-access
    evaluator.run(100, learner_step=learner_step, learner_finished=finished, poll_seconds=0.001,
                  max_pending=max_pending)
    # Every snapshot at its scheduled step; with one waiting, step 200 found it taken and was skipped.
    records = RunLayout(out_dir).records('probes')
    assert [r['learner_step'] for r in records] == expected
    assert [r.get('skipped_probe_steps') for r in records] == [None] * (len(expected) - 1) + [sorted(
        {0, 100, 200, 300} - set(expected)) or None]
    assert snapshots.saved(RunLayout(out_dir).probe_snapshots) == []  # Each removed once probed (or skipped).


@pytest.mark.slow
def test_evaluator_writes_diagnostics_beside_each_probe(setup, tmp_path):
  agent, _, params, inputs = setup
  evaluator = Evaluator(agent, CONFIG, params_source=lambda: (7, params, params), replay_source=source(inputs),
                        out=RunLayout(str(tmp_path)), diagnostics_config=SMALL_DIAGNOSTICS)
  evaluator.evaluate()
  probe, = RunLayout(str(tmp_path)).records('probes')
  record, = RunLayout(str(tmp_path)).records('diagnostics')
  assert probe['learner_step'] == record['learner_step'] == 7
  assert np.isfinite(record['top_eigenvalue']) and record['hessian_batch_size'] == 128
  assert len(record['density']) == len(record['density_grid']) == 64
  for kind, k in (('covariance', 32), ('td_covariance', 24)):  # Probe loss, TD loss.
    covariance = np.load(RunLayout(str(tmp_path)).covariance(kind, 7))
    assert covariance.shape == (k, k) and record[f'{kind}_samples'] == k
    np.testing.assert_allclose(np.diag(covariance), 1.0, rtol=1e-4)  # Normalised inner products.


def test_report_writes_both_plots(tmp_path):
  logger = RunLayout(str(tmp_path)).logger('probes', 'evaluator', tensorboard=False)
  rng = np.random.default_rng(0)
  for step in (0, 5000, 10000):
    loss = 0.1 + step / 1e5
    logger({'learner_step': step, 'probe_steps': 100, 'num_targets': 10, 'final_loss_mean': loss,
            'final_loss_std': 0.01, 'baseline': 0.5, 'plasticity': 0.5 - loss,
            'curve': [[i, float(0.5 - i / 300 + rng.random() * 0.01)] for i in range(0, 100, 20)]})
  paths = plots.write_report(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['probe_curves.png', 'plasticity.png']
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_report_draws_diagnostics_and_compares_runs(setup, tmp_path):
  agent, _, params, inputs = setup
  small = SMALL_DIAGNOSTICS
  runs = []
  for run in ('a', 'b'):
    clock = {'step': 0}
    evaluator = Evaluator(agent, CONFIG, params_source=lambda: (clock['step'], params, params),
                          replay_source=source(inputs), out=RunLayout(str(tmp_path / run)), diagnostics_config=small)
    for step in (0, 100):
      clock['step'] = step
      evaluator.evaluate()
    runs.append(str(tmp_path / run))
  paths = study_plots.write_comparison(runs, str(tmp_path / 'cmp'))
  names = sorted(os.path.relpath(p, tmp_path) for p in paths)
  expected = [f'{run}/plots/{name}.png' for run in ('a', 'b') for name in
              ('covariance', 'hessian_density', 'plasticity', 'probe_curves', 'statistics')]
  assert names == sorted(expected + ['cmp/statistics_vs_plasticity.png'])
  for path in paths:
    assert os.path.getsize(path) > 10_000


def test_report_on_a_directory_without_probes_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='holds no probe record'):
    plots.write_report(str(tmp_path))


@pytest.mark.slow
def test_probe_set_is_distinct_drawn_once_saved_and_shared(setup, tmp_path):
  """Every probe point, and a second evaluator of the run, measure on the same distinct inputs and targets."""
  agent, _, params, inputs = setup
  repeated = np.concatenate([inputs[:100]] * 3)  # 300 observations, 100 distinct: as MNIST digits repeat.
  path = RunLayout(str(tmp_path)).probe_set
  clock = {'step': 0}
  first = Evaluator(agent, CONFIG, params_source=lambda: (clock['step'], params, params),
                    replay_source=source(repeated), out=RunLayout(str(tmp_path / 'a')), probe_set_path=path)
  records = []
  for step in (0, 100):
    clock['step'] = step
    records.append(first.evaluate())
  saved = probe_set.load(path)
  assert saved.num_unique_inputs == 100 and saved.learner_step == 0
  assert len(np.unique(saved.inputs.reshape(100, -1), axis=0)) == 100
  assert [r['num_unique_inputs'] for r in records] == [100, 100]
  assert [r['probe_set_step'] for r in records] == [0, 0]
  # Same parameters, same inputs and targets: the same measurement, so no loss of plasticity.
  assert records[1]['final_losses'] == records[0]['final_losses']
  assert [r['plasticity_loss'] for r in records] == [0.0, 0.0]
  # A second evaluator (another seed, another replay) reads the saved set and borrows the run's P(theta_0).
  other = Evaluator(agent, CONFIG, params_source=lambda: (200, saturate(params), params),
                    replay_source=source(inputs[100:]), out=RunLayout(str(tmp_path / 'b')), probe_set_path=path, seed=7,
                    reference_probes=RunLayout(str(tmp_path / 'a')))
  record = other.evaluate()
  assert record['num_unique_inputs'] == 100 and record['plasticity_reference_step'] == 0
  # The saturated network fits nothing: its loss of plasticity is the fresh network's plasticity.
  assert record['plasticity_loss'] == pytest.approx(records[0]['plasticity'] - record['plasticity'])
  assert record['plasticity_loss'] > 0.5 * records[0]['plasticity'] > 0
  # Fresh sets on request: new inputs and targets at each point.
  fresh = Evaluator(agent, dataclasses.replace(CONFIG, fresh_inputs=True),
                    params_source=lambda: (0, params, params), replay_source=source(repeated),
                    out=RunLayout(str(tmp_path / 'c')))
  assert fresh.probe_set(0).target_key.tolist() != fresh.probe_set(1).target_key.tolist()


@pytest.mark.slow
def test_plasticity_loss_is_measured_from_the_first_point_and_survives_a_restart(setup, tmp_path):
  agent, _, params, inputs = setup
  snapshots = iter([(0, params, params), (100, saturate(params), params), (200, saturate(params), params)])
  make = lambda: Evaluator(agent, CONFIG, params_source=lambda: next(snapshots), replay_source=source(inputs),
                           out=RunLayout(str(tmp_path)), probe_set_path=RunLayout(str(tmp_path)).probe_set)
  evaluator = make()
  start, saturated = evaluator.evaluate(), evaluator.evaluate()
  assert start['plasticity_loss'] == 0.0 and start['plasticity_reference_step'] == 0
  assert saturated['plasticity_loss'] == pytest.approx(start['plasticity'] - saturated['plasticity'])
  restarted = make()  # A relaunched evaluator: same reference, and it knows what it already probed.
  assert restarted.last_probed_step == 100
  again = restarted.evaluate()
  assert again['plasticity_reference_step'] == 0
  assert again['plasticity_loss'] == pytest.approx(saturated['plasticity_loss'], rel=1e-5)


class NeverFullReplay:
  """A replay that never reaches the probe inputs asked for: it has 50 distinct observations, forever."""

  def __init__(self, inputs):
    self._inputs, self.waited = inputs[:50], False

  def distinct_observations(self, num, give_up, should_stop):
    while not give_up():
      self.waited = True
      time.sleep(0.01)
    return self._inputs

  def transitions(self, num):
    return source(self._inputs).transitions(num)


@pytest.mark.slow
def test_evaluator_ends_with_the_learner_or_a_stop_even_if_the_replay_never_fills(setup, tmp_path):
  agent, _, params, inputs = setup
  # The learner finishes (step 60, after half a second) while the first probe point waits for the replay:
  # the evaluator probes what there is.
  started = time.monotonic()
  learner_step = lambda: min(int((time.monotonic() - started) * 120), 60)

  replay = NeverFullReplay(inputs)
  evaluator = Evaluator(agent, CONFIG, params_source=lambda: (learner_step(), params, params),
                        replay_source=replay, out=RunLayout(str(tmp_path / 'a')))
  thread = threading.Thread(target=evaluator.run, args=(30, learner_step, lambda: learner_step() >= 60),
                            kwargs={'poll_seconds': 0.01}, daemon=True)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive() and replay.waited
  records = RunLayout(str(tmp_path / 'a')).records('probes')
  assert records and all(r['num_unique_inputs'] == 50 for r in records)
  assert records[-1]['learner_step'] == 60
  with open(RunLayout(str(tmp_path / 'a')).evaluator_status) as f:
    assert json.load(f)['state'] == 'finished'
  # A stop request ends the wait of a learner that never finishes; nothing is probed.
  stop = threading.Event()
  evaluator = Evaluator(agent, CONFIG, params_source=lambda: (0, params, params), replay_source=NeverFullReplay(inputs),
                        out=RunLayout(str(tmp_path / 'b')))
  thread = threading.Thread(target=evaluator.run, args=(30, lambda: 0, lambda: False),
                            kwargs={'should_stop': stop.is_set, 'poll_seconds': 0.01}, daemon=True)
  thread.start()
  time.sleep(0.5)
  stop.set()
  thread.join(timeout=30)
  assert not thread.is_alive()


def test_probe_progress_reports_every_chunk_and_changes_nothing(setup):
  agent, apply_fn, params, inputs = setup
  key = jax.random.PRNGKey(5)
  probe = plasticity.agent_probe(agent, dataclasses.replace(CONFIG, progress_every=40))
  seen = []
  with_progress = probe(params, inputs, key, progress=seen.append)
  assert seen == [40, 80, 120, 150]
  whole = probe(params, inputs, key)
  np.testing.assert_allclose(with_progress.final_losses, whole.final_losses, rtol=2e-3)


def test_figure_3_point_of_a_run_is_its_change_against_its_last_plasticity_loss():
  probes = [{'learner_step': 0, 'plasticity_loss': 0.0}, {'learner_step': 100, 'plasticity_loss': 0.25}]
  diagnostics = [{'learner_step': 0, 'parameter_norm': 10.0, 'feature_rank': 40, 'dead_unit_fraction': None},
                 {'learner_step': 50, 'parameter_norm': 99.0, 'feature_rank': 1},
                 {'learner_step': 100, 'parameter_norm': 12.5, 'feature_rank': 30, 'dead_unit_fraction': 0.5}]
  assert plots.run_changes(probes, diagnostics) == {'parameter_norm': 2.5, 'feature_rank': -10,
                                                     'plasticity_loss': 0.25}
  assert plots.run_changes(probes, diagnostics[:1]) == {}  # One point is no change.


@pytest.mark.slow
def test_report_draws_a_diverged_run_with_gaps(tmp_path):
  probes = RunLayout(str(tmp_path)).logger('probes', 'evaluator', tensorboard=False)
  diagnostics = RunLayout(str(tmp_path)).logger('diagnostics', 'evaluator', tensorboard=False)
  for step, value in ((0, 0.4), (100, float('nan'))):
    probes({'learner_step': step, 'probe_steps': 20, 'num_targets': 2, 'final_loss_mean': value,
            'final_loss_std': value, 'baseline': 0.5, 'plasticity': value, 'plasticity_loss': value,
            'curve': [[0, value], [10, value]]})
    diagnostics({'learner_step': step, 'density_grid': [0.0, 1.0, 2.0], 'density': [0.1, value, 0.2],
                 'top_eigenvalue': value, 'parameter_norm': value, 'weight_srank_mean': 3.0})
  assert RunLayout(str(tmp_path)).records('probes')[1]['plasticity'] is None
  paths = plots.write_report(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ['hessian_density.png', 'plasticity.png', 'probe_curves.png',
                                                        'statistics.png']


def test_an_evaluator_that_starts_late_still_measures_theta_0_first(setup, tmp_path):
  agent, _, params, inputs = setup
  evaluator = Evaluator(agent, CONFIG, params_source=lambda: (250, saturate(params), params),
                        replay_source=source(inputs), out=RunLayout(str(tmp_path)),
                        initial_source=lambda: (0, params, params))
  evaluator.run(100, learner_step=lambda: 250, learner_finished=lambda: True, poll_seconds=0.0)
  first, last = RunLayout(str(tmp_path)).records('probes')
  assert (first['learner_step'], last['learner_step']) == (0, 250)
  assert first['plasticity_loss'] == 0.0 and last['plasticity_reference_step'] == 0
  assert last['plasticity_loss'] == pytest.approx(first['plasticity'] - last['plasticity'])
  assert last['plasticity_loss'] > 0


def test_a_step_recorded_by_two_launches_is_read_once_as_the_last_launch_recorded_it(tmp_path):
  layout = RunLayout(str(tmp_path))
  for attempt, steps in ((1, (0, 100, 200)), (2, (100, 300))):
    logger = layout.logger('probes', 'evaluator', tensorboard=False, extra={'attempt': attempt})
    for step in steps:
      logger({'learner_step': step, 'plasticity': float(attempt)})
  records = plots.read_stream(layout, 'probes')
  assert [(r['learner_step'], r['attempt']) for r in records] == [(0, 1), (100, 2), (200, 1), (300, 2)]


FAST = dataclasses.replace(CONFIG, steps=20, curve_every=10, progress_every=10)


class Killed(BaseException):
  """The evaluator's process dies here (kill -9): nothing of it runs after."""


def learner_writes(layout, params, *steps):
  """The learner's probe snapshot files (agents.Learner's `snapshot_every`): saturated after step 0."""
  for step in steps:
    snapshots.save(layout.probe_snapshots, step, saturate(params) if step else params, params)


def waiting_steps(layout):
  return [step for step, _ in snapshots.saved(layout.probe_snapshots)]


@pytest.mark.slow
def test_probe_points_outlive_a_killed_or_stopped_evaluator_and_none_is_probed_twice(setup, tmp_path):
  agent, _, params, inputs = setup
  layout = RunLayout(str(tmp_path))
  no_courier = lambda: pytest.fail('the run\'s own evaluator takes its snapshots from the learner\'s files')
  make = lambda: Evaluator(agent, FAST, params_source=no_courier, replay_source=source(inputs), out=layout,
                           probe_set_path=layout.probe_set)
  probed = lambda: [r['learner_step'] for r in layout.records('probes')]
  learner_writes(layout, params, 0, 100, 200)
  # Killed in its second point's probe: the first is recorded, the other two wait on disk.
  first = make()
  probe, calls = first._probe, []  # pylint: disable=protected-access

  def dies_in_the_second(*args, **kwargs):
    calls.append(kwargs)
    if len(calls) == 2:
      raise Killed()
    return probe(*args, **kwargs)

  first._probe = dies_in_the_second  # pylint: disable=protected-access
  with pytest.raises(Killed):
    first.run(100, lambda: 200, lambda: False, poll_seconds=0.01, take_snapshots=False)
  assert probed() == [0] and waiting_steps(layout) == [100, 200]
  # Restarted in place, then stopped (SIGINT) in its first probe: the point is dropped, its file kept.
  stop = threading.Event()
  second = make()
  assert second.last_probed_step == 0
  probe = second._probe  # pylint: disable=protected-access

  def stopped_in_the_probe(*args, **kwargs):
    stop.set()  # The probe's first progress report (after 10 of its 20 steps) sees it.
    return probe(*args, **kwargs)

  second._probe = stopped_in_the_probe  # pylint: disable=protected-access
  second.run(100, lambda: 200, lambda: False, should_stop=stop.is_set, poll_seconds=0.01, take_snapshots=False)
  assert probed() == [0] and waiting_steps(layout) == [100, 200]
  # Relaunched: the learner, resumed from a checkpoint before step 0's end, writes 0 again (probed already:
  # removed unprobed), then 300, the end. Every missing point is probed, in order, each once.
  learner_writes(layout, params, 0, 300)
  make().run(100, lambda: 300, lambda: True, poll_seconds=0.01, take_snapshots=False)
  records = layout.records('probes')
  assert probed() == [0, 100, 200, 300] and waiting_steps(layout) == []
  assert all(r['plasticity_reference_step'] == 0 and 'skipped_probe_steps' not in r for r in records)
  assert records[1]['plasticity_loss'] > 0  # Step 100's saturated parameters, read from its file.


def test_a_damaged_snapshot_is_moved_aside_and_its_point_skipped_or_probed_from_the_learner(setup, tmp_path):
  agent, _, params, inputs = setup
  layout = RunLayout(str(tmp_path))
  learner_writes(layout, params, 0, 100, 200)
  zero_the_middle(snapshots.path_for(layout.probe_snapshots, 100))
  with open(snapshots.path_for(layout.probe_snapshots, 200), 'r+b') as f:
    f.truncate(1000)  # The end of training, cut short; the learner still publishes that step.
  Evaluator(agent, FAST, params_source=lambda: (200, saturate(params), params), replay_source=source(inputs),
            out=layout, probe_set_path=layout.probe_set).run(100, lambda: 200, lambda: True, poll_seconds=0.01,
                                                             take_snapshots=False)
  records = layout.records('probes')
  assert [r['learner_step'] for r in records] == [0, 200]
  assert records[1]['skipped_probe_steps'] == [100] and records[1]['plasticity_loss'] > 0  # The learner's params.
  problems = layout.records('problems')
  assert [os.path.basename(r['file']) for r in problems] == ['000000100.msgpack', '000000200.msgpack']
  assert 'does not match its checksum' in problems[0]['problem'] and 'Moved to' in problems[0]['action']
  assert sorted(name.split('.damaged-')[0] for name in os.listdir(layout.probe_snapshots)) == [
      '000000100.msgpack', '000000200.msgpack']  # Moved aside, not deleted; no snapshot waits.


def test_a_damaged_probe_set_is_moved_aside_and_drawn_again_and_the_records_say_so(setup, tmp_path):
  agent, _, params, inputs = setup
  layout = RunLayout(str(tmp_path))
  make = lambda: Evaluator(agent, FAST, params_source=lambda: pytest.fail('no Courier snapshot'),
                           replay_source=source(inputs), out=layout, probe_set_path=layout.probe_set)
  drawn = make().probe_set(0)
  # Arrays changed inside a whole zip (its CRCs right): only the checksum tells.
  with np.load(layout.probe_set) as saved:
    arrays = dict(saved)
  arrays['inputs'] = arrays['inputs'][::-1]
  np.savez(layout.probe_set, **arrays)
  with pytest.raises(probe_set.Damaged, match='do not match its checksum'):
    probe_set.load(layout.probe_set)
  with open(layout.probe_set, 'r+b') as f:
    f.truncate(f.seek(0, os.SEEK_END) // 2)  # Cut short: not a zip (BadZipFile).
  learner_writes(layout, params, 0)
  make().run(100, lambda: 0, lambda: True, poll_seconds=0.01, take_snapshots=False)
  record, = layout.records('probes')
  problem, = layout.records('problems')
  assert problem['file'] == layout.probe_set and 'BadZipFile' in problem['problem']
  aside = record['probe_set_replaced']
  assert aside.startswith(layout.probe_set + '.damaged-') and os.path.exists(aside) and aside in problem['action']
  redrawn = probe_set.load(layout.probe_set)
  assert redrawn.replaced == aside and redrawn.num_unique_inputs == drawn.num_unique_inputs


@pytest.mark.slow
def test_probing_a_planted_pickle_offline_runs_no_code(tmp_path):
  config = ExperimentConfig(run_dir=str(tmp_path / 'run'), agent=AgentConfig(width_multiplier=0.0625))
  write_or_check_config(config)
  marker = str(tmp_path / 'code_ran')
  planted = checkpointing.path_for(config.layout.checkpoints, 5000, suffix=checkpointing.PICKLED_SUFFIX)
  os.makedirs(config.layout.checkpoints)
  with open(planted, 'wb') as f:
    pickle.dump({'step': 5000, 'state': RunsCode(marker)}, f)
  result = run_module('probes.run', f'--checkpoint={planted}', timeout=300)
  assert result.returncode == 1 and f'{planted} is a pickled checkpoint' in result.stderr, result.stderr[-3000:]
  assert checkpointing.MIGRATE_COMMAND in result.stderr and not os.path.exists(marker)


@pytest.mark.slow
def test_snapshots_that_find_max_pending_waiting_are_skipped_and_recorded_or_probed_after_a_restart(setup, tmp_path):
  agent, _, params, inputs = setup
  layout = RunLayout(str(tmp_path))
  probed = lambda: [r['learner_step'] for r in layout.records('probes')]

  def evaluator_where_training_runs_on_during_the_first_probe(*steps, killed_at=None):
    evaluator = Evaluator(agent, FAST, params_source=lambda: pytest.fail('no Courier snapshot'),
                          replay_source=source(inputs), out=layout, probe_set_path=layout.probe_set)
    probe, calls, finished = evaluator._probe, [], threading.Event()  # pylint: disable=protected-access

    def probe_while_the_learner_writes(*args, **kwargs):
      calls.append(kwargs)
      if len(calls) == 1:
        learner_writes(layout, params, *steps)
        finished.set()
      if len(calls) == killed_at:
        raise Killed()
      return probe(*args, **kwargs)

    evaluator._probe = probe_while_the_learner_writes  # pylint: disable=protected-access
    return evaluator, finished

  learner_writes(layout, params, 0)
  evaluator, finished = evaluator_where_training_runs_on_during_the_first_probe(100, 200, 300, 400, 500, killed_at=4)
  # 100 and 200 wait; 300 and 400 find 2 waiting and are skipped; 500, the end, is probed all the same, but the
  # evaluator is killed in its probe: the skips were not recorded yet, so their files stay.
  with pytest.raises(Killed):
    evaluator.run(100, lambda: 500, finished.is_set, poll_seconds=0.01, max_pending=2, take_snapshots=False)
  assert probed() == [0, 100, 200] and waiting_steps(layout) == [300, 400, 500]
  # Restarted (the run relaunched to 800): what waits on disk at the start is probed; 600 and 700 come while
  # 400 and 500 wait and are skipped, and the end's record says so.
  evaluator, finished = evaluator_where_training_runs_on_during_the_first_probe(600, 700, 800)
  evaluator.run(100, lambda: 800, finished.is_set, poll_seconds=0.01, max_pending=2, take_snapshots=False)
  records = layout.records('probes')
  assert probed() == [0, 100, 200, 300, 400, 500, 800]
  assert [r.get('skipped_probe_steps') for r in records] == [None] * 6 + [[600, 700]]
  assert waiting_steps(layout) == []


@pytest.mark.slow
def test_an_attached_evaluator_leaves_the_runs_snapshot_files_alone(setup, tmp_path):
  agent, _, params, inputs = setup
  run = RunLayout(str(tmp_path))
  learner_writes(run, params, 0, 100)
  before = {path: storage.path(path).read_bytes() for _, path in snapshots.saved(run.probe_snapshots)}
  attached = run.evaluator('attached')
  evaluator = Evaluator(agent, FAST, params_source=lambda: (100, saturate(params), params),
                        replay_source=source(inputs), out=attached, probe_set_path=run.probe_set,
                        reference_probes=run, initial_source=lambda: (0, params, params))
  evaluator.run(100, learner_step=lambda: 100, learner_finished=lambda: True, poll_seconds=0.01)
  assert [r['learner_step'] for r in attached.records('probes')] == [0, 100]  # Its own Courier snapshots.
  assert {path: storage.path(path).read_bytes() for _, path in snapshots.saved(run.probe_snapshots)} == before
  assert run.records('probes') == [] and waiting_steps(attached) == []
