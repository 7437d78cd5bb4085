"""Checkpoints of pytrees: msgpack files of arrays and nothing that runs, each with a checksum of its content.

A file is one msgpack map (`encode`): `format`, `version`, the learner
`step`, the `sha256` of the payload, and the `payload`: the tree as
`flax.serialization` writes it (nested maps of arrays, a NamedTuple's fields
by name). Reading it decodes maps, arrays and numbers, never code or classes.
The checksum is verified before anything else: damage that would still decode
(zeros in an array's bytes) is refused, by name, like a file cut short
(`Damaged`). The tree's structure comes from a template that the code builds
(a fresh training state, optax's NamedTuples included; `jax.eval_shape` of
one serves, so that a reader that only checks need not compute), never from
the file, and the file's shapes and dtypes must be the template's; without a
template, a tree comes back as the nested dicts it is (a snapshot's haiku
parameters).

Each file is written all or nothing (`storage.write_atomically`: a fsynced
temporary file renamed into place, or one object upload on a bucket), so a
crash never leaves a half-written checkpoint; one that is damaged all the
same, or planted, is reported by name and skipped for the one before it
(`latest_loadable`).

Checkpoints of an earlier version, pickles (`.pkl`, which run any code they
name when read) or states of fewer fields, are never read here: a pickle is
listed and named in a problem, a state of another structure refused by name,
each message naming `launch.migrate`, which converts them.
"""

import os
import re
from typing import Any, List, Optional, Tuple

from absl import logging
from flax import serialization
import jax
import msgpack
import numpy as np

from agents import storage

PREFIX = 'learner_'  # A checkpoint's file name: learner_<step>.msgpack.
SUFFIX = '.msgpack'
PICKLED_SUFFIX = '.pkl'  # Checkpoints of an earlier version, before this format.
FORMAT = 'plasticity-rl tree'
VERSION = 1
# Rewrites a run directory of an earlier version in this version's layout (launch/migrate.py); named by every message
# about such a file, in every layer.
MIGRATE_COMMAND = 'python -m launch.migrate'


class CheckpointError(ValueError):
  """A file in a checkpoint directory that is not a readable checkpoint (of this configuration)."""


class Damaged(CheckpointError):
  """A file that is not a whole checkpoint: its content does not match its checksum, or does not decode."""


class Pickled(CheckpointError):
  """A pickled checkpoint (an earlier version's format), never read here."""


def path_for(directory: str, step: int, prefix: str = PREFIX, suffix: str = SUFFIX) -> str:
  """The file of learner step `step` in `directory` (a checkpoint; other step-numbered files by their prefix)."""
  return os.path.join(directory, f'{prefix}{int(step):09d}{suffix}')


def encode(step: int, tree: Any) -> bytes:
  """A checkpoint file's bytes: `tree` (arrays, nested dicts, lists, tuples, NamedTuples) at learner step `step`."""
  state = serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, jax.device_get(tree)))
  payload = serialization.msgpack_serialize(state)
  return msgpack.packb({'format': FORMAT, 'version': VERSION, 'step': int(step), 'sha256': storage.checksum(payload),
                        'payload': payload}, use_bin_type=True)


def decode(data: bytes, location: str, template: Any = None) -> Tuple[int, Any]:
  """(step, tree) of a checkpoint file's bytes, the tree in `template`'s structure if given (see the module's
  docstring); `Damaged` or `CheckpointError` naming `location` if it is not a whole checkpoint of that structure."""
  try:
    header = msgpack.unpackb(data, raw=False)  # No ext_hook: nothing but maps, strings, numbers and bytes.
  except Exception as e:  # pylint: disable=broad-except  msgpack raises many kinds on bytes that are not msgpack.
    raise Damaged(f'{location} is not a readable checkpoint ({type(e).__name__}: {e}).') from e
  if not isinstance(header, dict) or header.get('format') != FORMAT or not isinstance(header.get('version'), int):
    raise Damaged(f'{location} is not a readable checkpoint (not a {FORMAT} file).')
  if header['version'] != VERSION:
    raise CheckpointError(f'{location} is a checkpoint of format version {header.get("version")!r}, not '
                          f'{VERSION}: written by another version of this code.')
  payload, step = header.get('payload'), header.get('step')
  if not isinstance(payload, bytes) or storage.checksum(payload) != header.get('sha256'):
    raise Damaged(f'{location} is damaged: its content does not match its checksum.')
  if not isinstance(step, int):
    raise Damaged(f'{location} is not a readable checkpoint (its step is {step!r}).')
  try:
    state = serialization.msgpack_restore(payload)
  except Exception as e:  # pylint: disable=broad-except
    raise Damaged(f'{location} is not a readable checkpoint ({type(e).__name__}: {e}).') from e
  return step, state if template is None else restore(state, template, location)


