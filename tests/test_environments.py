"""The classification MDPs (section 4.1), the dataset loader, and every family's specs without an environment."""

import dataclasses
import gzip
import importlib.util
import os
import pickle
import socket
import time

import dm_env
import numpy as np
import pytest

import environments
from environments.registry import Registry
from environments import classification_mdp, datasets
from tests.conftest import RunsCode

SHARED_MNIST = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'mnist-10k.npz')


def _atari_roms() -> bool:
  """ale-py and its ROMs are installed (Pong's stands for them)."""
  if importlib.util.find_spec('ale_py') is None:
    return False
  from ale_py import roms
  return bool(roms.get_rom_path('pong'))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """No download, an empty cache, no data-dir variable: the embedded sample is the source."""
  monkeypatch.setenv(datasets.DOWNLOAD_ENV, '0')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.delenv(datasets.DATA_DIR_ENV, raising=False)


def small_mdp(variant: str, seed: int = 0, **kwargs) -> classification_mdp.ClassificationMDP:
  """An MDP over 100 images whose pixel (0, 0) stores the image's index, so observations identify images."""
  images = np.zeros((100, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0] = np.arange(100)
  labels = np.arange(100) % 10
  return classification_mdp.ClassificationMDP(images, labels, classification_mdp.VARIANTS[variant], seed=seed,
                                              **kwargs), labels


def rollout(env, policy, steps):
  """[(state, observed image index, action, reward, next state, timestep)] over `steps` steps."""
  env.reset()
  out = []
  for _ in range(steps):
    state, image = env.latent_state, env.last_image_index
    action = policy(state)
    timestep = env.step(action)
    out.append((state, image, action, timestep.reward, env.latent_state, timestep))
  return out


@pytest.mark.parametrize('variant', ['easy', 'hard', 'sparse'])
def test_observations_come_from_the_state_s_image_pool(variant):
  env, labels = small_mdp(variant, seed=3, episode_length=1000)
  emitted_by = env.emission_labels
  if variant == 'hard':
    assert not np.array_equal(emitted_by, labels)  # A random relabelling, not the classes.
  else:
    np.testing.assert_array_equal(emitted_by, labels)
  rng = np.random.default_rng(0)
  for state, image, _, _, _, _ in rollout(env, lambda s: int(rng.integers(10)), 500):
    assert emitted_by[image] == state


def test_hard_labelling_depends_on_label_seed_only():
  a, _ = small_mdp('hard', seed=0, label_seed=7)
  b, _ = small_mdp('hard', seed=99, label_seed=7)
  c, _ = small_mdp('hard', seed=0, label_seed=8)
  np.testing.assert_array_equal(a.emission_labels, b.emission_labels)
  assert not np.array_equal(a.emission_labels, c.emission_labels)


@pytest.mark.parametrize('variant', ['easy', 'hard'])
def test_dense_variants_reward_naming_the_state_and_jump_uniformly(variant):
  env, _ = small_mdp(variant, episode_length=10_000)
  rng = np.random.default_rng(1)
  steps = rollout(env, lambda s: s if rng.random() < 0.5 else int(rng.integers(10)), 5000)
  for state, _, action, reward, _, _ in steps:
    assert reward == float(action == state)
  next_states = np.array([s[4] for s in steps])
  counts = np.bincount(next_states, minlength=10)
  assert counts.min() > 400 and counts.max() < 600  # ~500 each under U{0..9}.
  # The next state ignores the action: correct and wrong answers lead to the same spread.
  correct = np.array([s[0] == s[2] for s in steps])
  assert abs(next_states[correct].mean() - next_states[~correct].mean()) < 0.5


def test_sparse_rewards_only_naming_state_9_and_walks_the_chain():
  env, _ = small_mdp('sparse', episode_length=10_000)
  rng = np.random.default_rng(2)
  steps = rollout(env, lambda s: s if rng.random() < 0.7 else int(rng.integers(10)), 5000)
  wrong_next = []
  for state, _, action, reward, next_state, _ in steps:
    assert reward == float(action == state == 9)
    if action == state:
      assert next_state == (state + 1) % 10  # After 9 the chain wraps to 0.
    else:
      wrong_next.append(next_state)
  counts = np.bincount(wrong_next, minlength=10)
  assert counts.min() > 0.6 * len(wrong_next) / 10
  # The optimal policy collects one reward per completed chain 0..9.
  steps = rollout(env, lambda s: s, 1000)
  assert sum(s[3] for s in steps) >= 99


def test_episodes_are_truncated_with_discount_one():
  env, _ = small_mdp('easy', seed=0, episode_length=5)
  timestep = env.reset()
  assert timestep.first()
  kinds = []
  for _ in range(12):
    timestep = env.step(0)
    kinds.append(timestep.step_type)
    if timestep.last():
      assert timestep.discount == 1.0
  assert kinds[4] == dm_env.StepType.LAST and kinds[5] == dm_env.StepType.FIRST
  assert kinds[10] == dm_env.StepType.LAST


def test_same_seed_same_stream():
  def stream(seed):
    env, _ = small_mdp('easy', seed=seed)
    return [(s[1], s[3]) for s in rollout(env, lambda s: 3, 200)]
  assert stream(5) == stream(5)
  assert stream(5) != stream(6)


@pytest.mark.parametrize('spec', [s for s in environments.valid_specs() if s.startswith('mdp:mnist:')])
def test_make_every_mnist_spec_with_the_embedded_digits(spec):
  env = environments.make(spec, seed=0)
  assert 'embedded' in env.data_source and '10000 images' in env.data_source
  assert env.observation_spec().shape == (28, 28, 1) and env.action_spec().num_values == 10
  timestep = env.reset()
  assert timestep.observation.shape == (28, 28, 1) and timestep.observation.dtype == np.uint8
  assert timestep.observation.max() > 100  # Real digits, not blanks.
  timestep = env.step(0)
  assert timestep.reward in (0.0, 1.0)


@pytest.mark.parametrize('spec, words', [
    ('mdp:mnist:medium', ['easy', 'hard', 'sparse']),
    ('mdp:svhn:easy', ['mnist']),
    ('mdp:mnist', ['mdp:mnist:easy']),
    ('gridworld:1', ['mdp', 'mdp:mnist:easy']),
])
def test_bad_specs_list_the_valid_ones(spec, words):
  with pytest.raises(ValueError, match='--env') as error:
    environments.make(spec)
  for word in words:
    assert word in str(error.value)


def test_data_dir_with_mnist_npz_and_idx_files(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
  labels = (np.arange(30) % 10).astype(np.uint8)
  npz_dir = tmp_path / 'npz'
  npz_dir.mkdir()
  np.savez(npz_dir / 'mnist.npz', x_train=images, y_train=labels, x_test=images[:5], y_test=labels[:5])
  env = environments.make('mdp:mnist:easy', data_dir=str(npz_dir))
  assert str(npz_dir) in env.data_source and '30 images' in env.data_source

  idx_dir = tmp_path / 'idx' / 'mnist'
  idx_dir.mkdir(parents=True)
  with gzip.open(idx_dir / 'train-images-idx3-ubyte.gz', 'wb') as f:
    f.write(b'\x00\x00\x08\x03' + b''.join(n.to_bytes(4, 'big') for n in (30, 28, 28)) + images.tobytes())
  with open(idx_dir / 'train-labels-idx1-ubyte', 'wb') as f:
    f.write(b'\x00\x00\x08\x01' + (30).to_bytes(4, 'big') + labels.tobytes())
  data = datasets.load('mnist', data_dir=str(tmp_path / 'idx'))
  np.testing.assert_array_equal(data.images[..., 0], images)
  np.testing.assert_array_equal(data.labels, labels)


def test_data_dir_without_the_files_says_where_it_looked_and_what_it_expected(tmp_path, monkeypatch):
  with pytest.raises(ValueError) as error:
    environments.make('mdp:mnist:easy', data_dir=str(tmp_path))
  assert str(tmp_path) in str(error.value) and 'mnist.npz' in str(error.value)
  assert 'train-images-idx3-ubyte' in str(error.value)
  monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / 'missing'))
  with pytest.raises(ValueError, match=datasets.DATA_DIR_ENV):
    environments.make('mdp:mnist:easy')
  (tmp_path / 'mnist.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not an mnist.npz'):
    environments.make('mdp:mnist:easy', data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.exists(SHARED_MNIST), reason='needs ../shared/data')
