"""Joining a live run from another process or host: what `launch.attach_evaluator` and `launch.attach_actors`
share.

A run's actor 0 publishes the learner's Courier address and the replay's
Reverb address in RUN_DIR/addresses.json; `connect` reads them with the run's
config.json, checks that the learner answers, and gives a `LiveRun`. Every
call to the learner goes through `LiveRun.call`: each has a timeout, and one
that fails (a partition, the learner's host dying, a relaunch listening on
new ports) is retried with backoff, re-reading addresses.json, until the
learner answers again or `rejoin_timeout_s` passes; only then, or at once when
the run is over, it raises `LearnerGone`, never a hang. Attached actors take
ids no actor of the run has had (`claim_actor_ids`).
"""

import json
import os
import socket
import threading
import time
from typing import Callable, List

from absl import app
from absl import logging
import courier

from agents import storage

from probes.records.run_dir import MAX_ACTORS, ExperimentConfig, RunLayout, load_config


class LearnerGone(Exception):
  """The live run's learner stopped answering for good (the run ended, or did not come back in time)."""


class RunFinished(LearnerGone):
  """The learner no longer answers because the run is over: its launch stopped at its last step."""


def guarded(call: Callable) -> Callable:
  """A learner call whose transport failures become `LearnerGone`."""

  def guarded_call(*args):
    try:
      return call(*args)
    except Exception as e:  # Courier raises pybind11_abseil's StatusNotOk, which has no importable home.
      raise LearnerGone(str(e)) from e

  return guarded_call


FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0


def _read_addresses(config: ExperimentConfig) -> dict:
  try:
    return json.loads(storage.path(config.layout.addresses).read_text())
  except (OSError, ValueError):  # Being replaced: the next read has it.
    return {}


class LiveRun:
  """A live run's learner and replay as an attached process reaches them, through partitions and relaunches.

  `call(method, *args)` calls the learner (Courier, `call_timeout_s` each);
  when it fails it is retried after 1 s, then 2, 4, ... (at most 30 s), each
  retry re-reading addresses.json (a relaunched run listens on new ports:
  actor 0 publishes them), until it answers or `rejoin_timeout_s` has passed
  since the first failure, which raises `LearnerGone` saying so. It raises at
  once when the run is over (addresses.json marked stopped and the learner's
  records at `--max_learner_steps`: `RunFinished`) or `should_stop()`. Thread-safe: actor
  threads share one.
  """

  def __init__(self, config: ExperimentConfig, addresses: dict, call_timeout_s: float, rejoin_timeout_s: float,
               should_stop: Callable[[], bool] = lambda: False):
    self.config = config
    self._call_timeout_s = call_timeout_s
    self._rejoin_timeout_s = rejoin_timeout_s
    self.should_stop = should_stop
    self._lock = threading.Lock()
    self._use(addresses)

  def _use(self, addresses: dict) -> None:
    self.addresses = addresses
    self._learner = courier.Client(addresses['learner'], call_timeout=self._call_timeout_s, wait_for_ready=False)

  @property
  def replay_address(self) -> str:
    """The replay's address as last published (a relaunch changes it)."""
    with self._lock:
      return self.addresses['replay']

  def over(self) -> bool:
    """Whether the run has ended its work: its launch stopped once the learner reached its last step."""
    if 'stopped_at' not in _read_addresses(self.config):
      return False
    learner = self.config.layout.records(RunLayout.LEARNER)
    return bool(learner) and learner[-1]['learner_step'] >= load_config(self.config.run_dir).max_learner_steps

  def call(self, method: str, *args):
    failed_at, backoff = None, FIRST_BACKOFF_S
    while True:
      with self._lock:
        learner, address = self._learner, self.addresses['learner']
      try:
        result = guarded(getattr(learner, method))(*args)
        if failed_at is not None:
          logging.info('The learner at %s answers again (after %.0f s).', address, time.time() - failed_at)
        return result
      except LearnerGone as e:
        failed_at = failed_at or time.time()
        if self.over():
          raise RunFinished(f'the run finished ({e})') from e
        if self.should_stop():
          raise
        waited = time.time() - failed_at
        if waited >= self._rejoin_timeout_s:
          raise LearnerGone(f'the learner at {address} has not answered for {waited:.0f} s (--rejoin_timeout_s='
                            f'{self._rejoin_timeout_s:g}): {e}') from e
        deadline = min(time.time() + backoff, failed_at + self._rejoin_timeout_s)  # A last try at the timeout.
        logging.warning('The learner at %s does not answer (%s); retrying in %.1f s.', address, e,
                        deadline - time.time())
        while time.time() < deadline and not self.should_stop():
          time.sleep(0.2)
        backoff = min(2 * backoff, MAX_BACKOFF_S)
        self._reread(address)

  def _reread(self, address: str) -> None:
    """Takes the addresses a relaunch published, if they changed."""
    published = _read_addresses(self.config)
    with self._lock:
      if published.get('learner') and published['learner'] != self.addresses['learner'] and \
          self.addresses['learner'] == address:
        logging.info('The run was relaunched: learner now at %s, replay at %s.', published['learner'],
                     published['replay'])
        self._use(published)


