"""What several test modules share, written once: the repository's paths and a small run's flags, commands run as a
user runs them, polling, the processes of a run, small agents and batches, environments and payloads for tests, and
the fixtures pytest hands to any test that names them (`bucket`).

Plain helpers are imported (`from tests.conftest import train`); fixtures are not. Importing this module is cheap:
the project's modules (and JAX) are imported by the helpers that need them, when called, and nothing compiles.

The processes that run tests keep what XLA compiles in a persistent cache (.pytest_cache/d/jax-compilation-cache):
a later run, on either worker, loads each unchanged computation instead of compiling it again (pytest -p
no:cacheprovider: no cache). The commands the tests start compile as a user's do.
"""

import contextlib
import os
import subprocess
import sys
import time

import dm_env
from dm_env import specs
import numpy as np
import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run of `launch.train` small enough for a test: MNIST's MDP, 2 actors, 300 learner steps, one probe.
SMALL_RUN = ['--env=mdp:mnist:easy', '--num_actors=2', '--max_learner_steps=300', '--min_replay_size=200',
             '--log_every=50', '--checkpoint_every=100', '--target_update_period=100', '--probe_every=150',
             '--probe_steps=40', '--probe_inputs=256', '--probe_batch_size=64', '--width_multiplier=0.25',
             '--hessian_batch_size=128', '--lanczos_steps=5', '--covariance_samples=32', '--td_covariance_samples=32']

# Small widths and inputs, per architecture (input shape, --width_multiplier): each compiles and steps in seconds.
SMALL = {
    'mlp': ((8, 8, 1), 0.05),
    'cnn': ((8, 8, 1), 0.1),
    'nature_dqn': ((36, 36, 4), 0.1),
    'resnet18': ((8, 8, 3), 0.0625),
    'vit': ((9, 9, 1), 0.0625),
}


# JAX's persistent compilation cache, for the processes that run tests.

JAX_CACHE = 'jax-compilation-cache'
JAX_CACHE_LIMIT = 1 << 30  # Bytes; past it, the least recently used entries go until half of it is left.


def pytest_configure(config):
  cache = getattr(config, 'cache', None)  # Absent under -p no:cacheprovider.
  if cache is None:
    return
  directory = str(cache.mkdir(JAX_CACHE))
  if not hasattr(config, 'workerinput'):  # This process starts the run (and with -n 0 runs its tests).
    _trim(directory)
    if getattr(config.option, 'numprocesses', None):
      return  # pytest-xdist's workers run the tests; this process compiles nothing.
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compilation_cache, lru_cache  # pylint: disable=import-outside-toplevel

  class AtomicWrites(lru_cache.LRUCache):
    """jax 0.4.30's cache without its file lock (filelock is not installed) writes entries in place, where the
    other worker may read one half written: here each entry appears whole (written aside, then renamed)."""

    def put(self, key: str, val: bytes) -> None:
      path = os.path.join(directory, key)
      if not key or os.path.exists(path):
        return
      partial = f'{path}.{os.getpid()}.partial'
      with open(partial, 'wb') as f:
        f.write(val)
      os.replace(partial, path)

  compilation_cache.LRUCache = AtomicWrites
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # Every computation: small ones add up.
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _trim(directory: str) -> None:
  """Keeps the cache under JAX_CACHE_LIMIT (a read refreshes an entry's mtime)."""
  entries = []
  for entry in os.scandir(directory):
    if entry.is_file():
      stat = entry.stat()
      entries.append((stat.st_mtime, stat.st_size, entry.path))
  total = sum(size for _, size, _ in entries)
  if total > JAX_CACHE_LIMIT:
    for _, size, path in sorted(entries):
      if total <= JAX_CACHE_LIMIT // 2:
        break
      with contextlib.suppress(OSError):
        os.remove(path)
      total -= size


# Commands, run as a user runs them: from the repository's root, on the CPU, downloading nothing.

