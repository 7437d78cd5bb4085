r"""Launches a training run: replay, actors, learner and evaluator.

  python -m launch.train --run_dir=runs/mnist_easy --env=mdp:mnist:easy

With --launch_type=vertex_ai it submits the program as a Vertex AI custom job
and exits (launch/program/cluster.py; --dry_run prints the worker pools instead).
Relaunching with the same --run_dir and flags resumes from the last
checkpoint (raise --max_learner_steps to extend a finished run). The run
directory's files are described in WORKSPACE.md.

Exit codes (every command of this project uses them;
`launch.program.relaunch.ExitCode`, which also holds the launch loop that
relaunches a failed program): 0 finished; 1 bad input
or usage (a run directory in use by another launch, servers that would listen
beyond --bind_host included); 2 a node failed (or the run directory's disk is
full); 3 the learner diverged; 4 training finished without some probe points
(the evaluator failed past its restarts and was disabled; a relaunch probes
them); 130 interrupted (SIGINT, SIGTERM or SIGHUP).

A run directory of an earlier version (single-file record streams, a
configuration without its `launch` part) is refused, naming
`python -m launch.migrate`, which rewrites it; its pickled checkpoints are
named and never read.
"""

import contextlib
import os
import signal
import sys
from typing import Iterator, Optional

from absl import app
import jax
import numpy as np

import environments
from environments import datasets
from agents import checkpointing, config_flags, snapshots, storage
from agents.builder import make_agent
from agents.learner import initial_state
from launch.program import cluster as cluster_lib
from launch.program.completion import last_record, training_end, unprobed_points
from launch import flags as run_flags
from launch.program import network
from launch.program import placement
from launch.program import relaunch
from launch.program import run_lock
from probes.records.run_dir import ExperimentConfig, check_config, earlier_layout, prepare_run_dir, write_config
from probes.figures import plots
from probes.records.run_dir import RunLayout

def validate(config: ExperimentConfig):
  """Builds the environment and agent once, and reads the checkpoints, so bad input fails before any launch, and
  warns of the files it cannot read. (data source, the training state's structure: `jax.eval_shape`, so that the
  launcher's own JAX computes nothing and takes no GPU memory.)"""
  earlier = earlier_layout(config.layout)
  if earlier:
    raise ValueError(f'--run_dir={config.run_dir} was written by an earlier version ({", ".join(earlier)}): '
                     f'`{checkpointing.MIGRATE_COMMAND} {config.run_dir}` rewrites it in this version\'s layout.')
  env = environments.make(config.env, seed=config.seed, **config.env_options())
  agent = make_agent(config.agent, env.action_spec().num_values)
  placement.run_envs(config)
  spec = env.observation_spec()
  template = jax.eval_shape(lambda: initial_state(agent, config.seed, np.zeros(spec.shape, spec.dtype)))
  path, _, problems = checkpointing.latest_loadable(config.layout.checkpoints, template)
  relaunch.warn_skipped(path, problems)
  if problems and path is None:
    raise ValueError(f'No checkpoint in {config.layout.checkpoints} is readable (the warnings above say why); move '
                     f'them away to start the run over (pickled ones that you trust: '
                     f'`{checkpointing.MIGRATE_COMMAND} --trust_pickled_checkpoints {config.run_dir}` converts them).')
  pickled = snapshots.pickled(config.layout.probe_snapshots)
  if pickled:
    relaunch.warn(f'{len(pickled)} probe snapshot(s) in {config.layout.probe_snapshots} are pickled (an earlier '
                  f'version\'s format): not probed. `{checkpointing.MIGRATE_COMMAND} --trust_pickled_checkpoints '
                  f'{config.run_dir}` converts them, if everyone who could write them is trusted.')
  return env.data_source, template


@contextlib.contextmanager
def _bad_input(config: ExperimentConfig) -> Iterator[None]:
  """Ends the command with exit 1 and the message of a bad input (a ValueError) or of a write that found the run
  directory's disk full."""
  try:
    yield
  except ValueError as e:
    raise app.UsageError(str(e))
  except OSError as e:
    if not storage.is_full(e):
      raise
    raise app.UsageError(relaunch.out_of_space(config, str(e)))


def restrict_servers(config: ExperimentConfig) -> None:
  """The run's servers listen on `--bind_host` only (`launch.program.network`): a `ValueError` where that cannot be
  (a run on every interface is asked for with --bind_host=0.0.0.0), a warning where other hosts can reach them."""
  try:
    network.restrict_servers(config.launch.bind_host, this_process=config.launch.launch_type == 'local_mt')
  except network.Unenforceable as e:
    raise ValueError(f'{e} Refusing to start: --bind_host=0.0.0.0 runs it on every interface knowingly.') from e
  if network.exposure(config.launch.bind_host):
    print(f'Warning: {network.exposure(config.launch.bind_host)}', file=sys.stderr, flush=True)


