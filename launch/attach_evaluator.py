r"""Attaches an evaluator to a live training run.

  python -m launch.attach_evaluator --run_dir=runs/mnist_easy [--probe_every=2000]

Runs as its own process against the run's learner (Courier) and replay
(Reverb), at the addresses the run publishes in RUN_DIR/addresses.json. It
snapshots the learner's parameters on its own schedule, runs the probe on the
run's probe set (RUN_DIR/probe_set.npz, drawn from the replay by whichever
evaluator needs it first), and writes under RUN_DIR/evaluators/NAME/, never
touching the built-in evaluator's files. Several can attach at once; stopping one (Ctrl-C) leaves the run
untouched. It exits by itself once the learner has finished.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import courier

from agents import config_flags
from launch import program as program_lib
from probes.run_dir import ExperimentConfig, RunLayout, load_config

RUN_DIR = flags.DEFINE_string('run_dir', None, 'Directory of the live run to attach to.')
NAME = flags.DEFINE_string('name', None, 'Name of this evaluator: it writes under RUN_DIR/evaluators/NAME/ '
                           '(default: attached-<time>-<pid>).')
# Every setting of the evaluator can differ from the run's: the probe's, the diagnostics', the schedule.
OVERRIDES = config_flags.define(
    ExperimentConfig, overrides=True, help_suffix=' (Default: as the run has it.)',
    only=[f.flag for f in config_flags.fields(ExperimentConfig)
          if f.path[0] in ('probe', 'diagnostics', 'probe_every', 'diagnostics_enabled')])
SEED = flags.DEFINE_integer('seed', 1, 'Seed of this evaluator\'s probe targets.')
CALL_TIMEOUT_S = flags.DEFINE_float('call_timeout_s', 30.0, 'Timeout of each call to the learner.', lower_bound=0.1)


class LearnerGone(Exception):
  """The live run's learner stopped answering (the run ended or was stopped)."""


def _guarded(call):
  """A learner call whose transport failures become `LearnerGone`."""

  def guarded(*args):
    try:
      return call(*args)
    except Exception as e:  # Courier raises pybind11_abseil's StatusNotOk, which has no importable home.
      raise LearnerGone(str(e)) from e

  return guarded


def connect(run_dir: str, call_timeout_s: float):
  """(run config, learner client, replay address), or a ValueError saying why the run is not attachable."""
  config = load_config(run_dir)  # A ValueError if `run_dir` is not a run directory.
  path = config.layout.addresses
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} is a run directory but holds no {os.path.basename(path)}: its program is not '
                     f'running (or has not started its actors yet). Start or resume it with launch.train.')
  with open(path) as f:
    addresses = json.load(f)
  if 'stopped_at' in addresses:
    stopped = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(addresses['stopped_at']))
    raise ValueError(f'The run in {run_dir} is not live: it stopped at {stopped} ({path} is marked stale). Start or '
                     f'resume it with launch.train, then attach.')
  learner = courier.Client(addresses['learner'], call_timeout=call_timeout_s, wait_for_ready=False)
  try:
    step = _guarded(learner.get_step)()
  except LearnerGone as e:
    raise ValueError(f'The run in {run_dir} is not live: its learner at {addresses["learner"]} does not answer '
                     f'({e}). Start or resume it with launch.train, then attach.') from e
  logging.info('Attached to the learner at %s (step %d), replay at %s.', addresses['learner'], step,
               addresses['replay'])
  return config, learner, addresses['replay']


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if not RUN_DIR.value:
    raise app.UsageError('--run_dir is required: the directory of a live run started by launch.train.')
  try:
    config, learner, replay_address = connect(RUN_DIR.value, CALL_TIMEOUT_S.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  name = NAME.value or f'attached-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'
  out = config.layout.evaluator(name)
  out_dir = out.root
  if os.path.exists(out_dir):
    raise app.UsageError(f'--name={name}: {out_dir} already exists; choose another name.')
  config: ExperimentConfig = config_flags.apply_overrides(config, OVERRIDES)
  probe_every = config.probe_every or ExperimentConfig.probe_every  # A run without an evaluator: the default.
  evaluator = program_lib.make_evaluator(config, out, _guarded(learner.get_snapshot), replay_address,
                                         seed=SEED.value, initial_source=_guarded(learner.get_initial_snapshot),
                                         reference_probes=config.layout.records(RunLayout.PROBES))
  print(f'Evaluator {name} attached to {config.run_dir}: probing every {probe_every} learner steps '
        f'({config.probe.steps} probe steps, diagnostics {"on" if config.diagnostics_enabled else "off"}); '
        f'writing {out_dir}.',
        flush=True)
  try:
    evaluator.run(probe_every, learner_step=_guarded(learner.get_step),
                  learner_finished=_guarded(learner.is_finished))
  except KeyboardInterrupt:
    print(f'Stopped; the run is untouched. Results so far in {out_dir}.')
    return
  except LearnerGone as e:  # The run stopped between two calls.
    print(f'The run stopped ({e}); results in {out_dir}.')
    return
  print(f'The learner finished; results in {out_dir}.')


if __name__ == '__main__':
  app.run(main)