def test_cache_is_used_before_the_embedded_sample(tmp_path):
  cache = tmp_path / 'cache' / 'plasticity'
  cache.mkdir(parents=True)
  with np.load(SHARED_MNIST) as data:
    np.savez(cache / 'mnist.npz', **data)
  env = environments.make('mdp:mnist:easy')
  assert 'cache' in env.data_source and '8000 images' in env.data_source


def test_download_is_bounded_and_falls_back(monkeypatch):
  with socket.socket() as silent:  # Accepts connections on loopback and never answers.
    silent.bind(('127.0.0.1', 0))
    silent.listen(1)
    sources = Registry('dataset')
    sources.add('mnist', datasets.SOURCES['mnist']._replace(
        download_url=f'http://127.0.0.1:{silent.getsockname()[1]}/mnist.npz'))
    monkeypatch.setattr(datasets, 'SOURCES', sources)
    started = time.monotonic()
    data = datasets.load('mnist', download=True, download_timeout_s=1.0)
  assert time.monotonic() - started < 10
  assert 'embedded' in data.source and 'download failed' in data.source


def write_cifar10(directory, images_per_batch=20, corrupt=None, protocol=2, planted=None):
  """A small file set in the exact cifar-10-batches-py layout (pickled at protocol 2, as the real batches are);
  returns (images HWC, labels). `planted`: an object pickled into batch 2."""
  root = directory / 'cifar-10-batches-py'
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  all_images, all_labels = [], []
  for i in range(1, 6):
    images = rng.integers(0, 256, (images_per_batch, 32, 32, 3), dtype=np.uint8)
    labels = [int(x) for x in np.arange(images_per_batch) % 10]
    batch = {b'batch_label': f'training batch {i} of 5'.encode(), b'labels': labels,
             b'data': images.transpose(0, 3, 1, 2).reshape(images_per_batch, 3072), b'filenames': []}
    if planted is not None and i == 2:
      batch[b'filenames'] = planted
    with open(root / f'data_batch_{i}', 'wb') as f:
      if corrupt == i:
        f.write(b'garbage')
      else:
        pickle.dump(batch, f, protocol=protocol)
    all_images.append(images)
    all_labels.extend(labels)
  return np.concatenate(all_images), np.array(all_labels)


