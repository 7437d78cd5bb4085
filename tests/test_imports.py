"""The packages' layers, and the parts that run where TensorFlow, Reverb, Launchpad, ale-py and OpenCV are absent (an
accelerator box: scripts/device_check.sh)."""

import ast
import os
import pkgutil
import subprocess
import sys
from typing import Dict, Set

import pytest

from tests.conftest import ROOT

# Nor ale-py and OpenCV: environments/ imports a family's module when it is used (scripts/device_check.sh).
BLOCKED = ('tensorflow', 'reverb', 'launchpad', 'courier', 'ale_py', 'cv2')

# Each module's layer: the longest prefix listed here. A module imports modules of its own layer or below, never above
# (WORKSPACE.md, "Layers"). Environments sit at the bottom: agents act on them (the registry helper lives there).
LAYERS = {
    'environments': 0,
    'agents': 1,
    'probes.measures': 2, 'probes.evaluation': 2,
    'probes.records': 3,
    'probes.figures': 4, 'probes.evaluator': 4,
    'probes': 5,  # The commands: probes.run, probes.report.
    'launch.presets': 6, 'launch.flags': 6,
    'launch.program': 7,
    'launch.studies': 8, 'launch.simulation': 8,
    'launch': 9,  # The commands, and the benchmarks over everything.
}


def _layer(module: str) -> int:
  parts = module.split('.')
  for n in range(len(parts), 0, -1):
    if '.'.join(parts[:n]) in LAYERS:
      return LAYERS['.'.join(parts[:n])]
  raise KeyError(module)


def _modules() -> Dict[str, str]:
  """Every module of the four packages -> its file."""
  found = {}
  for package in ('environments', 'agents', 'probes', 'launch'):
    found[package] = os.path.join(ROOT, package, '__init__.py')
    for info in pkgutil.walk_packages([os.path.join(ROOT, package)], prefix=f'{package}.'):
      path = os.path.join(ROOT, *info.name.split('.'))
      found[info.name] = os.path.join(path, '__init__.py') if info.ispkg else path + '.py'
  return found


def _imports(path: str, modules: Set[str]) -> Set[str]:
  """The project's modules `path` imports (`from a import b` counts `a.b` where that is a module, else `a`)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      sub = {f'{node.module}.{alias.name}' for alias in node.names} & modules
      found |= sub or {node.module}
  return found & modules


def test_every_module_imports_only_its_layer_and_below():
  modules = _modules()
  assert {'environments.registry', 'probes.measures.plasticity', 'launch.program.graph'} <= set(modules)
  upward = [f'{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})'
            for m, path in sorted(modules.items()) for i in sorted(_imports(path, set(modules)))
            if _layer(i) > _layer(m)]
  assert not upward, '\n'.join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
  """The check can fail: an environments module importing agents is found."""
  planted = tmp_path / 'planted.py'
  planted.write_text('from agents import config\nimport probes.records.run_dir\n')
  modules = set(_modules())
  assert _imports(str(planted), modules) == {'agents.config', 'probes.records.run_dir'}
  assert _layer('environments.planted') < _layer('agents.config')


def _import_blocked(modules) -> subprocess.CompletedProcess:
  """Imports `modules` in a fresh interpreter where any import of TensorFlow, Reverb, Launchpad or Courier fails."""
  script = (f'import importlib, sys\nfor name in {BLOCKED!r}:\n  sys.modules[name] = None\n'
            f'for module in {list(modules)!r}:\n  importlib.import_module(module)\nprint("ok")\n')
  return subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _is_command(path: str) -> bool:
  with open(path) as f:
    text = f.read()
  return 'app.run(' in text or 'benchmarks.run(' in text


@pytest.mark.slow
def test_agents_probes_and_the_device_check_import_without_tensorflow_reverb_or_launchpad():
  # environments/'s families (atari, classification_mdp) import their emulators and image libraries when used.
  modules = {m: p for m, p in _modules().items()
             if m.split('.')[0] in ('agents', 'probes') or m in ('environments', 'environments.registry')}
  modules['launch.benchmarks.device_check'] = _modules()['launch.benchmarks.device_check']
  assert 'agents.update' in modules and 'probes.evaluator' in modules
  commands = [m for m, path in modules.items() if _is_command(path)]  # Each defines its flags: one interpreter each.
  assert 'probes.run' in commands and 'launch.benchmarks.device_check' in commands
  for group in [[m for m in modules if m not in commands], *([c] for c in commands)]:
    result = _import_blocked(group)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]
  # The check can fail: launch/program/ needs them.
  blocked = _import_blocked(['launch.program.replay'])
  assert blocked.returncode != 0 and 'ModuleNotFoundError' in blocked.stderr


@pytest.mark.slow
def test_the_benchmarks_import_together_each_with_flags_of_its_own():
  """Each benchmark declares its flags apart (launch/benchmarks/__init__.py): importing all of them in one process
  defines none twice, and none in absl's namespace."""
  names = sorted(m for m in _modules() if m.startswith('launch.benchmarks.'))
  assert {'launch.benchmarks.agent', 'launch.benchmarks.probes', 'launch.benchmarks.device_check'} <= set(names)
  script = (f'import importlib\nfrom absl import flags\nbefore = set(flags.FLAGS)\n'
            f'for name in {names!r}:\n  importlib.import_module(name)\n'
            f'print(sorted(set(flags.FLAGS) - before))\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  added = result.stdout.strip().splitlines()[-1]
  assert 'archs' not in added and 'seconds' not in added and "'steps'" not in added, added
