"""Atomic, self-describing checkpoints of pytrees (numpy leaves, pickled).

Pickle of host numpy arrays keeps checkpoints loadable without the process
that wrote them (the offline probe, a resumed run). Each is written all or
nothing (`storage.write_atomically`: a fsynced temporary file renamed into
place, or one object upload on a bucket), so a crash never leaves a
half-written checkpoint; one that is damaged all the same (a full disk, a
foreign file) is reported by name and skipped for the one before it
(`latest_loadable`).
"""

import os
import pickle
import re
from typing import Any, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from agents import storage

PREFIX = 'learner_'  # A checkpoint's file name: learner_<step>.pkl.


def path_for(directory: str, step: int, prefix: str = PREFIX) -> str:
  """The file of learner step `step` in `directory` (a checkpoint; other step-numbered files by their prefix)."""
  return os.path.join(directory, f'{prefix}{int(step):09d}.pkl')


def write(directory: str, step: int, tree: Any, prefix: str = PREFIX) -> str:
  """`tree` at learner step `step` as host numpy arrays, written all or nothing; the path written."""
  path = path_for(directory, step, prefix)
  state = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  storage.write_atomically(path, pickle.dumps({'step': int(step), 'state': state}, protocol=pickle.HIGHEST_PROTOCOL))
  return path


def save(directory: str, step: int, tree: Any, keep: int = 3) -> str:
  """A checkpoint, the older ones past the last `keep` removed."""
  path = write(directory, step, tree)
  for _, old in numbered(directory)[:-keep]:
    storage.path(directory, old).unlink()
  return path


def numbered(directory: str, prefix: str = PREFIX) -> List[Tuple[int, str]]:
  """(step, file name) of the step-numbered files of `prefix` in `directory`, by step."""
  folder = storage.path(directory)
  if not folder.is_dir():
    return []
  pattern = re.compile(rf'^{re.escape(prefix)}(\d+)\.pkl$')
  return sorted((int(m.group(1)), child.name) for child in folder.iterdir() if (m := pattern.match(child.name)))


def latest(directory: str) -> Optional[str]:
  found = numbered(directory)
  return os.path.join(directory, found[-1][1]) if found else None


class CheckpointError(ValueError):
  """A file in the checkpoint directory that is not a readable checkpoint."""


def load(path: str) -> Tuple[int, Any]:
  """(step, state) of a checkpoint; a CheckpointError naming the file if it is damaged or foreign (a file that is
  gone is not: FileNotFoundError)."""
  try:
    payload = pickle.loads(storage.path(path).read_bytes())
    return int(payload['step']), payload['state']
  except FileNotFoundError:
    raise
  except Exception as e:  # pylint: disable=broad-except  Unpickling raises anything a damaged file makes it.
    raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}).') from e


def latest_loadable(directory: str) -> Tuple[Optional[str], Optional[Tuple[int, Any]], List[str]]:
  """(path, (step, state)) of the newest checkpoint that loads, and the messages of the newer ones that did not."""
  problems = []
  for _, name in reversed(numbered(directory)):
    path = os.path.join(directory, name)
    try:
      return path, load(path), problems
    except (CheckpointError, FileNotFoundError) as e:  # Damaged, or removed since it was listed.
      logging.warning('%s Using the checkpoint before it.', e)
      problems.append(str(e))
  return None, None, problems
