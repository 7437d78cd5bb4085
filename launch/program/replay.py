"""The Reverb replay service: tables, its node (with checkpoints), the actors' writer, the readers.

Two tables share every inserted transition (Reverb stores the data once):
  * `replay`: uniform sampling, FIFO removal, a SampleToInsertRatio rate
    limiter; the learner's only source of batches.
  * `probe`: the same transitions behind a MinSize(1) limiter, so that the
    evaluator's samples of probe inputs never count against the learner's
    samples-per-insert ratio.
"""

import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

from absl import logging
import dm_env
from launchpad import address as lp_address
from launchpad.launch import worker_manager
from launchpad.nodes.reverb import node as reverb_node
import numpy as np
import reverb
import tensorflow as tf
import tree

from agents import storage
from agents.config import ReplayConfig
from agents.prefetch import Prefetcher
from agents.types import StopRequested, Transition
from launch.program import network
from probes.measures import probe_set
from probes.records.run_dir import RunLayout, report_problem, reporting_full_disk

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


class ReplayNode(network.OnHost, reverb_node.ReverbNode):
  """Launchpad's Reverb node, with Reverb's checkpoints of both tables in `layout.replay_checkpoint`, its address
  on the run's `--bind_host` (`.on_host(...)`).

  At its start the server restores the latest checkpoint there (data and the
  rate limiter's counters: sampling goes on where it stopped, each actor insert
  freeing samples_per_insert more; no refill from `min_size`). It checkpoints
  every `every_minutes` and once more at a clean stop (Launchpad's node does
  not), writing the replay's status file for the launcher; beside Reverb's
  `DONE` in each checkpoint it writes `checksums.json`, the sha256 of each of
  its files, checked at the next start. A checkpoint whose data fails to load
  (a checksum that does not match, or Reverb cannot read it) is moved aside
  (`<root>.damaged-<time>`, a problem record for the launcher) and the replay
  starts empty; any other start-up error (the port taken, memory) fails the
  node, its checkpoint kept. Reverb keeps one checkpoint and deletes anything
  else in the root.
  """

  def __init__(self, tables_fn: Callable[[], List[reverb.Table]], layout: RunLayout, every_minutes: float):
    super().__init__(tables_fn)
    self._layout = layout
    self._root = layout.replay_checkpoint
    self._every_minutes = every_minutes
    self._state: Dict[str, object] = {}

  def _status(self, **status) -> None:
    """Updates the status file: what was restored at the start stays in it."""
    self._state = {**self._state, **status, 'time': time.time()}
    storage.write_atomically(self._layout.replay_status, json.dumps(self._state).encode())

  def _checkpointer(self) -> Optional[reverb.checkpointers.DefaultCheckpointer]:
    return reverb.checkpointers.DefaultCheckpointer(path=self._root) if self._every_minutes else None

  def _server(self, port: int) -> reverb.Server:
    """The server, restored from the latest checkpoint unless its data fails to load (see the class docstring)."""
    latest = _latest_checkpoint(self._root) if self._every_minutes else ''
    problem = latest and damage(latest)
    if problem:
      self._move_aside(problem)
    try:
      return reverb.Server(self._priority_tables_fn(), port=port, checkpointer=self._checkpointer())
    except (RuntimeError, ValueError) as e:
      if problem or not latest or self._loads():  # Not the checkpoint's data: the port, or anything else.
        raise
      self._move_aside(f'The replay checkpoint {latest} does not load ({type(e).__name__}: {e}).')
      return reverb.Server(self._priority_tables_fn(), port=port, checkpointer=self._checkpointer())

  def _loads(self) -> bool:
    """Whether the latest checkpoint loads, in a server of its own on a free port: what tells its data from the
    other errors of a start (a port taken meanwhile)."""
    try:
      trial = reverb.Server(self._priority_tables_fn(), port=None, checkpointer=self._checkpointer())
    except (RuntimeError, ValueError):
      return False
    trial.stop()
    return True

  def _move_aside(self, problem: str) -> None:
    report_problem(self._layout, 'replay', self._root, problem,
                   f'Moved to {storage.move_aside(self._root)}; the replay starts empty.')
    storage.path(self._root).mkdir(parents=True, exist_ok=True)

  def _checkpoint(self, client: reverb.Client) -> str:
    """Reverb's checkpoint of both tables, then its checksums; its path."""
    path = client.checkpoint()
    files = {child.name: storage.file_checksum(child) for child in storage.path(path).iterdir()
             if child.name != CHECKSUMS}
    storage.write_atomically(os.path.join(path, CHECKSUMS), json.dumps({'sha256': files}, indent=1).encode())
    return path

  def run(self) -> None:
    with reporting_full_disk(self._layout, 'replay'):  # A full disk: the launcher names it.
      self._run()

  def _run(self) -> None:
    storage.path(self._root).mkdir(parents=True, exist_ok=True)
    address = self._address.resolve()
    _server = self._server(lp_address.get_port_from_address(address))  # Held: it serves while this thread runs.
    restored_from = _latest_checkpoint(self._root)
    client = reverb.Client(address)  # Not `server.localhost_client()`: the server is on --bind_host only.
    sizes = _sizes(client)
    if restored_from and any(sizes.values()):
      logging.info('Replay restored %s from %s', sizes, restored_from)
      self._status(restored_items=sizes, restored_from=restored_from)
    else:
      self._status(restored_items={})
    if not self._every_minutes:
      worker_manager.wait_for_stop()
      return
    while not worker_manager.wait_for_stop(self._every_minutes * 60):
      self._checkpoint(client)
    self._status(state='writing the replay checkpoint', items=_sizes(client))
    start = time.time()
    path = self._checkpoint(client)
    self._status(state='replay checkpoint written', path=path, items=_sizes(client), seconds=time.time() - start)


