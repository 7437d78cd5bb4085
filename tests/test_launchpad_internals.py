"""launch/program/launchpad_internals.py refuses a Launchpad version whose internals it was not written against."""

import subprocess
import sys

from tests.test_imports import ROOT


def _import_with_launchpad_version(version: str) -> subprocess.CompletedProcess:
  script = ('import importlib.metadata as metadata\n'
            'real = metadata.version\n'
            f'metadata.version = lambda name: {version!r} if name == "dm-launchpad" else real(name)\n'
            'import launch.program.launchpad_internals\n'
            'print("imported")\n')
  return subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_another_launchpad_version_is_refused_naming_the_file_and_the_pin():
  refused = _import_with_launchpad_version('0.6.0')
  assert refused.returncode == 1, refused.stdout
  assert 'dm-launchpad 0.6.0 is installed' in refused.stderr and 'launchpad_internals.py' in refused.stderr
  assert 'written for 0.5.2' in refused.stderr
  accepted = _import_with_launchpad_version('0.5.2')
  assert accepted.returncode == 0 and accepted.stdout.strip() == 'imported', accepted.stderr[-2000:]
