"""The learner's input pipeline: batches fetched and put on the device while the previous update runs.

A background thread drains a long-lived batch source (a Reverb dataset in a
run, a list in a test) into a bounded queue, each batch already transferred
(`jax.device_put`), so the learner's `next` takes a ready device batch. The
source may block for as long as it likes (a replay's rate limiter holds
samples back: it is never re-created on a timeout, and no sampled item is
dropped); the learner's side waits in short polls, ending the iteration on a
stop request and raising when the source says it is dead.
"""

import queue
import threading
import time
from typing import Any, Callable, Iterator

import jax


class SourceFailed(RuntimeError):
  """The batch source raised, or its liveness check says it is gone."""


_END = object()  # The source is exhausted.


class Prefetcher:
  """An iterator over `source`'s batches, in order, `size` of them fetched ahead and transferred.

  `should_stop()` is read at every poll that finds no batch (each `poll_seconds`):
  a stop request ends the iteration (StopIteration) even while the source is
  blocked. `check_alive()`, called at the same polls, raises if the source is
  gone (a replay that no longer answers); the error is re-raised as
  `SourceFailed` unless a stop was requested meanwhile. `wait_seconds` is the
  time `next` spent waiting for a batch: the learner's input-bound time.
  """

  def __init__(self, source: Iterator[Any], size: int = 2, transfer: Callable[[Any], Any] = jax.device_put,
               should_stop: Callable[[], bool] = lambda: False, check_alive: Callable[[], None] = lambda: None,
               poll_seconds: float = 1.0):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._should_stop = should_stop
    self._check_alive = check_alive
    self._poll_seconds = poll_seconds
    self._closed = threading.Event()
    self.wait_seconds = 0.0
    # A daemon: it may stay blocked inside a source whose server died, which must not keep a process alive.
    self._thread = threading.Thread(target=self._fill, args=(source, transfer), daemon=True, name='prefetch')
    self._thread.start()

  def _fill(self, source: Iterator[Any], transfer: Callable[[Any], Any]) -> None:
    try:
      for batch in source:
        if not self._put(transfer(batch)):
          return
      self._put(_END)
    except Exception as e:  # pylint: disable=broad-except  Handed to the consumer, which raises it.
      self._put(e)

  def _put(self, item: Any) -> bool:
    """Queues `item` unless the consumer is gone (closed), which also ends the thread's hold on the source."""
    while not self._closed.is_set():
      try:
        self._queue.put(item, timeout=self._poll_seconds)
        return True
      except queue.Full:
        pass
    return False

  @property
  def thread_id(self) -> int:
    """The filling thread's id in the OS (for a profile of where the CPU goes)."""
    return self._thread.native_id

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    start = time.monotonic()
    try:
      while True:
        if self._closed.is_set():
          raise StopIteration
        try:
          item = self._queue.get(timeout=self._poll_seconds)
          break
        except queue.Empty:
          pass
        if self._should_stop():
          self.close()
          raise StopIteration
        try:
          self._check_alive()
        except Exception as e:  # pylint: disable=broad-except
          self.close()
          if self._should_stop():  # The source went down with the rest of a stopping program.
            raise StopIteration from None
          raise SourceFailed(str(e)) from e
    finally:
      self.wait_seconds += time.monotonic() - start
    if item is _END:
      self.close()
      raise StopIteration
    if isinstance(item, Exception):
      self.close()
      raise SourceFailed(f'the batch source failed: {item!r}') from item
    return item

  def close(self) -> None:
    """Lets the thread go (at its next batch); later `next` calls end the iteration."""
    self._closed.set()