def connect(run_dir: str, call_timeout_s: float, rejoin_timeout_s: float = 0.0) -> LiveRun:
  """The live run in `run_dir`, or a ValueError saying why it is not attachable."""
  config = load_config(run_dir)  # A ValueError if `run_dir` is not a run directory.
  path = config.layout.addresses
  if not storage.path(path).exists():
    raise ValueError(f'{run_dir} is a run directory but holds no {os.path.basename(path)}: its program is not '
                     f'running (or has not started its actors yet). Start or resume it with launch.train.')
  addresses = json.loads(storage.path(path).read_text())
  if 'stopped_at' in addresses:
    stopped = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(addresses['stopped_at']))
    raise ValueError(f'The run in {run_dir} is not live: it stopped at {stopped} ({path} is marked stale). Start or '
                     f'resume it with launch.train, then attach.')
  run = LiveRun(config, addresses, call_timeout_s, rejoin_timeout_s)
  try:
    step = guarded(run._learner.get_step)()  # pylint: disable=protected-access  Once, no retry: is it live?
  except LearnerGone as e:
    raise ValueError(f'The run in {run_dir} is not live: its learner at {addresses["learner"]} does not answer '
                     f'({e}). Start or resume it with launch.train, then attach.') from e
  logging.info('Attached to the learner at %s (step %d), replay at %s.', addresses['learner'], step,
               addresses['replay'])
  return run


def claim_actor_ids(layout: RunLayout, num: int) -> List[int]:
  """`num` actor ids no actor of the run has had, from MAX_ACTORS up.

  Each id is claimed by creating its file exclusively (O_EXCL), so processes
  attaching at once, on any host sharing the run directory, never take the
  same one; a claim is never released, so an id (and its seed) is used once.
  """
  directory = os.path.dirname(layout.attached_actor(MAX_ACTORS))
  os.makedirs(directory, exist_ok=True)
  claimed = [int(name.split('.')[0]) for name in os.listdir(directory) if name.split('.')[0].isdigit()]
  candidate = max(claimed, default=MAX_ACTORS - 1) + 1
  ids = []
  while len(ids) < num:
    try:
      fd = os.open(layout.attached_actor(candidate), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # Another process took it meanwhile.
      candidate += 1
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}, f)
    ids.append(candidate)
    candidate += 1
  return ids


def attach_from_command_line(argv: List[str], run_dir: str, call_timeout_s: float,
                             rejoin_timeout_s: float) -> LiveRun:
  """`connect` for a command's `main`: its arguments and a failure to connect as the command's usage errors."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not run_dir:
    raise app.UsageError('--run_dir is required: the directory of a live run started by launch.train.')
  try:
    return connect(run_dir, call_timeout_s, rejoin_timeout_s)
  except ValueError as e:
    raise app.UsageError(str(e))
