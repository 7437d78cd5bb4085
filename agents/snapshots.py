"""Parameter snapshots at chosen learner steps, kept as files until whoever measures them is done.

The learner writes one at each step its measurer asked for (the evaluator's
probe points), so a point outlives the measuring process: a restarted or
relaunched evaluator finds the points it has not yet measured on disk. Each
file is written whole (`storage.write_atomically`: a relaunched learner
repeating a step replaces it whole) and removed by its reader once measured.
"""

import os
import pickle
import re
from typing import List, Tuple

import jax
import numpy as np

from agents import storage
from agents.types import Params

_PATTERN = re.compile(r'^(\d+)\.pkl$')


def path_for(directory: str, step: int) -> str:
  """The snapshot of learner step `step` in `directory`."""
  return os.path.join(directory, f'{int(step):09d}.pkl')


def save(directory: str, step: int, params: Params, target_params: Params) -> str:
  """Writes (step, parameters, target parameters) as host numpy arrays; the path written."""
  params, target_params = jax.tree_util.tree_map(np.asarray, jax.device_get((params, target_params)))
  path = path_for(directory, step)
  storage.write_atomically(path, pickle.dumps({'step': int(step), 'params': params, 'target_params': target_params},
                                              protocol=pickle.HIGHEST_PROTOCOL))
  return path


def saved(directory: str) -> List[Tuple[int, str]]:
  """(step, path) of every snapshot in `directory`, by step."""
  folder = storage.path(directory)
  if not folder.is_dir():
    return []
  return sorted((int(m.group(1)), os.path.join(directory, child.name))
                for child in folder.iterdir() if (m := _PATTERN.match(child.name)))


def load(path: str) -> Tuple[int, Params, Params]:
  """(step, parameters, target parameters) of a snapshot file."""
  payload = pickle.loads(storage.path(path).read_bytes())
  return int(payload['step']), payload['params'], payload['target_params']


def remove(path: str) -> None:
  """Removes a snapshot once measured (or skipped); one already gone is no error."""
  storage.path(path).unlink(missing_ok=True)
