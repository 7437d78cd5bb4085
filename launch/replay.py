"""The Reverb replay service: tables, the actors' writer, the readers.

Two tables share every inserted transition (Reverb stores the data once):
  * `replay`: uniform sampling, FIFO removal, a SampleToInsertRatio rate
    limiter; the learner's only source of batches.
  * `probe`: the same transitions behind a MinSize(1) limiter, so that the
    evaluator's samples of probe inputs never count against the learner's
    samples-per-insert ratio.
"""

import time
from typing import Callable, Iterator, List, Tuple

import dm_env
import numpy as np
import reverb
import tensorflow as tf
import tree

from agents.config import ReplayConfig
from agents.types import Transition
from probes import probe_set

REPLAY_TABLE = 'replay'
PROBE_TABLE = 'probe'


def transition_signature(observation_spec: dm_env.specs.Array) -> Transition:
  obs = tf.TensorSpec(observation_spec.shape, tf.as_dtype(observation_spec.dtype))
  scalar = lambda dtype: tf.TensorSpec([], dtype)
  return Transition(observation=obs, action=scalar(tf.int32), reward=scalar(tf.float32),
                    discount=scalar(tf.float32), next_observation=obs)


def make_tables(config: ReplayConfig, observation_spec: dm_env.specs.Array) -> List[reverb.Table]:
  signature = transition_signature(observation_spec)._asdict()
  error_buffer = max(config.min_size * config.samples_per_insert * config.samples_per_insert_tolerance,
                     2 * config.samples_per_insert)
  replay = reverb.Table(
      name=REPLAY_TABLE, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(),
      max_size=config.capacity, signature=signature,
      rate_limiter=reverb.rate_limiters.SampleToInsertRatio(
          samples_per_insert=config.samples_per_insert, min_size_to_sample=config.min_size,
          error_buffer=error_buffer))
  probe = reverb.Table(
      name=PROBE_TABLE, sampler=reverb.selectors.Uniform(), remover=reverb.selectors.Fifo(),
      max_size=config.capacity, signature=signature, rate_limiter=reverb.rate_limiters.MinSize(1))
  return [replay, probe]


class ReverbSink:
  """The actor's `add(Transition)`: one item per transition in both tables.

  Inserts block while the rate limiter holds them back (the learner is behind);
  the wait is sliced so that a stop request (`should_stop`) ends it, which a
  thread under `local_mt` needs to be able to exit.
  """

  def __init__(self, client: reverb.Client, should_stop: Callable[[], bool] = lambda: False,
               max_in_flight_items: int = 8, poll_ms: int = 500):
    self._writer = client.trajectory_writer(num_keep_alive_refs=1)
    self._should_stop = should_stop
    self._max_in_flight_items = max_in_flight_items
    self._poll_ms = poll_ms

  def __call__(self, transition: Transition) -> None:
    self._writer.append(transition._asdict())
    item = tree.map_structure(lambda column: column[-1], self._writer.history)
    self._writer.create_item(REPLAY_TABLE, 1.0, item)
    self._writer.create_item(PROBE_TABLE, 1.0, item)
    while True:
      try:
        self._writer.flush(self._max_in_flight_items, timeout_ms=self._poll_ms)
        return
      except reverb.errors.DeadlineExceededError:
        if self._should_stop():
          return

  def close(self) -> None:
    self._writer.close()


def _dataset(server_address: str, table: str, batch_size: int, timeout_ms: int = -1) -> tf.data.Dataset:
  return reverb.TrajectoryDataset.from_table_signature(
      server_address=server_address, table=table, max_in_flight_samples_per_worker=2 * batch_size,
      rate_limiter_timeout_ms=timeout_ms).batch(batch_size, drop_remainder=True)


def batch_iterator(server_address: str, batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                   poll_ms: int = 1000) -> Iterator[Transition]:
  """The learner's batches, as numpy `Transition`s; ends once `should_stop()`.

  A sample the rate limiter holds back for `poll_ms` ends the dataset; the
  iterator then checks for a stop request and, if none, opens a new one.
  """
  while not should_stop():
    dataset = _dataset(server_address, REPLAY_TABLE, batch_size, timeout_ms=poll_ms).prefetch(2)
    for sample in dataset.as_numpy_iterator():
      yield Transition(**sample.data)


class ReverbSource:
  """The probe sets' source (probes.probe_set.ReplaySource): the `probe` table of a live replay."""

  def __init__(self, server_address: str, poll_seconds: float = 0.5, oversampling: int = 8):
    self._server_address = server_address
    self._poll_seconds = poll_seconds
    self._oversampling = oversampling

  def _size(self) -> Tuple[int, int]:
    info = reverb.Client(self._server_address).server_info()[PROBE_TABLE]
    return info.current_size, info.max_size

  def distinct_observations(self, num: int, give_up: Callable[[], bool],
                            should_stop: Callable[[], bool] = lambda: False) -> np.ndarray:
    """Up to `num` observations distinct by content, drawn uniformly from the replay.

    Waits until the replay holds `num` items (or is full), unless `give_up()`
    first, so that an early probe does not fit the same few observations; then
    samples until `num` distinct ones are found or `oversampling` times the
    table's size has been drawn (after 8 n draws from n items, each item has
    been missed with probability e^-8). A stop request ends it with nothing.
    """
    size, capacity = self._size()
    while size < min(num, capacity) and not give_up():
      time.sleep(self._poll_seconds)
      size, capacity = self._size()
    if size == 0 or should_stop():
      return np.zeros((0,))
    batch = min(num, size)
    found, drawn = None, 0
    for sample in _dataset(self._server_address, PROBE_TABLE, batch).as_numpy_iterator():
      observations = sample.data['observation']
      found = probe_set.distinct(observations if found is None else np.concatenate([found, observations]), num)
      drawn += batch
      if len(found) >= num or drawn >= self._oversampling * size or should_stop():
        return found
    raise RuntimeError('The replay\'s probe table stopped answering.')

  def transitions(self, num: int) -> Transition:
    sample = next(_dataset(self._server_address, PROBE_TABLE, num).take(1).as_numpy_iterator())
    return Transition(**sample.data)
