r"""Launches a training run: replay, actors, learner and evaluator.

  python -m launch.train --run_dir=runs/mnist_easy --env=mdp:mnist:easy

Relaunching with the same --run_dir and flags resumes from the last
checkpoint (raise --max_learner_steps to extend a finished run). The run
directory's files are described in WORKSPACE.md.
"""

import os
import sys
import threading
import time

from absl import app
from absl import logging

import environments
from environments import datasets
from agents.builder import make_agent
from launch import flags as run_flags
from launch import program as program_lib
from launch.experiment import ExperimentConfig, write_or_check_config
from launch.loggers import read_jsonl
from probes import report


def validate(config: ExperimentConfig) -> str:
  """Builds the environment and agent once, so bad flags fail before any launch."""
  env = environments.make(config.env, seed=config.seed, **config.env_options())
  make_agent(config.agent, env.action_spec().num_values)
  return getattr(env, 'data_source', 'n/a')


def _last(path: str):
  try:
    records = read_jsonl(path)
  except FileNotFoundError:
    return None
  return records[-1] if records else None


def progress_line(config: ExperimentConfig) -> str:
  learner = _last(config.path('learner.jsonl'))
  probe = _last(config.path('probes.jsonl'))
  parts = []
  if learner:
    parts.append(f'learner step {learner["learner_step"]}/{config.max_learner_steps} '
                 f'({learner["updates_per_s"]:.0f} updates/s, td_loss {learner["td_loss"]:.4f}, '
                 f'mean_q {learner["mean_q"]:.3f})')
  else:
    parts.append('learner waiting for replay to fill')
  if probe:
    parts.append(f'last probe @ {probe["learner_step"]}: plasticity {probe["plasticity"]:.4f}')
  return ' | '.join(parts)


def launch_and_wait(config: ExperimentConfig) -> None:
  import launchpad as lp
  program = program_lib.make_program(config)
  if config.launch_type == 'local_mp':
    from launchpad.launch.run_locally import launch_local_output_to_files
    log_dir = config.path('logs')
    os.makedirs(log_dir, exist_ok=True)
    launch_local_output_to_files._LOGGING_DIR = log_dir  # Read at import by Launchpad; set per run.
    manager = lp.launch(program, launch_type='local_mp', terminal='output_to_files',
                        local_resources=program_lib.local_resources(config))
  else:
    manager = lp.launch(program, launch_type='local_mt', serialize_py_nodes=False)
  failure = []

  def wait():
    try:
      manager.wait()
    except BaseException as e:  # A node failed: keep its error for the user.
      failure.append(e)

  waiter = threading.Thread(target=wait, daemon=True)
  waiter.start()
  while waiter.is_alive():
    waiter.join(timeout=10.0)
    if waiter.is_alive():
      print(f'[{time.strftime("%H:%M:%S")}] {progress_line(config)}', flush=True)
  if failure:
    raise RuntimeError(f'A node of the program failed ({failure[0]}); see {config.path("logs")}.') from failure[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = run_flags.experiment_config()
    data_source = validate(config)
    resumed = write_or_check_config(config)
  except ValueError as e:
    raise app.UsageError(str(e))
  # The data is now resolved (and cached, if a download worked): nodes must not each retry a failed download.
  os.environ[datasets.DOWNLOAD_ENV] = '0'
  print(f'{"Resuming" if resumed else "Starting"} run in {config.run_dir}: {config.env} '
        f'({data_source}), {config.num_actors} actors, {config.launch_type}, '
        f'{config.max_learner_steps} learner steps, probe every {config.probe_every}.', flush=True)
  launch_and_wait(config)
  learner = _last(config.path('learner.jsonl'))
  print(f'Finished: {progress_line(config)}')
  if os.path.exists(config.path('probes.jsonl')):
    for path in report.write_report(config.run_dir):
      print(f'  plot: {path}')
  print(f'Results in {config.run_dir}: learner.jsonl, actors.jsonl, probes.jsonl, checkpoints/, '
        f'tensorboard/ (tensorboard --logdir {config.path("tensorboard")}), plots/.')
  if not learner or learner['learner_step'] < config.max_learner_steps:
    sys.exit(f'The learner stopped before --max_learner_steps={config.max_learner_steps}; see {config.path("logs")}.')


if __name__ == '__main__':
  app.run(main)
