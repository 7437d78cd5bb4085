"""Files of a run on a local disk or in a bucket (`gs://`), through `etils.epath`: the one filesystem layer.

`etils.epath.Path` takes a local path or a URI; `gs://` goes through
`tf.io.gfile` when TensorFlow is installed (it is, in the lock), else fsspec.
A bucket is not a disk, and the two writes a run needs are defined for both:

- `write_atomically`: readers see the old content or the new, whole. Locally:
  a temporary file, fsynced, renamed over the path. On a bucket: one object
  upload, which appears whole when it completes and not at all if the writer
  dies (a rename there is a copy and a delete, no more atomic). Concurrent
  writers of one object: the last upload wins; the run gives each object one
  writer (or writers whose content agree, such as status files).
- `write_if_absent` (first writer wins): locally a hard link, which fails if
  the path exists. epath offers no generation precondition
  (`ifGenerationMatch=0`) for a bucket, so there it checks and then uploads:
  two writers inside that window both upload and the last one wins; each
  then reads back what is there. Used only for `probe_set.npz`, drawn once
  by the first evaluator at its first probe point.

A bucket has no append either: `probes.loggers` writes each record stream as
numbered objects of its own there.
"""

import os
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def path(*parts: PathLike) -> epath.Path:
  """A local path or a URI (`gs://bucket/run`) as an `epath.Path`."""
  return epath.Path(*parts)


def is_local(location: PathLike) -> bool:
  """Whether `location` is on a local (or mounted) filesystem, with rename, link and append; a URI is not."""
  return '://' not in os.fspath(location)


def write_atomically(location: PathLike, data: bytes) -> None:
  """Replaces the file's content by `data`, all or nothing (see the module's docstring)."""
  target = path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(location):
    target.write_bytes(data)
    return
  temporary = _synced_temporary(target, data)
  os.replace(temporary, target)


def write_if_absent(location: PathLike, data: bytes) -> bool:
  """Writes `data` unless the file exists; whether it wrote (first writer wins; see the module's docstring)."""
  target = path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(location):
    if target.exists():
      return False
    target.write_bytes(data)
    return True
  temporary = _synced_temporary(target, data)
  try:
    os.link(temporary, target)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(temporary)


def _synced_temporary(target: epath.Path, data: bytes) -> str:
  """`data` in a new file next to `target`, on disk, readable by all like any file the run writes."""
  with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f'.{target.name}.', delete=False) as f:
    f.write(data)
    f.flush()
    os.fchmod(f.fileno(), 0o644)  # Not tempfile's 0o600.
    os.fsync(f.fileno())
  return f.name


def holds_something(location: PathLike) -> bool:
  """A non-empty file, or a directory with something in it."""
  target = path(location)
  if target.is_dir():
    return any(True for _ in target.iterdir())
  return target.exists() and target.stat().length > 0
