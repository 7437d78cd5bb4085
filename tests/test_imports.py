"""agents/ and probes/ run where TensorFlow, Reverb, Launchpad, ale-py and OpenCV are absent (an accelerator box)."""

import os
import pkgutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Nor ale-py and OpenCV: environments/ imports a family's module when it is used (scripts/device_check.sh).
BLOCKED = ('tensorflow', 'reverb', 'launchpad', 'courier', 'ale_py', 'cv2')


def _import_blocked(modules) -> subprocess.CompletedProcess:
  """Imports `modules` in a fresh interpreter where any import of TensorFlow, Reverb, Launchpad or Courier fails."""
  script = (f'import importlib, sys\nfor name in {BLOCKED!r}:\n  sys.modules[name] = None\n'
            f'for module in {list(modules)!r}:\n  importlib.import_module(module)\nprint("ok")\n')
  return subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _is_command(module: str) -> bool:
  with open(os.path.join(ROOT, *module.split('.')) + '.py') as f:
    return 'app.run(' in f.read()


def test_agents_and_probes_import_without_tensorflow_reverb_or_launchpad():
  modules = [f'{package}.{info.name}' for package in ('agents', 'probes')
             for info in pkgutil.iter_modules([os.path.join(ROOT, package)])]
  assert 'agents.update' in modules and 'probes.evaluator' in modules
  commands = [m for m in modules if _is_command(m)]  # Each defines its flags: one interpreter each.
  assert 'probes.run' in commands
  for group in [[m for m in modules if m not in commands], *([c] for c in commands)]:
    result = _import_blocked(group)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]
  # The check can fail: launch/ needs them.
  blocked = _import_blocked(['launch.replay'])
  assert blocked.returncode != 0 and 'ModuleNotFoundError' in blocked.stderr
