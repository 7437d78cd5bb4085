"""Parameter snapshots at chosen learner steps, kept as files until whoever measures them is done.

The learner writes one at each step its measurer asked for (the evaluator's
probe points), so a point outlives the measuring process: a restarted or
relaunched evaluator finds the points it has not yet measured on disk. Each
file is a checkpoint (`agents/checkpointing.py`: msgpack, with a checksum),
written whole (`storage.write_atomically`: a relaunched learner repeating a
step replaces it whole) and removed by its reader once measured.
"""

import os
from typing import Any, List, Tuple

from agents import checkpointing, storage
from agents.types import Params

PREFIX = ''  # A snapshot's file name: <step>.msgpack.


def path_for(directory: str, step: int) -> str:
  """The snapshot of learner step `step` in `directory`."""
  return checkpointing.path_for(directory, step, PREFIX)


def save(directory: str, step: int, params: Params, target_params: Params) -> str:
  """Writes (step, parameters, target parameters) as a checkpoint is; the path written."""
  return checkpointing.write(directory, step, {'params': params, 'target_params': target_params}, PREFIX)


def saved(directory: str) -> List[Tuple[int, str]]:
  """(step, path) of every snapshot in `directory`, by step."""
  return [(step, os.path.join(directory, name)) for step, name in checkpointing.numbered(directory, PREFIX)]


def pickled(directory: str) -> List[str]:
  """The snapshots of an earlier version (pickled), which are never read (`launch.migrate` converts them)."""
  return [os.path.join(directory, name)
          for _, name in checkpointing.numbered(directory, PREFIX, checkpointing.PICKLED_SUFFIX)]


def load(path: str, params_template: Any = None) -> Tuple[int, Params, Params]:
  """(step, parameters, target parameters) of a snapshot file; both checked against `params_template` if given.
  A `checkpointing.CheckpointError` naming the file if it is damaged, planted or of other parameters."""
  template = None if params_template is None else {'params': params_template, 'target_params': params_template}
  step, state = checkpointing.load(path, template)
  if template is None and (not isinstance(state, dict) or set(state) != {'params', 'target_params'}):
    raise checkpointing.CheckpointError(f'{path} is not a parameter snapshot (it holds {type(state).__name__}).')
  return step, state['params'], state['target_params']


def remove(path: str) -> None:
  """Removes a snapshot once measured (or skipped); one already gone is no error."""
  storage.path(path).unlink(missing_ok=True)