CHECKSUMS = 'checksums.json'  # In each Reverb checkpoint directory, beside Reverb's DONE: {'sha256': {file: hex}}.


def _sizes(client: reverb.Client) -> Dict[str, int]:
  return {name: info.current_size for name, info in client.server_info().items()}


def _latest_checkpoint(root: str) -> str:
  """The checkpoint Reverb restores: the last-sorting directory holding DONE ('' if none)."""
  if not storage.path(root).is_dir():
    return ''
  done = sorted(child.name for child in storage.path(root).iterdir() if (child / 'DONE').exists())
  return os.path.join(root, done[-1]) if done else ''


def damage(checkpoint: str) -> str:
  """What is wrong with a Reverb checkpoint's files by its checksums ('': nothing, or one written before them)."""
  marker = storage.path(checkpoint, CHECKSUMS)
  if not marker.exists():
    return ''
  try:
    files = json.loads(marker.read_text())['sha256']
    names = [name for name in files if os.path.basename(name) == name]
  except (ValueError, KeyError, TypeError, AttributeError):
    return f'The replay checkpoint {checkpoint} is damaged: {CHECKSUMS} is not readable.'
  for name in names:
    location = storage.path(checkpoint, name)
    if not location.exists() or storage.file_checksum(location) != files[name]:
      return f'The replay checkpoint {checkpoint} is damaged: {name} does not match its checksum.'
  return ''


class ReverbSink:
  """The actor's `add(Transition)`: one item per transition in both tables.

  Inserts block while the rate limiter holds them back (the learner is behind)
  or the replay does not answer (Reverb's writer reconnects to its address by
  itself: a partition, a replay restarted in place); the wait is sliced so that
  a stop request (`should_stop`) ends it, which a thread under `local_mt` needs
  to be able to exit. Given `address` (the replay's current address: an
  attached actor's, re-read from addresses.json), an insert that has waited
  `recheck_s` asks it, and when the replay has moved (a relaunch listens on
  new ports) the sink writes there with a new writer: the transitions the old
  one still held unacknowledged (at most `max_in_flight_items`) are lost.
  """

  def __init__(self, client: reverb.Client, should_stop: Callable[[], bool] = lambda: False,
               max_in_flight_items: int = 8, poll_ms: int = 500, address: Optional[Callable[[], str]] = None,
               recheck_s: float = 5.0):
    self._client = client
    self._writer = client.trajectory_writer(num_keep_alive_refs=1)
    self._should_stop = should_stop
    self._max_in_flight_items = max_in_flight_items
    self._poll_ms = poll_ms
    self._address = address
    self._recheck_s = recheck_s

  def _append(self, transition: Transition) -> None:
    self._writer.append(transition._asdict())
    item = tree.map_structure(lambda column: column[-1], self._writer.history)
    self._writer.create_item(REPLAY_TABLE, 1.0, item)
    self._writer.create_item(PROBE_TABLE, 1.0, item)

  def __call__(self, transition: Transition) -> None:
    self._append(transition)
    since = time.monotonic()
    while True:
      try:
        self._writer.flush(self._max_in_flight_items, timeout_ms=self._poll_ms)
        return
      except reverb.errors.DeadlineExceededError:
        if self._should_stop():
          return
      if self._address and time.monotonic() - since >= self._recheck_s:
        since = time.monotonic()
        address = self._address()
        if address != self._client.server_address:
          logging.info('The replay moved from %s to %s: inserting there.', self._client.server_address, address)
          self._writer.close()
          self._client = reverb.Client(address)
          self._writer = self._client.trajectory_writer(num_keep_alive_refs=1)
          self._append(transition)

  def close(self, timeout_ms: int = 5000) -> None:
    """Flushes what is in flight (`close` alone drops it), then closes."""
    try:
      self._writer.flush(timeout_ms=timeout_ms)
    except reverb.errors.DeadlineExceededError:
      pass  # The rate limiter holds it back: the learner has stopped sampling.
    self._writer.close()


