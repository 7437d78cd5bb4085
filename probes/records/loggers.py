"""Run-directory loggers: one JSON line per record, mirrored to TensorBoard, one file per writer.

Each writing process has JSONL file(s) of its own (`RunLayout.logger`), so
nothing needs two processes appending to one file, which a bucket cannot do:

- on a local path, `<writer>.jsonl`, each record appended whole as it comes
  (a crash loses nothing logged); a line left torn (a kill or a full disk
  mid-write) is ended before the next record, which starts a line of its
  own instead of being glued onto the fragment;
- on a bucket (no append), numbered objects `<writer>.<n>.jsonl`, each
  rewritten whole with everything written to it so far, at most every
  `FLUSH_SECONDS` (a bucket takes about one write a second per object), once
  more when it is full (past `SEGMENT_BYTES`: the next is begun) and at
  `close` or exit (a failed upload is retried at the next); a writer that
  starts again (a relaunch) begins past the numbers already there, never
  overwriting them. Cost: each flush uploads its segment whole, at most
  `SEGMENT_BYTES` per `FLUSH_SECONDS` per writer; a killed writer loses the
  records of its last `FLUSH_SECONDS`.

`read_jsonl(path)` reads a writer's file (and its numbered segments, in
order), skipping a torn line (with a warning, once, unless it is the last: a
write in progress); `merge` interleaves several writers' records into one
stream.

A non-finite number (a diverged run) is written as null, and the record's
`nonfinite` list names the keys that held one: JSON has no NaN, and a stand-in
such as 1e308 would pass for a measurement.
"""

import atexit
import heapq
import json
import math
import os
import re
import threading
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from absl import logging

from agents import storage

FLUSH_SECONDS = 5.0
SEGMENT_BYTES = 1 << 20
Record = Dict[str, Any]


def format_number(value, spec: str = '.2f') -> str:
  """A recorded number for people: `value` formatted, or what a null (a non-finite number, or none) stands for."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return 'non-finite'
  return format(value, spec)


def _jsonable(value: Any) -> Any:
  if hasattr(value, 'tolist'):  # numpy and JAX scalars and arrays.
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _has_nonfinite(value: Any) -> bool:
  if hasattr(value, 'tolist'):
    value = value.tolist()
  if isinstance(value, float):
    return not math.isfinite(value)
  if isinstance(value, dict):
    return any(_has_nonfinite(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return any(_has_nonfinite(v) for v in value)
  return False


class _AppendSink:
  """A local file opened with O_APPEND, each line appended whole; a line left torn (by a killed writer, or by a
  write that failed part-way) is ended first, so that the next record is a line of its own."""

  def __init__(self, path: str):
    self._path = path
    try:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
      size = os.fstat(self._fd).st_size
      self._torn = size > 0 and os.pread(self._fd, 1, size - 1) != b'\n'
    except OSError as e:
      raise storage.WriteError(path, e) from e

  def write(self, line: bytes) -> None:
    data = memoryview((b'\n' if self._torn else b'') + line)
    self._torn = True  # Until the whole line is written.
    try:
      while data:
        data = data[os.write(self._fd, data):]
    except OSError as e:
      raise storage.WriteError(self._path, e) from e
    self._torn = False

  def close(self) -> None:
    os.close(self._fd)


class _SegmentSink:
  """Numbered objects `<stem>.<n>.jsonl`, each rewritten whole: a writer's records where there is no append."""

  def __init__(self, path: str, flush_seconds: float, segment_bytes: int):
    self._stem = path[:-len('.jsonl')]
    self._segment_bytes = segment_bytes
    self._index = max(segments(path), default=-1) + 1
    self._lines: List[bytes] = []
    self._size = 0
    self._dirty = False
    self._lock = threading.Lock()
    self._closed = threading.Event()
    self._flusher = threading.Thread(target=self._flush_every, args=(flush_seconds,), daemon=True)
    self._flusher.start()
    atexit.register(self.close)

  def segment(self, index: int) -> str:
    return f'{self._stem}.{index:06d}.jsonl'

  def write(self, line: bytes) -> None:
    with self._lock:
      if self._lines and self._size + len(line) > self._segment_bytes:
        self._flush()
        if not self._dirty:  # Written whole: begin the next. (Unwritten, it grows until a flush succeeds.)
          self._index, self._lines, self._size = self._index + 1, [], 0
      self._lines.append(line)
      self._size += len(line)
      self._dirty = True

  def _flush(self, last: bool = False) -> None:
    """Uploads the current segment whole; a failure is logged and retried at the next flush (raised at the
    `last`), nothing dropped."""
    if not self._dirty:
      return
    try:
      storage.write_atomically(self.segment(self._index), b''.join(self._lines))
      self._dirty = False
    except Exception as e:  # pylint: disable=broad-except  Any filesystem error: keep the records, try again.
      if last:
        raise
      logging.warning('Could not write %s (%r); retrying at the next flush.', self.segment(self._index), e)

  def _flush_every(self, seconds: float) -> None:
    while not self._closed.wait(seconds):
      with self._lock:
        self._flush()

  def close(self) -> None:
    if self._closed.is_set():
      return
    self._closed.set()
    self._flusher.join()
    atexit.unregister(self.close)
    with self._lock:
      self._flush(last=True)


