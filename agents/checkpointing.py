"""Atomic, self-describing checkpoints of pytrees (numpy leaves, pickled).

Pickle of host numpy arrays keeps checkpoints loadable without the process
that wrote them (the offline probe, a resumed run). Writes go to a temporary
file first and are renamed, so a crash never leaves a half-written checkpoint.
"""

import os
import pickle
import re
from typing import Any, Optional, Tuple

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


def load(path: str) -> Tuple[int, Any]:
  with open(path, 'rb') as f:
    payload = pickle.load(f)
  return payload['step'], payload['state']
