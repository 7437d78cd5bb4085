"""Joining a live run from another process or host: what `launch.attach_evaluator` and `launch.attach_actors`
share.

A run's actor 0 publishes the learner's Courier address and the replay's
Reverb address in RUN_DIR/addresses.json; `connect` reads them with the run's
config.json and checks that the learner answers. Every call to the learner
goes through `guarded`, so a run that stops (its learner gone) is one
exception, `LearnerGone`, never a hang: each call has a timeout. Attached
actors take ids no actor of the run has had (`claim_actor_ids`).
"""

import json
import os
import socket
import time
from typing import Callable, List, Tuple

from absl import app
from absl import logging
import courier

from agents import storage

from probes.run_dir import MAX_ACTORS, ExperimentConfig, RunLayout, load_config


class LearnerGone(Exception):
  """The live run's learner stopped answering (the run ended or was stopped)."""


def guarded(call: Callable) -> Callable:
  """A learner call whose transport failures become `LearnerGone`."""

  def guarded_call(*args):
    try:
      return call(*args)
    except Exception as e:  # Courier raises pybind11_abseil's StatusNotOk, which has no importable home.
      raise LearnerGone(str(e)) from e

  return guarded_call


def connect(run_dir: str, call_timeout_s: float) -> Tuple[ExperimentConfig, courier.Client, str]:
  """(run config, learner client, replay address), or a ValueError saying why the run is not attachable."""
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
  learner = courier.Client(addresses['learner'], call_timeout=call_timeout_s, wait_for_ready=False)
  try:
    step = guarded(learner.get_step)()
  except LearnerGone as e:
    raise ValueError(f'The run in {run_dir} is not live: its learner at {addresses["learner"]} does not answer '
                     f'({e}). Start or resume it with launch.train, then attach.') from e
  logging.info('Attached to the learner at %s (step %d), replay at %s.', addresses['learner'], step,
               addresses['replay'])
  return config, learner, addresses['replay']


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


def attach_from_command_line(argv: List[str], run_dir: str, call_timeout_s: float
                             ) -> Tuple[ExperimentConfig, courier.Client, str]:
  """`connect` for a command's `main`: its arguments and a failure to connect as the command's usage errors."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not run_dir:
    raise app.UsageError('--run_dir is required: the directory of a live run started by launch.train.')
  try:
    return connect(run_dir, call_timeout_s)
  except ValueError as e:
    raise app.UsageError(str(e))