# Learner batches drawn from the replay in one sample: tf.data's Python side costs the same per sample whatever
# its size, and holds the GIL the learner's thread needs.
BATCHES_PER_SAMPLE = 4


def _dataset(server_address: str, table: str, batch_size: int, timeout_ms: int = -1) -> tf.data.Dataset:
  return reverb.TrajectoryDataset.from_table_signature(
      server_address=server_address, table=table, max_in_flight_samples_per_worker=2 * batch_size,
      rate_limiter_timeout_ms=timeout_ms).batch(batch_size, drop_remainder=True)


class ReplayUnavailable(RuntimeError):
  """The replay server no longer answers."""


def batch_iterator(server_address: str, batch_size: int, should_stop: Callable[[], bool] = lambda: False,
                   poll_seconds: float = 1.0, answer_timeout_s: int = 2, dead_after_s: float = 30.0,
                   prefetch: int = 2) -> Prefetcher:
  """The learner's batches, as `Transition`s of device arrays, `prefetch` fetched ahead (two calls' worth for a
  learner fusing updates); ends once `should_stop()`.

  One dataset for the whole run, waiting on the rate limiter as long as it
  holds samples back (each timeout used to drop the samples in flight and
  build a new dataset). While no batch comes, every `poll_seconds` a stop
  request ends the iteration, and the replay is asked for its `server_info`:
  one that has not answered (within `answer_timeout_s`) for `dead_after_s`
  raises `agents.prefetch.SourceFailed` naming it (a sampler blocked on a dead
  server would wait for ever; a live one can take seconds to answer while it
  writes a checkpoint).
  """
  client = reverb.Client(server_address)
  silent_since = None  # When the replay stopped answering.

  def check_alive() -> None:
    nonlocal silent_since
    try:
      client.server_info(timeout=answer_timeout_s)
      silent_since = None
    except (reverb.errors.DeadlineExceededError, RuntimeError) as e:
      silent_since = silent_since or time.monotonic()
      if time.monotonic() - silent_since >= dead_after_s:
        raise ReplayUnavailable(f'the replay at {server_address} does not answer (for '
                                f'{time.monotonic() - silent_since:.0f} s: {e})') from e

  def samples():
    try:
      for sample in _dataset(server_address, REPLAY_TABLE, batch_size * BATCHES_PER_SAMPLE).as_numpy_iterator():
        whole = Transition(**sample.data)
        for start in range(0, batch_size * BATCHES_PER_SAMPLE, batch_size):
          yield Transition(*(field[start:start + batch_size] for field in whole))
    except RuntimeError as e:  # The sampling stream cut (a killed server resets it before a poll sees it silent).
      try:
        client.server_info(timeout=answer_timeout_s)
      except (reverb.errors.DeadlineExceededError, RuntimeError):
        raise ReplayUnavailable(f'the replay at {server_address} does not answer ({e})') from e
      raise

  return Prefetcher(samples(), size=prefetch, should_stop=should_stop, check_alive=check_alive,
                    poll_seconds=poll_seconds)


class ReverbSource:
  """The probe sets' source (probes.measures.probe_set.ReplaySource): the `probe` table of a live replay."""

  def __init__(self, server_address: str, poll_seconds: float = 0.5, oversampling: int = 8):
    self._server_address = server_address
    self._poll_seconds = poll_seconds
    self._oversampling = oversampling

  def _size(self) -> Tuple[int, int]:
    """(items, capacity) of the probe table; a replay that does not answer within a poll is a stopping one."""
    try:
      info = reverb.Client(self._server_address).server_info(timeout=max(int(self._poll_seconds), 1))[PROBE_TABLE]
    except (reverb.errors.DeadlineExceededError, RuntimeError) as e:
      raise StopRequested(f'the replay at {self._server_address} does not answer ({e})') from e
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
