"""The probe set: what every probe point of a run measures on, fixed for the whole run.

A probe point should differ from the others only in the parameters it probes.
So the inputs of the plasticity probe (distinct observations, by content: MNIST
images and Atari start frames repeat in a replay), the key from which its
target functions are drawn, and the replay transitions of the TD-gradient
covariance are drawn once, at the run's first probe point, saved in the run
directory, and reused at every later point, by attached evaluators and by
`probes.run`. (`ProbeConfig.fresh_inputs` draws a new set at every point.)

Drawing waits for the replay to hold the inputs asked for, but gives up when
told to (a stop request, the learner's end): a set then holds what there was,
and `num_unique_inputs` in each probe record says so.
"""

import hashlib
import io
import zipfile
import zlib
from typing import Callable, Dict, NamedTuple, Optional, Protocol

import jax
import numpy as np

from agents import storage
from agents.types import Transition


class ProbeSet(NamedTuple):
  inputs: np.ndarray  # [n, ...] observations, distinct by content.
  target_key: np.ndarray  # uint32 [2]: the probe's key; every target's initialisation derives from it.
  transitions: Optional[Transition]  # [k] replay transitions for the TD-gradient covariance.
  learner_step: int  # The probe point it was drawn at.
  replaced: Optional[str] = None  # The damaged set's file this one was drawn to replace (moved there), if any.

  @property
  def num_unique_inputs(self) -> int:
    return int(len(self.inputs))


class Damaged(ValueError):
  """A file that is not a whole probe set: not a zip (cut short), a bad CRC, a checksum mismatch, arrays missing."""


class ReplaySource(Protocol):
  """Where probe sets come from: the live replay (launch.program.replay.ReverbSource) or arrays (`ArraySource`)."""

  def distinct_observations(self, num: int, give_up: Callable[[], bool],
                            should_stop: Callable[[], bool]) -> np.ndarray:
    """Up to `num` observations distinct by content: waits for `num` unless `give_up()`; none if `should_stop()`."""

  def transitions(self, num: int) -> Transition:
    """`num` transitions (numpy, leading axis `num`)."""


def distinct(observations: np.ndarray, limit: Optional[int] = None) -> np.ndarray:
  """The observations distinct by content, in the order first met, at most `limit` of them."""
  if len(observations) == 0:
    return observations
  _, first = np.unique(observations.reshape(len(observations), -1), axis=0, return_index=True)
  return observations[np.sort(first)][:limit]


class ArraySource:
  """A replay source over arrays held in memory: tests, and `probes.run` on a checkpoint."""

  def __init__(self, transitions: Transition):
    self._transitions = transitions

  def distinct_observations(self, num: int, give_up: Callable[[], bool] = lambda: True,
                            should_stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    del give_up, should_stop  # Everything there will ever be is here already, at once.
    return distinct(np.asarray(self._transitions.observation), num)

  def transitions(self, num: int) -> Transition:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[:num], self._transitions)


def draw(source: ReplaySource, num_inputs: int, num_transitions: int, key: np.ndarray, learner_step: int,
         give_up: Callable[[], bool] = lambda: False,
         should_stop: Callable[[], bool] = lambda: False) -> Optional[ProbeSet]:
  """A new probe set; None when the replay held no observation, or on a stop request (a stopping run's
  replay is no sample to keep for the whole run)."""
  inputs = source.distinct_observations(num_inputs, give_up, should_stop)
  if len(inputs) == 0 or should_stop():
    return None
  transitions = source.transitions(num_transitions) if num_transitions > 0 else None
  return ProbeSet(inputs, np.asarray(key, np.uint32), transitions, int(learner_step))


CHECKSUM = 'sha256'  # The array of a saved set that holds the checksum of the others.


def save(path: str, probe_set: ProbeSet) -> ProbeSet:
  """Publishes the set at `path` unless one is there already; returns the set that is there.

  First writer wins (`storage.write_if_absent`): of two evaluators drawing at
  once, both end up using the first one's (on a bucket, both use what is
  there when they read it back; see agents/storage.py for the window). The
  file is an `.npz` whose `sha256` array is the checksum of the others
  (`_checksum`), verified by `load`.
  """
  arrays = {'inputs': probe_set.inputs, 'target_key': probe_set.target_key,
            'learner_step': np.asarray(probe_set.learner_step)}
  if probe_set.transitions is not None:
    arrays.update({f'transition_{name}': np.asarray(value) for name, value in probe_set.transitions._asdict().items()})
  if probe_set.replaced is not None:
    arrays['replaced'] = np.asarray(probe_set.replaced)
  arrays[CHECKSUM] = np.asarray(_checksum(arrays))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  if storage.write_if_absent(path, buffer.getvalue()) and storage.is_local(path):
    return probe_set
  return load(path)


def _checksum(arrays: Dict[str, np.ndarray]) -> str:
  """The sha256 of a probe set's arrays (their names, dtypes, shapes and bytes), but the checksum's own."""
  digest = hashlib.sha256()
  for name in sorted(set(arrays) - {CHECKSUM}):
    array = np.ascontiguousarray(arrays[name])
    digest.update(f'{name}:{array.dtype.str}:{array.shape}:'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def load(path: str) -> ProbeSet:
  """Reads a saved probe set; `Damaged` naming the file if it is not a whole one (a set saved before sets carried
  a checksum is read unchecked: its zip's CRCs alone catch damage). Reads arrays only (no pickles)."""
  try:
    with np.load(io.BytesIO(storage.path(path).read_bytes()), allow_pickle=False) as saved:
      arrays = {name: saved[name] for name in saved.files}
  except FileNotFoundError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise Damaged(f'{path} is not a readable probe set ({type(e).__name__}: {e}).') from e
  missing = {'inputs', 'target_key', 'learner_step'} - set(arrays)
  if missing:
    raise Damaged(f'{path} is not a probe set: it lacks {", ".join(sorted(missing))}.')
  if CHECKSUM in arrays and str(arrays[CHECKSUM]) != _checksum(arrays):
    raise Damaged(f'{path} is damaged: its arrays do not match its checksum.')
  transitions = None
  if 'transition_action' in arrays:
    transitions = Transition(**{name: arrays[f'transition_{name}'] for name in Transition._fields})
  return ProbeSet(arrays['inputs'], arrays['target_key'].astype(np.uint32), transitions,
                  int(arrays['learner_step']), str(arrays['replaced']) if 'replaced' in arrays else None)