def restore(state: Any, template: Any, location: str) -> Any:
  """A decoded state dict in `template`'s structure, its shapes and dtypes checked against it."""
  try:
    tree = serialization.from_state_dict(template, state)
  except Exception as e:  # pylint: disable=broad-except  flax raises ValueError, KeyError, AttributeError, ...
    raise CheckpointError(_other_shape(location, f'{type(e).__name__}: {e}')) from e
  if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(template):
    raise CheckpointError(_other_shape(location, 'its tree differs'))
  for (key, leaf), expected in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree_util.tree_leaves(template)):
    shape = tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)
    dtype = leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype
    if shape != tuple(expected.shape) or dtype != expected.dtype:
      raise CheckpointError(_other_shape(location, f'{jax.tree_util.keystr(key)} is {dtype}{list(shape)}, not '
                                                   f'{expected.dtype}{list(expected.shape)}'))
  return tree


def _other_shape(location: str, detail: str) -> str:
  return (f'{location} holds a training state of another shape than this configuration builds ({detail}): written '
          f'by another version of the optimizer or network, or not by this run (an earlier version\'s run directory: '
          f'`{MIGRATE_COMMAND} RUN_DIR` converts it).')


def write(directory: str, step: int, tree: Any, prefix: str = PREFIX) -> str:
  """`tree` at learner step `step`, written all or nothing; the path written."""
  path = path_for(directory, step, prefix)
  storage.write_atomically(path, encode(step, tree))
  return path


def save(directory: str, step: int, tree: Any, keep: int = 3) -> str:
  """A checkpoint, then the older ones past the last `keep` removed (files of later steps, not this run's, are
  neither counted nor removed)."""
  path = write(directory, step, tree)
  for _, old in [found for found in numbered(directory) if found[0] <= step][:-keep]:
    storage.path(directory, old).unlink(missing_ok=True)
  return path


def numbered(directory: str, prefix: str = PREFIX, suffix: str = SUFFIX) -> List[Tuple[int, str]]:
  """(step, file name) of the step-numbered files of `prefix` and `suffix` in `directory`, by step."""
  folder = storage.path(directory)
  if not folder.is_dir():
    return []
  pattern = re.compile(rf'^{re.escape(prefix)}(\d+){re.escape(suffix)}$')
  return sorted((int(m.group(1)), child.name) for child in folder.iterdir() if (m := pattern.match(child.name)))


def latest(directory: str) -> Optional[str]:
  found = numbered(directory)
  return os.path.join(directory, found[-1][1]) if found else None


def load(path: str, template: Any = None) -> Tuple[int, Any]:
  """(step, tree) of a checkpoint (see `decode`); a CheckpointError naming the file if it is damaged, foreign,
  of another structure or pickled (a file that is gone is not: FileNotFoundError)."""
  if path.endswith(PICKLED_SUFFIX):
    raise Pickled(f'{path} is a pickled checkpoint (an earlier version\'s format), not read: a pickle runs any code '
                  f'it names. If everyone who could write {os.path.dirname(path) or "."} is trusted, '
                  f'`{MIGRATE_COMMAND} --trust_pickled_checkpoints RUN_DIR` converts it; otherwise remove it.')
  return decode(storage.path(path).read_bytes(), path, template)


def latest_loadable(directory: str, template: Any = None) -> Tuple[Optional[str], Optional[Tuple[int, Any]], List[str]]:
  """(path, (step, tree)) of the newest checkpoint that loads into `template`, and the messages of the newer files
  that did not (damaged, planted, of another structure, pickled)."""
  found = numbered(directory) + numbered(directory, suffix=PICKLED_SUFFIX)
  problems = []
  for _, name in sorted(found, key=lambda item: (item[0], item[1].endswith(SUFFIX)), reverse=True):
    path = os.path.join(directory, name)
    try:
      return path, load(path, template), problems
    except (CheckpointError, FileNotFoundError) as e:  # FileNotFoundError: removed since it was listed.
      logging.warning('%s Using the checkpoint before it.', e)
      problems.append(str(e))
  return None, None, problems
