"""Image datasets behind the classification MDPs, found without surprises.

`load(name, data_dir=None)` looks, in order, in:
  1. `data_dir` (the `data_dir=` option / `--data_dir` flag): strict, a
     directory without the expected files is an error saying where it looked
     and what it expected;
  2. `$PLASTICITY_DATA_DIR`: strict in the same way;
  3. the user cache, `$XDG_CACHE_HOME/plasticity` (default `~/.cache/plasticity`);
  4. a download into that cache, where the machine has a network: bounded by
     `DOWNLOAD_TIMEOUT_S` in total, never hanging; `PLASTICITY_DOWNLOAD=0`
     (or `download=False`) skips it;
  5. the small real sample the repo embeds (`environments/data/`), if the
     dataset has one (MNIST: 10,000 digits).
The returned `Dataset.source` says which, and runs log it.
"""

import gzip
import os
import pickle
import socket
import tarfile
import tempfile
import time
import urllib.request
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from environments.registry import Registry

DATA_DIR_ENV = 'PLASTICITY_DATA_DIR'
DOWNLOAD_ENV = 'PLASTICITY_DOWNLOAD'
DOWNLOAD_TIMEOUT_S = 120.0
EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), 'data')

Arrays = Tuple[np.ndarray, np.ndarray]  # images uint8 [N, H, W, C], labels int64 [N]


class Dataset(NamedTuple):
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int64 [N]
  source: str  # Where it came from, for logs.


class DatasetSource(NamedTuple):
  # What a directory must hold, in words, for the error messages.
  expected: str
  # Reads the dataset from a directory: None when its files are absent, a
  # ValueError when they are present but malformed (images of another shape than `image_shape` among them).
  read: Callable[[str], Optional[Arrays]]
  # Every image's [H, W, C]: what an environment over the dataset observes, known without reading it.
  image_shape: Tuple[int, int, int]
  # URL of a file `read` understands once saved under `download_name`, if any.
  download_url: Optional[str] = None
  download_name: Optional[str] = None
  # Unpacks the downloaded file into the cache (archive path, cache dir), if it is an archive.
  unpack: Optional[Callable[[str, str], None]] = None
  # A file of the embedded sample, read with `read_embedded`, if any.
  embedded: Optional[str] = None
  read_embedded: Optional[Callable[[str], Arrays]] = None


def cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'plasticity')


# ---------------------------------------------------------------- MNIST

MNIST_SHAPE = (28, 28, 1)


def _read_mnist_npz(path: str, splits: Tuple[str, ...] = ('train',)) -> Arrays:
  try:
    with np.load(path) as data:
      images = np.concatenate([data[f'x_{split}'] for split in splits])
      labels = np.concatenate([data[f'y_{split}'] for split in splits])
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f'{path} is not an mnist.npz file (expected arrays x_train, y_train): {e}') from e
  if images.ndim != 3 or images.shape[1:] != MNIST_SHAPE[:2] or len(images) != len(labels):
    raise ValueError(f'{path}: x_train has shape {images.shape} and y_train {labels.shape}; '
                     f'expected [N, 28, 28] and [N].')
  return images[..., None].astype(np.uint8), labels.astype(np.int64)


