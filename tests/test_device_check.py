"""scripts/device_check.sh: the accelerator check's table, here on CPU at its small sizes."""

import os
import subprocess
import sys

import jax
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # Each runs the device check's benchmark as a command: tens of seconds.


def test_the_device_check_prints_every_figure_beside_the_versions_it_was_measured_with():
  result = subprocess.run(['bash', 'scripts/device_check.sh', '--archs=mlp,nature_dqn'], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'DEVICE_CHECK_QUICK': '1',
                               'PYTHON': sys.executable})
  assert result.returncode == 0, result.stderr[-3000:]
  header, *lines = [line for line in result.stdout.splitlines() if ' | ' in line]
  assert header.split()[:4] == ['figure', 'arch', 'value', 'unit']
  rows = {(line.split()[0], line.split()[1]): line for line in lines}
  # matmul; per arch the update loop, the fused learner at K = 1 and 4, probe x2, Hessian, C_k.
  fused = [line for line in lines if line.startswith('fused_learner')]
  assert len(rows) + len(fused) - 2 == len(lines) == 1 + 2 * (1 + 2) + 4 * 2
  assert set(rows) == {('matmul_f32', '-'), ('update_loop', 'mlp'), ('update_loop', 'nature_dqn'),
                       ('fused_learner', 'mlp'), ('fused_learner', 'nature_dqn')} | {
      (figure, arch) for arch in ('mlp', 'nature_dqn')
      for figure in ('probe_vmapped', 'probe_loop', 'hessian_density', 'covariance_ck')}
  assert [(line.split()[1], line.split()[4]) for line in fused] == [
      ('mlp', 'K=1,'), ('mlp', 'K=4,'), ('nature_dqn', 'K=1,'), ('nature_dqn', 'K=4,')]
  assert all('MFLOP/update' in line and 'of matmul_f32' in line for line in fused)
  for line in fused + list(rows.values()):
    assert float(line.split()[2]) > 0, line
    assert line.split(' | ', 1)[1].startswith('cpu:'), line
    assert f'jax {jax.__version__} ' in line and ' dm-haiku ' in line and ' optax ' in line, line
  assert 'of matmul_f32' in rows['probe_vmapped', 'nature_dqn'] and 'loop/vmapped' in rows['probe_vmapped', 'mlp']
  assert rows['update_loop', 'nature_dqn'].split()[3] == 'updates/s'


def test_the_device_check_names_the_architectures_it_accepts():
  result = subprocess.run([sys.executable, '-m', 'launch.benchmarks.device_check', '--quick', '--archs=resnet18'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT})
  assert result.returncode != 0 and '--archs=resnet18: accepted: cnn, mlp, nature_dqn' in result.stderr
