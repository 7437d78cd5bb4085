"""One launch of a run at a time: the launcher's lock on its run directory (`RunLayout.lock`).

Two launchers on one run directory would train two learners from one
checkpoint, both appending records of the same attempt. So `launch.train`
takes the run directory's lock before it writes anything there, and keeps it
until every process of its last launch has exited. The lock is a small JSON
file naming its holder: `host`, `pid` and `since` (for people), the machine's
`boot_id`, every process of the launch (`processes`: the launcher, its
watchdog and its nodes, each as pid and start time), `renewed` (rewritten
every `RENEW_S` by a thread of the launcher) and a `token` of its own.

The holder is alive when, on the same machine (boot id), one of its
processes runs (pid and start time: a pid the system gave to another process
does not count), and, seen from another machine (a shared disk, a bucket),
when it was renewed within `LEASE_S` (a lease). A second launcher on a live
run directory is refused (`Held`, naming the holder); a stale lock (its
holder gone: killed, the machine rebooted) is taken over, and the launcher
warns, naming it.

Creation is first-writer-wins (`storage.write_if_absent`: a hard link on a
disk; on a bucket a check then an upload, so two launchers starting within
one upload's time can both write it: each reads it back, and the holder
checks it at every renewal, `lost` naming the launcher that took it).
"""

import dataclasses
import json
import os
import socket
import threading
import time
from typing import Optional, Sequence, Tuple
import uuid

import psutil

from agents import storage
from launch.program.watchdog import same_process
from probes.records.run_dir import RunLayout

RENEW_S = 20.0
LEASE_S = 120.0  # Six renewals missed: the holder is gone (seen from another machine).
Process = Tuple[int, float]  # (pid, start time as psutil gives it).


def boot_id() -> str:
  """This machine's boot (Linux), so that another machine's, or an earlier boot's, pids are not read as ours."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def this_process() -> Process:
  process = psutil.Process()
  return process.pid, process.create_time()


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a run directory's lock, as its file says."""
  token: str
  host: str
  boot_id: str
  pid: int
  since: float
  renewed: float
  processes: Tuple[Process, ...]

  def describe(self) -> str:
    return (f'pid {self.pid} on {self.host}, since {time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))}'
            f' (renewed {max(time.time() - self.renewed, 0):.0f} s ago)')

  def alive(self) -> bool:
    if (self.boot_id or self.host) == (boot_id() or socket.gethostname()):  # This machine: its processes tell.
      return any(same_process(pid, created) for pid, created in self.processes)
    return time.time() - self.renewed < LEASE_S

  def to_json(self) -> bytes:
    return json.dumps(dataclasses.asdict(self), indent=1).encode()


def read(path: str) -> Optional[Holder]:
  """The lock file's holder; None if there is none. `ValueError` if the file is not a lock."""
  try:
    raw = json.loads(storage.path(path).read_bytes())
    return Holder(**{**raw, 'processes': tuple(tuple(process) for process in raw['processes'])})
  except FileNotFoundError:
    return None
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{path} is not a readable lock ({e!r})') from e


def live_holder(layout: RunLayout) -> Optional[Holder]:
  """Who holds the run directory now, if anyone alive does."""
  try:
    holder = read(layout.lock)
  except ValueError:
    return None
  return holder if holder is not None and holder.alive() else None


class Held(Exception):
  """The run directory is locked by a live launcher."""

  def __init__(self, path: str, holder: Holder):
    super().__init__(f'{os.path.dirname(path)} is in use by another launch of the run: {holder.describe()}. Stop '
                     f'that one first (its lock is {path}), or use another --run_dir.')
    self.holder = holder


class RunLock:
  """The lock on one run directory, held by this process from `acquire` to `release`."""

  def __init__(self, layout: RunLayout):
    self.path = layout.lock
    self._token = uuid.uuid4().hex
    self._since = time.time()
    self._processes: Tuple[Process, ...] = (this_process(),)
    self._mutex = threading.Lock()
    self._stop = threading.Event()
    self._renewer: Optional[threading.Thread] = None
    self.lost: Optional[str] = None  # Who took the lock from this launcher, if someone did (a bucket's race).

  def _holder(self) -> Holder:
    pid, _ = self._processes[0]
    return Holder(self._token, socket.gethostname(), boot_id(), pid, self._since, time.time(), self._processes)

  def acquire(self) -> Optional[str]:
    """Takes the lock; the stale holder it took over, if any, described (to warn about). `Held` if a live one
    holds it."""
    taken_over = None
    for _ in range(5):
      if storage.write_if_absent(self.path, self._holder().to_json()):
        holder = read(self.path)
        if holder is None or holder.token != self._token:  # A bucket's race, lost.
          raise Held(self.path, holder or self._holder())
        self._renewer = threading.Thread(target=self._renew, name='run-lock', daemon=True)
        self._renewer.start()
        return taken_over
      try:
        holder = read(self.path)
      except ValueError:  # Damaged (written whole, so not by a launcher): nobody's.
        holder = None
      if holder is not None and holder.alive():
        raise Held(self.path, holder)
      if self._take_over():
        taken_over = holder.describe() if holder else 'a damaged lock file'
    holder = read(self.path)
    raise Held(self.path, holder or self._holder())

  def _take_over(self) -> bool:
    """Moves a stale lock aside; False if it changed meanwhile (another launcher took it over first)."""
    lock = storage.path(self.path)
    try:
      stale = lock.read_bytes()
      aside = storage.path(f'{self.path}.stale-{self._token}')
      lock.rename(aside)
    except FileNotFoundError:
      return False
    moved = aside.read_bytes()
    if moved != stale:  # A fresh lock, written between the read and the move: its owner's again.
      storage.write_if_absent(self.path, moved)
    aside.unlink()
    return moved == stale

  def holds(self) -> bool:
    try:
      holder = read(self.path)
    except ValueError:
      holder = None
    if holder is None or holder.token != self._token:
      self.lost = holder.describe() if holder else 'its lock file is gone or damaged'
    return self.lost is None

  def update(self, processes: Sequence[Process]) -> None:
    """Names the launch's other processes (watchdog, nodes) beside the launcher: rewritten when they change."""
    processes = (self._processes[0], *sorted(set(processes)))
    with self._mutex:
      if processes == self._processes:
        return
      self._processes = processes
      if self.holds():
        storage.write_atomically(self.path, self._holder().to_json())

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_S):
      with self._mutex:
        try:
          if not self.holds():
            return
          storage.write_atomically(self.path, self._holder().to_json())
        except OSError as e:  # A full disk, a bucket's hiccup: the lease still runs; next time.
          print(f'Warning: could not renew {self.path} ({e!r}).', flush=True)

  def release(self) -> None:
    """Gives the lock up (if it is still this launcher's); call once every process of the launch has exited."""
    self._stop.set()
    if self._renewer is not None:
      self._renewer.join()
    with self._mutex:
      try:
        if self.holds():
          storage.path(self.path).unlink()
      except OSError as e:
        print(f'Warning: could not remove {self.path} ({e!r}); the next launch takes it over.', flush=True)
