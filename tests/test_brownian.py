"""The Brownian-motion control (section 3.2): equal step norms, random directions, identical starts, its files."""

import os
import subprocess
import sys

import numpy as np
import pytest

import environments
from launch.studies import brownian as brownian_study
from probes.records.loggers import read_jsonl
from probes.measures.diagnostics import DiagnosticsConfig
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # A real Brownian study (the module's fixture) and the command: tens of seconds.

# A 26,506-parameter MLP (hidden width 32) on 300 embedded-MNIST transitions, measured at steps 0, 10 and 20.
CONFIG = brownian_study.StudyConfig(steps=20, measure_every=10, num_transitions=300, batch_size=32,
                                    target_update_period=15, width_multiplier=1 / 16)
DIAGNOSTICS = DiagnosticsConfig(lanczos_steps=5, hessian_batch_size=64, covariance_samples=32,
                                td_covariance_samples=32)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  env = environments.make(brownian_study.ENV, seed=CONFIG.seed, download=False)
  transitions = brownian_study.collect_transitions(env, CONFIG.num_transitions, CONFIG.seed)
  probe_inputs = brownian_study.select_probe_inputs(transitions, DIAGNOSTICS)
  run_dir = str(tmp_path_factory.mktemp('brownian'))
  result = brownian_study.run(run_dir, CONFIG, DIAGNOSTICS, transitions, probe_inputs,
                              env.action_spec().num_values, log=lambda line: None)
  return run_dir, result


def test_the_walk_takes_the_gradient_steps_norms_in_random_directions(study):
  _, result = study
  assert result.gd_step_norms.shape == result.walk_step_norms.shape == (CONFIG.steps,)
  assert np.all(result.gd_step_norms > 0)
  # Equal norms up to the float32 rounding of theta + delta (|theta_i| ~ 0.05 against |delta_i| ~ 1e-6); summed
  # over the path the rounding averages out.
  np.testing.assert_allclose(result.walk_step_norms, result.gd_step_norms, rtol=1e-4)
  assert np.sum(result.walk_step_norms) == pytest.approx(np.sum(result.gd_step_norms), rel=1e-5)
  # An isotropic direction in 26,506 dimensions: cosine ~ N(0, 1 / 26,506), |cos| < 0.05 is 8 sigma.
  assert np.max(np.abs(result.step_cosines)) < 0.05
  assert np.all(np.isfinite(result.train_td_losses))


def test_one_record_per_measured_step_and_process_identical_at_the_start(study):
  _, result = study
  records = result.records
  assert [(r['step'], r['process']) for r in records] == [
      (step, process) for step in (0, 10, 20) for process in ('gradient_descent', 'random_walk')]
  gd, rw = records[0], records[1]
  # Same parameters, probe inputs, perturbation network and Lanczos key: the same measurement.
  assert gd['distance_from_init'] == rw['distance_from_init'] == 0.0
  for key, value in gd.items():
    if key in ('process', 'time') or key.startswith('time_'):
      continue
    if isinstance(value, dict):  # Weight ranks per layer.
      assert rw[key] == value, key
    else:
      np.testing.assert_allclose(np.asarray(rw[key], float), np.asarray(value, float), rtol=1e-6, atol=1e-6,
                                 err_msg=key)
  # Afterwards the processes part: equal path lengths, different positions.
  for gd, rw in zip(records[2::2], records[3::2]):
    assert rw['path_length'] == pytest.approx(gd['path_length'], rel=1e-5)
    assert 0 < gd['distance_from_init'] <= gd['path_length'] * (1 + 1e-5)
    assert 0 < rw['distance_from_init'] <= rw['path_length'] * (1 + 1e-5)
    assert gd['top_eigenvalue'] != rw['top_eigenvalue']


def test_the_run_directory_holds_the_records_matrices_and_figure(study):
  run_dir, result = study
  written = read_jsonl(os.path.join(run_dir, 'brownian.jsonl'))
  assert [(r['process'], r['step']) for r in written] == [(r['process'], r['step']) for r in result.records]
  for record in written:
    for key in ('top_eigenvalue', 'bottom_eigenvalue', 'covariance_mean_offdiag', 'covariance_frac_negative',
                'covariance_cluster_sizes', 'density_grid', 'density', 'parameter_norm', 'distance_from_init',
                'td_loss', 'td_covariance_mean_offdiag'):
      assert key in record, key
    for kind, k in (('covariance', 32), ('td_covariance', 32)):
      matrix = np.load(brownian_study.covariance_path(run_dir, kind, record['process'], record['step']))
      assert matrix.shape == (k, k)
      np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
  with open(os.path.join(run_dir, 'plots', 'brownian.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _command(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'launch.studies.brownian', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_the_command_refuses_a_directory_holding_results(study):
  run_dir, _ = study
  path = os.path.join(run_dir, 'brownian.jsonl')
  before = open(path).read()
  done = _command(f'--run_dir={run_dir}', '--steps=20', '--measure_every=10')
  assert done.returncode != 0
  assert f'--run_dir={run_dir} already holds' in done.stderr
  assert open(path).read() == before


def test_a_bad_flag_value_is_an_error_naming_the_flag(tmp_path):
  done = _command(f'--run_dir={tmp_path}', '--steps=20', '--measure_every=50')
  assert done.returncode != 0
  assert '--measure_every=50 exceeds --steps=20' in done.stderr
  assert not os.listdir(tmp_path)
