"""Joining a live run from another process or host: what `launch.attach_evaluator` and `launch.attach_actors`
share.

A run's actor 0 publishes the learner's Courier address and the replay's
Reverb address in RUN_DIR/addresses.json; `connect` reads them with the run's
config.json and checks that the learner answers. Every call to the learner
goes through `guarded`, so a run that stops (its learner gone) is one
exception, `LearnerGone`, never a hang: each call has a timeout.
"""

import json
import os
from typing import Callable, Tuple

from absl import logging
import courier

from probes.run_dir import ExperimentConfig, load_config


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
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} is a run directory but holds no {os.path.basename(path)}: its program is not '
                     f'running (or has not started its actors yet). Start or resume it with launch.train.')
  with open(path) as f:
    addresses = json.load(f)
  learner = courier.Client(addresses['learner'], call_timeout=call_timeout_s, wait_for_ready=False)
  try:
    step = guarded(learner.get_step)()
  except LearnerGone as e:
    raise ValueError(f'The run in {run_dir} is not live: its learner at {addresses["learner"]} does not answer '
                     f'({e}). Start or resume it with launch.train, then attach.') from e
  logging.info('Attached to the learner at %s (step %d), replay at %s.', addresses['learner'], step,
               addresses['replay'])
  return config, learner, addresses['replay']