class JsonlLogger:
  """Writes records to the JSONL file at `path` (this writer's own), adding a wall-clock time.

  `append` (default: whether `path` is local) chooses between appending and
  numbered segments (see the module's docstring). With a `tensorboard_dir`
  the numeric scalars of each record also go there, against `step_key`.
  """

  def __init__(self, path: str, tensorboard_dir: Optional[str] = None, step_key: str = 'learner_step',
               extra: Optional[Dict[str, Any]] = None, append: Optional[bool] = None,
               flush_seconds: float = FLUSH_SECONDS, segment_bytes: int = SEGMENT_BYTES):
    if not path.endswith('.jsonl'):
      raise ValueError(f'A record file ends with .jsonl, not {path}.')
    self.path = path
    append = storage.is_local(path) if append is None else append
    if append and not storage.is_local(path):
      raise ValueError(f'{path} is not on a local filesystem: it cannot be appended to.')
    self._sink = _AppendSink(path) if append else _SegmentSink(path, flush_seconds, segment_bytes)
    self._step_key = step_key
    self._extra = extra or {}
    self._summary_writer = None
    if tensorboard_dir:
      import tensorflow as tf  # Only the TensorBoard writer needs TF here.
      self._tf = tf
      self._summary_writer = tf.summary.create_file_writer(tensorboard_dir)

  def __call__(self, record: Record) -> None:
    record = {**self._extra, **record, 'time': time.time()}
    nonfinite = sorted(key for key, value in record.items() if _has_nonfinite(value))
    record = _jsonable(record)
    if nonfinite:
      record['nonfinite'] = nonfinite
    self._sink.write((json.dumps(record) + '\n').encode())
    if self._summary_writer is not None and self._step_key in record:
      with self._summary_writer.as_default(step=int(record[self._step_key])):
        for key, value in record.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ('time', self._step_key):
            self._tf.summary.scalar(key, value)
      self._summary_writer.flush()

  def close(self) -> None:
    self._sink.close()
    if self._summary_writer is not None:
      self._summary_writer.close()


_SEGMENT = re.compile(r'^(?P<writer>.+?)(\.(?P<index>\d+))?\.jsonl$')


def segments(path: str) -> List[int]:
  """The numbers of the segments `<stem>.<n>.jsonl` written for the record file `path`."""
  directory = storage.path(path).parent
  if not directory.is_dir():
    return []
  writer = os.path.basename(path)[:-len('.jsonl')]
  found = (_SEGMENT.match(child.name) for child in directory.iterdir())
  return sorted(int(m['index']) for m in found if m and m['index'] is not None and m['writer'] == writer)


def writers(directory: str) -> List[str]:
  """The record files (`<writer>.jsonl`, whether appended or segmented) in `directory`, by name."""
  folder = storage.path(directory)
  if not folder.is_dir():
    return []
  names = {m['writer'] for child in folder.iterdir() if (m := _SEGMENT.match(child.name))}
  return [os.path.join(directory, f'{name}.jsonl') for name in sorted(names)]


def read_jsonl(path: str) -> List[Record]:
  """A writer's records: the file at `path`, then its numbered segments in order; a truncated last line (a
  crash mid-write) is skipped, and a file not yet written has no records."""
  stem = path[:-len('.jsonl')] if path.endswith('.jsonl') else None
  files = [path] + ([f'{stem}.{index:06d}.jsonl' for index in segments(path)] if stem else [])
  return [record for file in files if storage.path(file).exists() for record in iter_jsonl(file)]


_WARNED_TORN = set()  # (file, line number) of the torn lines this process has warned about.


def iter_jsonl(path: str) -> Iterator[Record]:
  """The records of one file; an undecodable line is skipped, with a warning (once) unless it is the last, which
  may be a write in progress."""
  with storage.path(path).open() as f:
    torn = None  # The number of the line before, if it did not decode.
    for number, line in enumerate(f, start=1):
      if torn is not None and (path, torn) not in _WARNED_TORN:
        _WARNED_TORN.add((path, torn))
        logging.warning('%s: line %d is not a whole record (a write cut short: a kill or a full disk); skipped.',
                        path, torn)
      torn = None
      line = line.strip()
      if not line:
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError:
        torn = number


def merge(streams: Sequence[Iterable[Record]]) -> List[Record]:
  """One stream of several writers' records: each writer's in the order it wrote them, interleaved by `time`
  (ties: the earlier stream in `streams` first). Writers on hosts whose clocks disagree interleave as their
  clocks say; no writer's own order changes."""
  return list(heapq.merge(*streams, key=lambda record: record.get('time', 0.0)))