def _lock(config: ExperimentConfig) -> run_lock.RunLock:
  """The run directory's lock, taken (a stale one taken over with a warning); a ValueError naming a live holder."""
  lock = run_lock.RunLock(config.layout)
  try:
    stale = lock.acquire()
  except run_lock.Held as e:
    raise ValueError(str(e)) from e
  except OSError as e:
    raise ValueError(f'--run_dir={config.run_dir}: its lock {lock.path} cannot be written ({e!r}).') from e
  if stale:
    print(f'Warning: took over the lock of a launch that is gone ({stale}).', file=sys.stderr, flush=True)
  return lock


def main(argv):
  config_flags.check_command_line(argv)
  if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # Under nohup a hang-up stays ignored: the run goes on.
    signal.signal(signal.SIGHUP, relaunch.hang_up)
  try:
    config = run_flags.experiment_config()
  except ValueError as e:
    raise app.UsageError(str(e))
  with _bad_input(config):
    network.check(config.launch.bind_host, config.launch.publish_host)
    cluster = cluster_lib.cluster_config(config)
    if not cluster.dry_run and config.launch.launch_type != cluster_lib.LAUNCH_TYPE:
      restrict_servers(config)  # Before anything slow: under local_mt this process re-executes itself.
    data_source, template = validate(config)
    if cluster.dry_run:  # Nothing written: the run directory only read.
      check_config(config)
      print(cluster_lib.dry_run(config, cluster))
      return
    resumed = prepare_run_dir(config)
    lock = _lock(config) if config.launch.launch_type != cluster_lib.LAUNCH_TYPE else None
  try:
    run(config, cluster, resumed, data_source, template, lock)
  finally:
    if lock is not None:
      lock.release()


def run(config: ExperimentConfig, cluster, resumed: bool, data_source: str, template,
        lock: Optional[run_lock.RunLock]) -> None:
  """Submits the run (vertex_ai), or runs it here to its end and exits with its code. `template`: the training
  state's structure, which checkpoints are read into."""
  with _bad_input(config):
    write_config(config)
    config.layout.local_logs(config.layout.attempts() + 1)  # A bucket run's node logs: a directory of this user's.
  # The data is now resolved (and cached, if a download worked): nodes must not each retry a failed download.
  os.environ[datasets.DOWNLOAD_ENV] = '0'
  print(f'{"Resuming" if resumed else "Starting"} run in {config.run_dir}: {config.env} '
        f'({data_source}), {config.launch.num_actors} actors, {config.launch.launch_type}, '
        f'{config.max_learner_steps} learner steps, probe every {config.probe_every}.', flush=True)
  if config.launch.launch_type == cluster_lib.LAUNCH_TYPE:
    cluster_lib.submit(config, cluster)
    print(f'Submitted: the nodes write {config.run_dir}; relaunch the same command to resume it.')
    return
  try:
    _run(config, template, lock)
  except OSError as e:  # The launcher's own writes (the addresses, the restart records, the plots) found no space.
    if not storage.is_full(e):
      raise
    sys.exit(_fail(relaunch.ExitCode.NODE_FAILED, relaunch.out_of_space(config, str(e))))


def _run(config: ExperimentConfig, template, lock: Optional[run_lock.RunLock]) -> None:
  """Runs the program (relaunched when it fails), reports, and exits with the run's code."""
  code = relaunch.supervise(config, template, lock)
  layout = config.layout
  learner = last_record(layout.records(RunLayout.LEARNER))
  print(f'{"Interrupted" if code == relaunch.ExitCode.INTERRUPTED else "Finished"}: {relaunch.progress_line(config)}')
  if last_record(layout.records(RunLayout.PROBES)):
    for path in plots.write_report(config.run_dir):
      print(f'  plot: {path}')
  print(f'Results in {config.run_dir}: {relaunch.results(layout)}.')
  if learner and learner.get('diverged'):
    sys.exit(_fail(relaunch.ExitCode.DIVERGED, f'The learner diverged at step {learner["learner_step"]} (a '
                   f'non-finite loss or parameter); its last finite state is the latest checkpoint in '
                   f'{layout.checkpoints}. Try a smaller --learning_rate.'))
  if code == relaunch.ExitCode.PROBES_MISSING:
    missing = unprobed_points(config, training_end(config))
    sys.exit(_fail(code, f'Training finished, but the probe points at learner steps '
                   f'{", ".join(map(str, missing))} were not probed: the evaluator failed past --max_restarts='
                   f'{config.launch.max_restarts} restarts in place and was disabled '
                   f'({layout.stream(RunLayout.RESTARTS)}; '
                   f'its log in {layout.logs}). Their snapshot files wait in {layout.probe_snapshots}: relaunch '
                   f'the same command to probe them.'))
  if code != relaunch.ExitCode.FINISHED:
    interrupted = code == relaunch.ExitCode.INTERRUPTED
    sys.exit(_fail(code, 'Interrupted: relaunch the same command to resume.' if interrupted else f'See {layout.logs}.'))
  if not learner or learner['learner_step'] < config.max_learner_steps:
    sys.exit(_fail(relaunch.ExitCode.NODE_FAILED, f'The learner stopped before --max_learner_steps='
                   f'{config.max_learner_steps}; see {layout.logs}.'))


def _fail(code: relaunch.ExitCode, message: str) -> int:
  print(message, file=sys.stderr)
  return int(code)


if __name__ == '__main__':
  app.run(main)