def test_cifar10_loader_reads_the_standard_layout(tmp_path):
  images, labels = write_cifar10(tmp_path)
  data = datasets.load('cifar10', data_dir=str(tmp_path))
  np.testing.assert_array_equal(data.images, images)  # Channels-first rows back to HWC images.
  np.testing.assert_array_equal(data.labels, labels)
  env = environments.make('mdp:cifar10:hard', seed=0, data_dir=str(tmp_path))
  assert env.observation_spec().shape == (32, 32, 3) and '100 images' in env.data_source
  timestep = env.reset()
  assert timestep.observation.shape == (32, 32, 3) and timestep.observation.dtype == np.uint8
  assert any(np.array_equal(timestep.observation, image) for image in images)


def test_cifar10_missing_or_malformed_files_are_clear_errors(tmp_path):
  with pytest.raises(ValueError) as error:
    environments.make('mdp:cifar10:easy', data_dir=str(tmp_path))
  assert str(tmp_path) in str(error.value) and 'data_batch_1' in str(error.value)
  with pytest.raises(ValueError, match='No cifar10 data found'):
    environments.make('mdp:cifar10:easy')  # No data dir, empty cache, no download, no embedded sample.
  write_cifar10(tmp_path / 'bad', corrupt=3)
  with pytest.raises(ValueError, match='data_batch_3 is not a CIFAR-10 python batch'):
    datasets.load('cifar10', data_dir=str(tmp_path / 'bad'))
  write_cifar10(tmp_path / 'partial')
  os.remove(tmp_path / 'partial' / 'cifar-10-batches-py' / 'data_batch_5')
  with pytest.raises(ValueError, match='data_batch_5'):
    datasets.load('cifar10', data_dir=str(tmp_path / 'partial'))