def command_env(**extra: str) -> dict:
  """This process's environment, with JAX on the CPU and no dataset download, and `extra`."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PLASTICITY_DOWNLOAD': '0', **extra}


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
  """`python -m module args`, run to its end (text output captured)."""
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=command_env(), capture_output=True,
                        text=True, timeout=timeout)


def python_module(module: str, *args: str, **popen) -> subprocess.Popen:
  """`python -m module args`, started (text stdout and stderr piped)."""
  return subprocess.Popen([sys.executable, '-m', module, *args], cwd=ROOT, env=command_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def train(run_dir, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
  """`python -m launch.train --run_dir=run_dir extra`, run to its end."""
  return run_module('launch.train', f'--run_dir={run_dir}', *extra, timeout=timeout)


def wait_for(condition, timeout_s: float = 30.0, what: str = 'the condition') -> None:
  """Polls `condition` until it holds; fails, naming `what`, if it does not within `timeout_s`."""
  deadline = time.time() + timeout_s
  while not condition():
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.2)


# The processes of a run.

def processes(matches, attributes=('pid', 'cmdline', 'create_time')):
  """The processes whose `psutil` info (the given attributes) `matches` says yes to."""
  found = []
  for process in psutil.process_iter(list(attributes)):
    try:
      if process.pid != os.getpid() and matches(process.info):
        found.append(process)
    except psutil.Error:
      pass
  return found


def leftover_processes(since: float, marker: str):
  """The processes started since `since` with `marker` in their command line."""
  return processes(lambda info: info['create_time'] >= since and any(marker in part for part in info['cmdline'] or []))


def node_processes(run_dir: str, node: str = ''):
  """The live processes of one node (`actor/0`) of a local_mp run, or of all its nodes: each holds its log file,
  named after the node, open (this finds no other run's processes, as a name in the command line would)."""
  from probes.records.run_dir import RunLayout  # pylint: disable=import-outside-toplevel
  logs = RunLayout(run_dir).logs
  return processes(lambda info: any(f.path.startswith(logs + os.sep) and f.path.endswith(f'/{node}' if node else '')
                                    for f in info['open_files'] or []), attributes=('pid', 'open_files'))


# Small agents, batches and environments.

def start_node(manager, tmp_path, node: str, script: str) -> str:
  """Starts a process of `node` under a worker manager, running `script` (with `RESTART`, its restart count, and
  os, sys and time imported); its log's path."""
  log_path = str(tmp_path / node.replace('/', '_'))
  code = f'import os, sys, time\nRESTART = int(os.environ.get("PLASTICITY_NODE_RESTART", "0"))\n{script}'
  with open(log_path, 'w') as log:
    manager.process_worker(node, [sys.executable, '-c', code], env=dict(os.environ), stdout=log, stderr=log)
  return log_path


def small_agent(arch: str = 'mlp', num_observations: int = 4, **config):
  """(agent, its AgentConfig, `num_observations` random observations) of a small `arch` (SMALL) with 11 bins for the
  categorical outputs; `config` sets further AgentConfig fields."""
  from agents.builder import make_agent  # pylint: disable=import-outside-toplevel
  from agents.config import AgentConfig  # pylint: disable=import-outside-toplevel
  shape, width = SMALL[arch]
  agent_config = AgentConfig(arch=arch, width_multiplier=width, num_bins=11, **config)
  agent = make_agent(agent_config, num_actions=3)
  observations = np.random.default_rng(0).integers(0, 256, (num_observations, *shape), dtype=np.uint8)
  return agent, agent_config, observations


def random_batches(batch_size: int, shape=(4, 4, 1), num_actions: int = 3, seed: int = 0):
  """Endless batches of random transitions (uint8 observations of `shape`), drawn from `seed`."""
  from agents.types import Transition  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  while True:
    yield Transition(
        observation=rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
        action=rng.integers(0, num_actions, batch_size).astype(np.int32),
        reward=rng.random(batch_size).astype(np.float32),
        discount=np.ones(batch_size, np.float32),
        next_observation=rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8))


class ThreeStepEpisodes(dm_env.Environment):
  """Episodes of 3 steps, reward 5 per step, on constant 4x4x1 observations (nonzero: no tied Q-values)."""

  def __init__(self):
    self._t = 0

  def reset(self) -> dm_env.TimeStep:
    self._t = 0
    return dm_env.restart(np.full((4, 4, 1), 25, np.uint8))

  def step(self, action) -> dm_env.TimeStep:
    self._t += 1
    observation = np.full((4, 4, 1), 25 + 50 * self._t, np.uint8)
    return dm_env.termination(5.0, observation) if self._t == 3 else dm_env.transition(5.0, observation)

  def observation_spec(self):
    return specs.Array((4, 4, 1), np.uint8)

  def action_spec(self):
    return specs.DiscreteArray(3)


# Damage and planted payloads.

class RunsCode:
  """Pickled, a payload that runs code when read: unpickling it creates the file `marker`."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return open, (self.marker, 'w')


def zero_the_middle(path: str, count: int = 4096) -> None:
  """Damage that leaves a file's length and structure as they were: `count` bytes zeroed in its middle."""
  with open(path, 'r+b') as f:
    f.seek(max(f.seek(0, os.SEEK_END) // 2 - count // 2, 0))
    f.write(bytes(count))


# Storage.

@contextlib.contextmanager
def tmpfs(directory: str, size: str):
  """A file system of `size` mounted at `directory` for a test (root only: skipped, saying why, elsewhere),
  unmounted whatever happens."""
  os.makedirs(directory, exist_ok=True)
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', directory], capture_output=True,
                         text=True)
  if mount.returncode != 0:
    pytest.skip(f'a {size} tmpfs cannot be mounted here ({mount.stderr.strip() or mount.returncode}): the test '
                f'needs root')
  try:
    yield directory
  finally:
    subprocess.run(['umount', '-l', directory], check=False)


def partials(root: str):
  """The temporary files of unfinished atomic writes under `root`."""
  from agents import storage  # pylint: disable=import-outside-toplevel
  return [name for _, _, names in os.walk(root) for name in names if storage.TEMPORARY.match(name)]


@pytest.fixture
def bucket(monkeypatch):
  """epath's gs:// backend on an in-memory filesystem (objects written whole; like a bucket, no append): no network."""
  # pylint: disable=import-outside-toplevel
  from etils.epath import backend as epath_backend
  from etils.epath import gpath as epath_gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeBucket(MemoryFileSystem):
    protocol = ('gs', 'gcs')
    root_marker = ''

    def _open(self, path, mode='rb', **kwargs):
      if 'a' in mode:
        raise OSError(f'a bucket cannot append to {path}')
      return super()._open(path, mode=mode, **kwargs)

  monkeypatch.setattr(epath_gpath, '_is_tf_installed', lambda: False)  # fsspec, not tf.io.gfile, for gs://.
  monkeypatch.setattr(FakeBucket, 'store', {})
  monkeypatch.setattr(FakeBucket, 'pseudo_dirs', [''])
  fs = FakeBucket(skip_instance_cache=True)
  monkeypatch.setattr(epath_backend.fsspec_backend, '_get_filesystem', lambda name: fs)
  return fs