def _open_maybe_gzip(path: str):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (the original MNIST format), gzipped or not."""
  with _open_maybe_gzip(path) as f:
    header = f.read(4)
    if len(header) != 4 or header[:2] != b'\x00\x00' or header[2] != 0x08:
      raise ValueError(f'{path} is not an IDX file of unsigned bytes (bad magic number {header!r}).')
    ndim = header[3]
    shape = tuple(int.from_bytes(f.read(4), 'big') for _ in range(ndim))
    data = np.frombuffer(f.read(), dtype=np.uint8)
  if data.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says shape {shape} but holds {data.size} values.')
  return data.reshape(shape)


def _find(directory: str, names: List[str]) -> Optional[str]:
  for name in names:
    for candidate in (os.path.join(directory, name), os.path.join(directory, 'mnist', name)):
      if os.path.isfile(candidate):
        return candidate
  return None


def read_mnist(directory: str) -> Optional[Arrays]:
  """The training split (60,000 digits) from `mnist.npz` or the IDX files, in `directory` or `directory/mnist`."""
  npz = _find(directory, ['mnist.npz'])
  if npz:
    return _read_mnist_npz(npz)
  images_path = _find(directory, ['train-images-idx3-ubyte', 'train-images-idx3-ubyte.gz', 'train-images.idx3-ubyte'])
  labels_path = _find(directory, ['train-labels-idx1-ubyte', 'train-labels-idx1-ubyte.gz', 'train-labels.idx1-ubyte'])
  if not images_path or not labels_path:
    return None
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or len(images) != len(labels):
    raise ValueError(f'{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not match.')
  if images.shape[1:] != MNIST_SHAPE[:2]:
    raise ValueError(f'{images_path} holds images of {images.shape[1:]} pixels; MNIST\'s are {MNIST_SHAPE[:2]}.')
  return images[..., None], labels.astype(np.int64)


# ---------------------------------------------------------------- CIFAR-10

CIFAR10_DIR = 'cifar-10-batches-py'
CIFAR10_SHAPE = (32, 32, 3)
CIFAR10_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))


class _ArraysOnly(pickle.Unpickler):
  """Unpickles numpy arrays and builtin values, nothing else: a pickle can call any function it names, and the
  CIFAR-10 batches are pickles from wherever the data directory was filled."""

  ALLOWED = {
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'), ('numpy', 'ndarray'),
      ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),  # Protocol 5's arrays.
      ('_codecs', 'encode'),  # How Python 3 pickles bytes at protocol 2.
      *(('builtins', name) for name in ('set', 'frozenset', 'bytearray', 'complex', 'slice')),
      *(('__builtin__', name) for name in ('set', 'frozenset', 'bytearray', 'complex', 'slice')),  # Python 2's.
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f'it names {module}.{name}, which is neither a numpy array nor a builtin value '
                                   f'(refused: a pickle can run any function it names)')
    return super().find_class(module, name)


def _read_cifar10_batch(path: str) -> Arrays:
  try:
    with open(path, 'rb') as f:
      batch = _ArraysOnly(f, encoding='bytes').load()
    data, labels = np.asarray(batch[b'data'], dtype=np.uint8), np.asarray(batch[b'labels'], dtype=np.int64)
  except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path} is not a CIFAR-10 python batch (a pickled dict with b"data" uint8 [N, 3072] and '
                     f'b"labels"): {e!r}') from e
  if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
    raise ValueError(f'{path}: b"data" has shape {data.shape} and b"labels" {labels.shape}; expected [N, 3072] '
                     f'(3 x 32 x 32, channels first) and [N].')
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar10(directory: str) -> Optional[Arrays]:
  """The 50,000 training images from the pickled batches, in `directory/cifar-10-batches-py/` or `directory`."""
  for candidate in (os.path.join(directory, CIFAR10_DIR), directory):
    if os.path.isfile(os.path.join(candidate, CIFAR10_BATCHES[0])):
      missing = [name for name in CIFAR10_BATCHES if not os.path.isfile(os.path.join(candidate, name))]
      if missing:
        raise ValueError(f'{candidate} holds {CIFAR10_BATCHES[0]} but not {", ".join(missing)}.')
      parts = [_read_cifar10_batch(os.path.join(candidate, name)) for name in CIFAR10_BATCHES]
      return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  return None


def _extract_cifar10(archive: str, cache: str) -> None:
  with tarfile.open(archive, 'r:gz') as tar:
    members = [m for m in tar.getmembers() if m.name.startswith(CIFAR10_DIR + '/') and m.isfile()]
    tar.extractall(cache, members=members)


SOURCES: Registry = Registry('dataset', '--env=mdp:<dataset>:<variant>')
SOURCES.add(
    'mnist', DatasetSource(
        expected='mnist.npz (arrays x_train, y_train) or the IDX files train-images-idx3-ubyte[.gz] and '
        'train-labels-idx1-ubyte[.gz], directly or in a mnist/ subdirectory',
        read=read_mnist, image_shape=MNIST_SHAPE,
        download_url='https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz',
        download_name='mnist.npz',
        # The sample is small: the MDPs use both of its splits.
        embedded='mnist-10k.npz', read_embedded=lambda path: _read_mnist_npz(path, ('train', 'test'))))
SOURCES.add(
    'cifar10', DatasetSource(
        expected=f'the CIFAR-10 python batches {CIFAR10_DIR}/data_batch_1..5 (pickled dicts with b"data" and '
        f'b"labels"), in {CIFAR10_DIR}/ or directly',
        read=read_cifar10, image_shape=CIFAR10_SHAPE,
        download_url='https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        download_name='cifar-10-python.tar.gz', unpack=_extract_cifar10))


def _download(url: str, destination: str, timeout_s: float) -> None:
  """Fetches `url` to `destination` atomically, giving up after `timeout_s` seconds."""
  deadline = time.monotonic() + timeout_s
  os.makedirs(os.path.dirname(destination), exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=os.path.dirname(destination), suffix='.partial')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=min(10.0, timeout_s)) as response:
      while chunk := response.read(1 << 16):
        if time.monotonic() > deadline:
          raise TimeoutError(f'download of {url} took longer than {timeout_s:.0f}s')
        out.write(chunk)
    os.replace(partial, destination)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _download_enabled(download: Optional[bool]) -> bool:
  if download is not None:
    return download
  return os.environ.get(DOWNLOAD_ENV, '1').lower() not in ('0', 'false', 'no', '')


def _from_dir(name: str, source: DatasetSource, directory: str, origin: str) -> Dataset:
  if not os.path.isdir(directory):
    raise ValueError(f'{origin}={directory} is not a directory; it should hold {name}: {source.expected}.')
  arrays = source.read(directory)
  if arrays is None:
    raise ValueError(f'{origin}={directory} does not hold {name}: looked in {directory} for {source.expected}.')
  return Dataset(*arrays, source=f'{name} from {directory} ({len(arrays[1])} images)')


def load(name: str, data_dir: Optional[str] = None, download: Optional[bool] = None,
         download_timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Dataset:
  """Loads a dataset's training split (see the module docstring for where from)."""
  source = SOURCES.get(name)
  if data_dir:
    return _from_dir(name, source, data_dir, '--data_dir')
  if os.environ.get(DATA_DIR_ENV):
    return _from_dir(name, source, os.environ[DATA_DIR_ENV], f'${DATA_DIR_ENV}')
  cache = cache_dir()
  arrays = source.read(cache) if os.path.isdir(cache) else None
  if arrays is not None:
    return Dataset(*arrays, source=f'{name} from the cache {cache} ({len(arrays[1])} images)')
  failure = 'download disabled'
  if source.download_url and _download_enabled(download):
    try:
      downloaded = os.path.join(cache, source.download_name)
      _download(source.download_url, downloaded, download_timeout_s)
      if source.unpack:
        source.unpack(downloaded, cache)
        os.remove(downloaded)
      arrays = source.read(cache)
      if arrays is not None:
        return Dataset(*arrays, source=f'{name} downloaded to {cache} ({len(arrays[1])} images)')
    except (OSError, ValueError, socket.timeout, tarfile.TarError) as e:  # urllib's errors are OSErrors.
      failure = f'download failed: {e}'
  if source.embedded:
    path = os.path.join(EMBEDDED_DIR, source.embedded)
    images, labels = source.read_embedded(path)
    return Dataset(images, labels, source=f'{name}: the embedded sample {path} ({len(labels)} images; '
                   f'no data dir, nothing in {cache}, {failure})')
  raise ValueError(f'No {name} data found: pass --data_dir (or set ${DATA_DIR_ENV}) to a directory holding '
                   f'{source.expected}, or put those files in {cache} ({failure}).')