def test_cifar10_batches_are_read_as_arrays_only_and_a_planted_payload_runs_no_code(tmp_path):
  for protocol in (2, pickle.HIGHEST_PROTOCOL):  # The real batches' protocol, and what Python writes today.
    images, labels = write_cifar10(tmp_path / f'protocol{protocol}', protocol=protocol)
    data = datasets.load('cifar10', data_dir=str(tmp_path / f'protocol{protocol}'))
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
  marker = str(tmp_path / 'code_ran')
  write_cifar10(tmp_path / 'planted', planted=RunsCode(marker))
  with pytest.raises(ValueError, match=r'data_batch_2 is not a CIFAR-10 python batch.*it names io\.open'):
    datasets.load('cifar10', data_dir=str(tmp_path / 'planted'))
  assert not os.path.exists(marker)


def test_every_family_declares_what_the_launcher_asks_of_it():
  """Options it takes, a preset that exists, and environments that say what data they use."""
  from launch import flags as run_flags
  from probes.records.run_dir import ExperimentConfig, LaunchConfig
  fields = {field.name for config in (ExperimentConfig, LaunchConfig) for field in dataclasses.fields(config)}
  for name in environments.FAMILIES:
    family = environments.FAMILIES[name]
    assert family.preset in run_flags.PRESETS, name
    assert set(family.options) <= fields, name  # Each option is a field of the run's configuration.
    spec = next(s for s in family.valid_specs() if 'cifar10' not in s)  # CIFAR-10 is not on this machine.
    env = environments.make(spec, seed=0)
    assert isinstance(env.data_source, str) and env.data_source, name
  assert environments.families_taking('sticky_action_probability') == ['atari']
  assert environments.families_taking('data_dir') == ['mdp']
  with pytest.raises(ValueError, match='--env=lunar:lander; families: atari, mdp'):
    environments.make('lunar:lander')


MDP_SPECS = [s for s in environments.valid_specs() if s.startswith('mdp:')]
ATARI_SPECS = ['atari:pong'] if _atari_roms() else []


@pytest.mark.parametrize('spec', MDP_SPECS + ATARI_SPECS)
def test_the_specs_without_building_are_the_built_environments(spec, tmp_path, monkeypatch):
  """What `launch.program.graph.environment_specs` gives the learner and the evaluator, without reading a dataset:
  the built environment's (on the embedded MNIST digits, on a CIFAR-10 file set) whatever the data dir holds."""
  assert {s.rpartition(':')[0] for s in MDP_SPECS} == {f'mdp:{name}' for name in datasets.SOURCES}
  assert len(MDP_SPECS) == len(datasets.SOURCES) * len(classification_mdp.VARIANTS)
  options = {}
  if 'cifar10' in spec:
    write_cifar10(tmp_path / 'cifar10')
    options['data_dir'] = str(tmp_path / 'cifar10')
  env = environments.make(spec, seed=0, **options)
  built = (env.observation_spec(), env.action_spec().num_values)

  def refused(*args, **kwargs):
    raise AssertionError('specs loaded the dataset')

  monkeypatch.setattr(datasets, 'load', refused)
  (tmp_path / 'empty').mkdir()
  no_data = [{}, {'data_dir': str(tmp_path / 'missing')}, {'data_dir': str(tmp_path / 'empty')}]
  for given in no_data if spec.startswith('mdp:') else [{}, {'sticky_action_probability': 0.25}]:
    observation, num_actions = environments.specs(spec, **given)
    assert observation == built[0], given  # Shape, dtype, bounds and name.
    assert (observation.shape, observation.dtype, num_actions) == (built[0].shape, built[0].dtype, built[1]), given


def test_every_family_declares_its_specs_and_one_that_does_not_is_built(monkeypatch):
  assert all(environments.FAMILIES[name].specs is not None for name in environments.FAMILIES)
  with pytest.raises(ValueError, match='valid specs'):
    environments.specs('mdp:mnist:medium')
  families = Registry('environment family', '--env')
  families.add('mdp', environments.FAMILIES['mdp']._replace(specs=None))
  monkeypatch.setattr(environments, 'FAMILIES', families)
  observation, num_actions = environments.specs('mdp:mnist:easy')  # The embedded digits, loaded.
  assert observation.shape == datasets.MNIST_SHAPE and num_actions == classification_mdp.NUM_STATES
