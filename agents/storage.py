"""Files of a run on a local disk or in a bucket (`gs://`), through `etils.epath`: the one filesystem layer.

`etils.epath.Path` takes a local path or a URI; `gs://` goes through
`tf.io.gfile` when TensorFlow is installed (it is, in the lock), else fsspec.
A path under `/gcs/` is a bucket too: Cloud Storage mounted by gcsfuse, as
Vertex AI mounts buckets (no hard links, no append; a file is uploaded whole
when it is closed). A bucket is not a disk, and the two writes a run needs
are defined for both:

- `write_atomically`: readers see the old content or the new, whole. Locally:
  a temporary file (`.<name>.partial-<random>`), fsynced, renamed over the
  path, then the directory fsynced (the rename itself survives a power cut).
  On a bucket: one object upload, which appears whole when it completes and
  not at all if the writer dies (a rename there is a copy and a delete, no
  more atomic). Concurrent writers of one object: the last upload wins; the
  run gives each object one writer (or writers whose content agree, such as
  status files).
- `write_if_absent` (first writer wins): locally a hard link, which fails if
  the path exists. epath offers no generation precondition
  (`ifGenerationMatch=0`) for a bucket, so there it checks and then uploads:
  two writers inside that window both upload and the last one wins; each
  then reads back what is there. Used only for `probe_set.npz`, drawn once
  by the first evaluator at its first probe point.

A write that fails (a full disk) raises `WriteError` naming the file, and
leaves nothing behind: its temporary file is removed and the file's previous
content, if any, is intact. A process killed mid-write leaves its temporary
file; the launcher removes those (`sweep_temporaries`) before each launch.

A bucket has no append either: `probes.records.loggers` writes each record stream as
numbered objects of its own there.
"""

import errno
import hashlib
import os
import re
import stat
import tempfile
import time
from typing import List, Union

from etils import epath

PathLike = Union[str, os.PathLike]

GCSFUSE_ROOT = '/gcs'  # Where Vertex AI mounts Cloud Storage buckets (gcsfuse).
_PARTIAL = '.partial-'  # A temporary file's name: .<name>.partial-<8 random characters> (tempfile's).
TEMPORARY = re.compile(rf'^\..+{re.escape(_PARTIAL)}[a-z0-9_]{{8}}$')


class WriteError(OSError):
  """A file that could not be written, named, with the system's reason (`errno` kept: `is_full`). Nothing of the
  attempt is left behind; the file's previous content, if any, is intact."""

  def __init__(self, location: PathLike, error: OSError):
    super().__init__(error.errno, error.strerror or str(error), os.fspath(location))


def is_full(error: BaseException) -> bool:
  """Whether an error is a file system out of space (or over its quota)."""
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def path(*parts: PathLike) -> epath.Path:
  """A local path or a URI (`gs://bucket/run`) as an `epath.Path`."""
  return epath.Path(*parts)


def is_local(location: PathLike) -> bool:
  """Whether `location` is on a disk, with rename, hard links and append; a bucket is not: a URI (`gs://...`), or
  a path under `/gcs/` (gcsfuse)."""
  location = os.fspath(location)
  if '://' in location:
    return False
  absolute = os.path.abspath(location)
  return not (absolute == GCSFUSE_ROOT or absolute.startswith(GCSFUSE_ROOT + os.sep))


def write_atomically(location: PathLike, data: bytes) -> None:
  """Replaces the file's content by `data`, all or nothing (see the module's docstring); `WriteError` if it cannot."""
  target = path(location)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(location):
      target.write_bytes(data)
      return
    temporary = _synced_temporary(target, data)
    try:
      os.replace(temporary, target)
    except BaseException:
      _remove(temporary)
      raise
    _sync_directory(os.fspath(target.parent))
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(location, e) from e


def write_if_absent(location: PathLike, data: bytes) -> bool:
  """Writes `data` unless the file exists; whether it wrote (first writer wins; see the module's docstring)."""
  target = path(location)
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(location):
      if target.exists():
        return False
      target.write_bytes(data)
      return True
    temporary = _synced_temporary(target, data)
    try:
      os.link(temporary, target)
    except FileExistsError:
      return False
    finally:
      _remove(temporary)
    _sync_directory(os.fspath(target.parent))
    return True
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(location, e) from e


def _synced_temporary(target: epath.Path, data: bytes) -> str:
  """`data` in a new file next to `target`, on disk, readable by all like any file the run writes; removed again
  if that fails."""
  f = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f'.{target.name}{_PARTIAL}', delete=False)
  try:
    with f:
      f.write(data)
      f.flush()
      os.fchmod(f.fileno(), 0o644)  # Not tempfile's 0o600.
      os.fsync(f.fileno())
  except BaseException:
    _remove(f.name)
    raise
  return f.name


def _remove(location: str) -> None:
  try:
    os.remove(location)
  except FileNotFoundError:
    pass


def _sync_directory(directory: str) -> None:
  """Makes a rename or link in `directory` durable; a file system that cannot sync a directory is left as it is."""
  fd = os.open(directory, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
      raise
  finally:
    os.close(fd)


def sweep_temporaries(root: PathLike, before: float) -> List[str]:
  """Removes, under a local `root`, the temporary files of writes that never finished (a process killed
  mid-write): ours by their name (`TEMPORARY`), last modified before `before` (a live writer's is newer). The
  paths removed."""
  root = os.fspath(root)
  removed = []
  if not is_local(root):
    return removed  # A bucket's writes are single uploads: nothing is left of an unfinished one.
  for directory, _, names in os.walk(root):
    for name in names:
      if TEMPORARY.match(name):
        location = os.path.join(directory, name)
        try:
          if os.lstat(location).st_mtime < before:
            os.remove(location)
            removed.append(location)
        except FileNotFoundError:
          pass
  return removed


def move_aside(location: PathLike) -> str:
  """Renames a damaged file or directory to `<name>.damaged-<time>` beside it, where no reader looks but a person
  can; the new path."""
  location = os.fspath(location)
  stamp = time.strftime('%Y%m%d-%H%M%S')
  aside, n = f'{location}.damaged-{stamp}', 1
  while path(aside).exists():
    aside, n = f'{location}.damaged-{stamp}-{n}', n + 1
  path(location).rename(aside)
  return aside


def checksum(data: bytes) -> str:
  """The sha256 of `data`, in hex: what files carry to tell damage at reading."""
  return hashlib.sha256(data).hexdigest()


def file_checksum(location: PathLike, chunk_bytes: int = 1 << 22) -> str:
  """The sha256 of a file's content, read in chunks."""
  digest = hashlib.sha256()
  with path(location).open('rb') as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def private_directory(name: str) -> str:
  """`<temporary directory>/<name>-<uid>`: this user's alone (mode 0700), created if absent, for local files of a
  shared /tmp (a bucket run's node logs), where anyone may have made the path first. A ValueError naming it if it
  is not a directory of this user's alone."""
  root = os.path.join(tempfile.gettempdir(), f'{name}-{os.getuid()}')
  try:
    os.mkdir(root, 0o700)
  except FileExistsError:
    pass
  info = os.lstat(root)
  if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
    raise ValueError(f'{root} is not a directory of this user\'s alone (owner uid {os.getuid()}, mode 0700, not a '
                     f'link): another user may have made it. Remove it, or set TMPDIR to a directory of your own.')
  return root


def holds_something(location: PathLike) -> bool:
  """A non-empty file, or a directory with something in it."""
  target = path(location)
  if target.is_dir():
    return any(True for _ in target.iterdir())
  return target.exists() and target.stat().length > 0
