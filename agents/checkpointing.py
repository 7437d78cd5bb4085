"""Atomic, self-describing checkpoints of pytrees (numpy leaves, pickled).

Pickle of host numpy arrays keeps checkpoints loadable without the process
that wrote them (the offline probe, a resumed run). Writes go to a temporary
file first, are fsynced, then renamed, so a crash never leaves a half-written
checkpoint; one that is damaged all the same (a full disk, a foreign file) is
reported by name and skipped for the one before it (`latest_loadable`).
"""

import os
import pickle
import re
from typing import Any, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

_PATTERN = re.compile(r'^learner_(\d+)\.pkl$')


def path_for(directory: str, step: int) -> str:
  """The checkpoint of learner step `step` in `directory`."""
  return os.path.join(directory, f'learner_{step:09d}.pkl')


def save(directory: str, step: int, tree: Any, keep: int = 3) -> str:
  os.makedirs(directory, exist_ok=True)
  path = path_for(directory, step)
  tmp_path = path + '.tmp'
  with open(tmp_path, 'wb') as f:
    pickle.dump({'step': int(step), 'state': jax.tree_util.tree_map(np.asarray, jax.device_get(tree))}, f,
                protocol=pickle.HIGHEST_PROTOCOL)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp_path, path)
  for old in sorted(_checkpoints(directory))[:-keep]:
    os.remove(os.path.join(directory, old[1]))
  return path


def _checkpoints(directory: str):
  if not os.path.isdir(directory):
    return []
  return [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _PATTERN.match(name))]


def latest(directory: str) -> Optional[str]:
  found = sorted(_checkpoints(directory))
  return os.path.join(directory, found[-1][1]) if found else None


class CheckpointError(ValueError):
  """A file in the checkpoint directory that is not a readable checkpoint."""


def load(path: str) -> Tuple[int, Any]:
  """(step, state) of a checkpoint; a CheckpointError naming the file if it is damaged or foreign."""
  try:
    with open(path, 'rb') as f:
      payload = pickle.load(f)
    return int(payload['step']), payload['state']
  except Exception as e:  # pylint: disable=broad-except  Unpickling raises anything a damaged file makes it.
    raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__}: {e}).') from e


def latest_loadable(directory: str) -> Tuple[Optional[str], Optional[Tuple[int, Any]], List[str]]:
  """(path, (step, state)) of the newest checkpoint that loads, and the messages of the newer ones that did not."""
  problems = []
  for _, name in sorted(_checkpoints(directory), reverse=True):
    path = os.path.join(directory, name)
    try:
      return path, load(path), problems
    except CheckpointError as e:
      logging.warning('%s Using the checkpoint before it.', e)
      problems.append(str(e))
  return None, None, problems
