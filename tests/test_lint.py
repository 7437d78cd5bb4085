"""The code's style: ruff with the configuration in pyproject.toml (Google style, 120 columns)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*paths: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '--output-format', 'concise', *paths],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_packages_and_tests_pass_ruff():
  result = _ruff('agents', 'environments', 'probes', 'launch', 'tests')
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_sees_a_planted_violation(tmp_path):
  """The check can fail: an unused import and a 121-column line under the project's configuration."""
  planted = tmp_path / 'planted.py'
  planted.write_text('import os\n' + 'x = \'' + 'ab ' * 40 + '\'\n')
  result = _ruff('--config', os.path.join(ROOT, 'pyproject.toml'), str(planted))
  assert result.returncode == 1 and 'F401' in result.stdout and 'E501' in result.stdout, result.stdout
