r"""Attaches an evaluator to a live training run.

  python -m launch.attach_evaluator --run_dir=runs/mnist_easy [--probe_every=2000]

Runs as its own process against the run's learner (Courier) and replay
(Reverb), at the addresses the run publishes in RUN_DIR/addresses.json. It
snapshots the learner's parameters on its own schedule, runs the probe on the
run's probe set (RUN_DIR/probe_set.npz, drawn from the replay by whichever
evaluator needs it first), and writes under RUN_DIR/evaluators/NAME/ (its
snapshots wait in its own probe_snapshots/ there), never touching the built-in
evaluator's files nor the run's probe snapshots. Several can attach at once; stopping one (Ctrl-C) leaves the run
untouched. It exits by itself once the learner has finished. Through a
partition or a relaunch of the run (new ports, re-read from addresses.json)
its calls retry with backoff and it goes on (`launch.program.attach.LiveRun`); a
learner silent for --rejoin_timeout_s ends it, saying so.
"""

import functools
import os
import time

from absl import app
from absl import flags

from agents import config_flags, storage
from launch.program import graph as program_lib
from launch.program.attach import LearnerGone, RunFinished, attach_from_command_line
from probes.records.run_dir import ExperimentConfig

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
REJOIN_TIMEOUT_S = flags.DEFINE_float('rejoin_timeout_s', 300.0, 'How long a learner that stopped answering is '
                                      'retried (with backoff), for the run to come back (a partition, a relaunch), '
                                      'before the evaluator ends.', lower_bound=0.0)


def main(argv):
  run = attach_from_command_line(argv, RUN_DIR.value, CALL_TIMEOUT_S.value, REJOIN_TIMEOUT_S.value)
  config = run.config
  learner = {name: functools.partial(run.call, name)
             for name in ('get_snapshot', 'get_initial_snapshot', 'get_step', 'is_finished')}
  name = NAME.value or f'attached-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'
  out = config.layout.evaluator(name)
  out_dir = out.root
  if storage.path(out_dir).exists():
    raise app.UsageError(f'--name={name}: {out_dir} already exists; choose another name.')
  config: ExperimentConfig = config_flags.apply_overrides(config, OVERRIDES)
  probe_every = config.probe_every or ExperimentConfig.probe_every  # A run without an evaluator: the default.
  evaluator = program_lib.make_evaluator(config, out, learner['get_snapshot'], run.replay_address,
                                         seed=SEED.value, initial_source=learner['get_initial_snapshot'],
                                         reference_probes=config.layout)
  print(f'Evaluator {name} attached to {config.run_dir}: probing every {probe_every} learner steps '
        f'({config.probe.steps} probe steps, diagnostics {"on" if config.diagnostics_enabled else "off"}); '
        f'writing {out_dir}.',
        flush=True)
  try:
    evaluator.run(probe_every, learner_step=learner['get_step'], learner_finished=learner['is_finished'])
  except KeyboardInterrupt:
    print(f'Stopped; the run is untouched. Results so far in {out_dir}.')
    return
  except RunFinished:  # Before this evaluator saw the learner's last step.
    print(f'The run finished; results in {out_dir}.')
    return
  except LearnerGone as e:  # The run stopped between two calls.
    print(f'The run stopped ({e}); results in {out_dir}.')
    return
  print(f'The learner finished; results in {out_dir}.')


if __name__ == '__main__':
  app.run(main)
