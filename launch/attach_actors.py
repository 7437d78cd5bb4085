r"""Adds actors to a live training run, from another process or host.

  python -m launch.attach_actors --run_dir=runs/mnist_easy --num_actors=4

The actors act with the run's config.json, pull parameters from the run's
learner (Courier) and insert into its replay (Reverb), at the addresses the
run publishes in RUN_DIR/addresses.json, like the program's own actors. Each
takes an actor id no actor of the run has had (from probes.records.run_dir.MAX_ACTORS
up, claimed as a file under RUN_DIR/attached_actors/), so its seed is its own
and its episodes go to RUN_DIR/records/actors/actor_<id>.jsonl. They run as threads
of this process until the learner finishes, or Ctrl-C; stopping them leaves
the run untouched. Through a partition or a relaunch of the run (new ports,
re-read from addresses.json) they retry with backoff and rejoin
(`launch.program.attach.LiveRun`); a learner silent for --rejoin_timeout_s stops them,
saying so. The run directory must be reachable at the same path (a shared
file system) and the run's addresses from here.
"""

import threading
import time

from absl import app
from absl import flags
import reverb

from agents.learner import pull_when_newer
from launch.program import graph as program_lib
from launch.program.attach import LearnerGone, RunFinished, attach_from_command_line, claim_actor_ids
from probes.records.run_dir import RunLayout

RUN_DIR = flags.DEFINE_string('run_dir', None, 'Directory of the live run to add actors to.')
NUM_ACTORS = flags.DEFINE_integer('num_actors', 1, 'Actors to run in this process, one thread each.', lower_bound=1)
CALL_TIMEOUT_S = flags.DEFINE_float('call_timeout_s', 30.0, 'Timeout of each call to the learner.', lower_bound=0.1)
REJOIN_TIMEOUT_S = flags.DEFINE_float('rejoin_timeout_s', 300.0, 'How long the actors retry (with backoff) a '
                                      'learner that stopped answering, for the run to come back (a partition, a '
                                      'relaunch), before they stop.', lower_bound=0.0)
POLL_S = 2.0  # How often the learner is asked whether it has finished.
JOIN_S = 30.0  # How long stopping actors may take to hand over their last transitions.


def main(argv):
  run = attach_from_command_line(argv, RUN_DIR.value, CALL_TIMEOUT_S.value, REJOIN_TIMEOUT_S.value)
  config = run.config
  layout = config.layout
  actor_ids = claim_actor_ids(layout, NUM_ACTORS.value)
  attempt = max(layout.attempts(), 1)  # The live launch's: each record says which launch it was acted in.
  stop = threading.Event()
  run.should_stop = stop.is_set
  # Parameters cross the wire only when the learner has published newer ones; the actor threads share them.
  get_params = pull_when_newer(lambda held_step: run.call('get_params', held_step))
  errors, why = [], []  # What failed; why the actors stopped (the first reason).

  def params_source():
    try:
      return get_params()
    except LearnerGone as e:
      why.append(_why(e))
      stop.set()
      return None  # The actor stops.

  def run_is_live() -> bool:
    try:
      return not run.call('is_finished')
    except LearnerGone:
      return False

  def act(actor_id: int) -> None:
    try:
      program_lib.run_actor(config, actor_id, attempt, params_source, reverb.Client(run.replay_address),
                            should_stop=stop.is_set, replay_address=lambda: run.replay_address)
    except Exception as e:  # pylint: disable=broad-except  Said, and the others stop too.
      if not stop.is_set() and run_is_live():  # Not the replay going away with the run.
        errors.append(f'actor {actor_id}: {e!r}')
      why.append(f'actor {actor_id} stopped ({e!r})')
      stop.set()

  threads = [threading.Thread(target=act, args=(actor_id,), name=f'actor-{actor_id}', daemon=True)
             for actor_id in actor_ids]
  for thread in threads:
    thread.start()
  print(f'Actors {", ".join(map(str, actor_ids))} attached to {config.run_dir} (launch {attempt}); their '
        f'episodes go to {layout.stream(RunLayout.ACTORS)}/. Ctrl-C stops them, not the run.', flush=True)
  try:
    while not stop.wait(POLL_S) and any(thread.is_alive() for thread in threads):
      if run.call('is_finished'):
        why.append('the learner finished')
        break
  except LearnerGone as e:
    why.append(_why(e))
  except KeyboardInterrupt:
    why.append('stopped; the run is untouched')
  stop.set()
  deadline = time.time() + JOIN_S
  for thread in threads:
    thread.join(timeout=max(deadline - time.time(), 0.0))
  if errors:
    raise SystemExit(f'Attached actors failed ({"; ".join(errors)}).')
  print(f'Actors {", ".join(map(str, actor_ids))}: {(why or ["every actor stopped"])[0]}.', flush=True)


def _why(gone: LearnerGone) -> str:
  return 'the run finished' if isinstance(gone, RunFinished) else f'the run stopped ({gone})'


if __name__ == '__main__':
  app.run(main)
