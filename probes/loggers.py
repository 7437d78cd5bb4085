"""Run-directory loggers: one JSON line per record, mirrored to TensorBoard.

Several processes may append to the same JSONL file (all actors write
`actors.jsonl`): each record is written with a single `write` on a file opened
with O_APPEND, so lines never interleave.

A non-finite number (a diverged run) is written as null, and the record's
`nonfinite` list names the keys that held one: JSON has no NaN, and a stand-in
such as 1e308 would pass for a measurement.
"""

import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional


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


class JsonlLogger:
  """Appends records to the JSONL file at `path`, adding a wall-clock time.

  With a `tensorboard_dir` the numeric scalars of each record also go there,
  against `step_key`.
  """

  def __init__(self, path: str, tensorboard_dir: Optional[str] = None, step_key: str = 'learner_step',
               extra: Optional[Dict[str, Any]] = None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    self._step_key = step_key
    self._extra = extra or {}
    self._summary_writer = None
    if tensorboard_dir:
      import tensorflow as tf  # Only the TensorBoard writer needs TF here.
      self._tf = tf
      self._summary_writer = tf.summary.create_file_writer(tensorboard_dir)

  def __call__(self, record: Dict[str, Any]) -> None:
    record = {**self._extra, **record, 'time': time.time()}
    nonfinite = sorted(key for key, value in record.items() if _has_nonfinite(value))
    record = _jsonable(record)
    if nonfinite:
      record['nonfinite'] = nonfinite
    os.write(self._fd, (json.dumps(record) + '\n').encode())
    if self._summary_writer is not None and self._step_key in record:
      with self._summary_writer.as_default(step=int(record[self._step_key])):
        for key, value in record.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ('time', self._step_key):
            self._tf.summary.scalar(key, value)
      self._summary_writer.flush()

  def close(self) -> None:
    os.close(self._fd)
    if self._summary_writer is not None:
      self._summary_writer.close()


def read_jsonl(path: str) -> List[Dict[str, Any]]:
  """Reads a JSONL file, skipping a truncated last line (a crash mid-write); a file not yet written has no
  records."""
  return list(iter_jsonl(path)) if os.path.exists(path) else []


def iter_jsonl(path: str) -> Iterator[Dict[str, Any]]:
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        yield json.loads(line)
      except json.JSONDecodeError:
        continue


def last_jsonl_record(path: str, matches: Callable[[Dict[str, Any]], bool],
                      block_bytes: int = 1 << 20) -> Optional[Dict[str, Any]]:
  """The last record of a JSONL file that `matches`, read from the end block by block (a run's actors.jsonl
  grows to millions of lines; the record sought is near its end); None if there is none."""
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    end = f.seek(0, os.SEEK_END)
    head = b''  # The start of the line the block before ended in.
    while end > 0:
      start = max(end - block_bytes, 0)
      f.seek(start)
      lines = (f.read(end - start) + head).split(b'\n')
      head = lines.pop(0) if start > 0 else b''
      for line in reversed(lines):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # An empty or truncated line.
          continue
        if matches(record):
          return record
      end = start
  return None
