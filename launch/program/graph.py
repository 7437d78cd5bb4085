"""The Launchpad program graph (see WORKSPACE.md for the picture).

    actor_i --(Reverb gRPC: insert transitions)--> replay
    actor_i --(Courier: get_params)--------------> learner
    learner --(Reverb gRPC: sample batches)------> replay
    evaluator --(Courier: get_step, is_finished)-> learner; <--(probe_snapshots/ files)-- learner
    evaluator --(Reverb gRPC: sample the probe set, once)-> replay
    evaluation --(Courier: get_params, get_step, is_finished)-> learner
    attached evaluators (launch.attach_evaluator) and actors (launch.attach_actors)
      -> learner, replay, as above, at the addresses actor 0 publishes in the run directory

Every server listens on `--bind_host` only, the nodes dialling each other
there (`launch.program.network`).

Each node class below is a thin shell: it builds the Launchpad-free piece
(`agents.Learner`, `agents.Actor`, `probes.Evaluator`) from the experiment
config and connects it to its peers. The program stops itself: once training
is over, the learner's node runs the one coordinator
(`launch.program.completion.Coordinator`), which calls `lp.stop()` when the
records say no work is left (the final probe and evaluation written, or the
evaluator disabled in this launch); the other nodes finish their part and wait
for the stop. Whether the run finished is the launcher's to say, from the same
records, once the launch has ended (`completion.program_completed`).
"""

from concurrent import futures
import json
import socket
import time
from typing import Callable, List, Optional, Tuple

from absl import logging
import launchpad as lp
import numpy as np
import reverb

import environments
from agents import storage
from agents.actor import Actor, actor_seed, environment_seeds
from agents.builder import make_agent
from agents.learner import Diverged, Learner, pull_when_newer, resolve_updates_per_call
from agents.types import Params, StopRequested
from environments import atari_scores
from launch.program import completion
from launch.program import network
from launch.program import placement
from launch.program import replay
from probes.evaluation import EpisodeEvaluator, FrameSchedule, action_repeat, evaluation_seed
from launch.program import supervisor
from probes.records.run_dir import ExperimentConfig, RunLayout, reporting_full_disk
from probes.evaluator import WRITER as EVALUATOR_WRITER, Evaluator, ParamsSource


def _stop_requested() -> bool:
  return lp.stop_event().is_set()


def until_stopped(call: Callable[..., futures.Future], should_stop: Callable[[], bool],
                  poll_seconds: float = 1.0) -> Callable:
  """A Courier call (`client.futures.method`) that waits for its answer only until a stop request.

  A Courier client waits for a dead server forever; a node whose peer died
  must still stop when asked. On a stop request it raises `StopRequested`.
  """

  def call_until_stopped(*args):
    future = call(*args)
    while True:
      try:
        return future.result(timeout=poll_seconds)
      except futures.TimeoutError:
        if should_stop():
          future.cancel()
          raise StopRequested('a stop was requested while waiting for the learner') from None

  return call_until_stopped


def environment_specs(config: ExperimentConfig) -> environments.Specs:
  """(observation spec, number of actions) of the experiment's environment, as its family declares them: the
  learner and the evaluator size their agent without building an environment (an MDP's dataset is not loaded)."""
  return environments.specs(config.env, **config.env_options())


class CourierNode(network.OnHost, lp.CourierNode):
  """Launchpad's Courier node, its address on the run's `--bind_host` (`.on_host(...)`)."""


class LearnerNode:
  """Serves parameters over Courier while training on Reverb batches."""

  def __init__(self, config: ExperimentConfig, attempt: int, replay_client: reverb.Client):
    self._config = config
    self._attempt = attempt
    observation_spec, num_actions = environment_specs(config)
    agent = make_agent(config.agent, num_actions)
    dummy = np.zeros(observation_spec.shape, observation_spec.dtype)
    updates_per_call = resolve_updates_per_call(config.launch.updates_per_call, agent.network, dummy)
    iterator = replay.batch_iterator(replay_client.server_address, config.agent.batch_size,
                                    should_stop=_stop_requested, prefetch=2 * updates_per_call)
    self._learner = Learner(
        agent, config.agent, iterator, dummy,
        seed=config.seed, checkpoint_dir=config.layout.checkpoints,
        checkpoint_every=config.checkpoint_every,
        logger=config.layout.logger(RunLayout.LEARNER, 'learner', extra={'attempt': attempt}),
        log_every=config.log_every,
        # The evaluator's probe points as files, which outlive the evaluator's process (and a relaunch).
        snapshot_dir=config.layout.probe_snapshots, snapshot_every=config.probe_every,
        measure_after_interventions=config.probe.after_interventions, updates_per_call=updates_per_call)
    self._finished = False

  def get_params(self, held_step: Optional[int] = None) -> Optional[Tuple[int, Params]]:
    return self._learner.get_params(held_step)

  def get_snapshot(self) -> Tuple[int, Params, Params]:
    return self._learner.get_snapshot()

  def get_initial_snapshot(self) -> Tuple[int, Params, Params]:
    return self._learner.get_initial_snapshot()

  def get_step(self) -> int:
    return self._learner.get_step()

  def is_finished(self) -> bool:
    return self._finished

  def run(self) -> None:
    try:
      with reporting_full_disk(self._config.layout, 'learner'):  # A full disk: the launcher names it.
        self._learner.run(self._config.max_learner_steps, should_stop=_stop_requested)
      logging.info('Learner finished at step %d.', self._learner.step_count)
    except Diverged:  # Logged and recorded by the learner; the evaluator still probes the last finite state.
      pass
    self._finished = True
    if completion.Coordinator(self._config, self._attempt).wait_until_over(_stop_requested):
      logging.info('The run is over: stopping the program.')
      lp.stop()


def actor_progress(layout: RunLayout, actor_id: int) -> Tuple[List[int], int]:
  """(episodes of each of its environments, env_steps) at an actor's last logged episodes: where it goes on after
  a restart or relaunch."""
  mine = [r for r in layout.records(RunLayout.ACTORS, writer=actor_writer(actor_id)) if r.get('actor_id') == actor_id]
  if not mine:
    return [], 0
  last = {r.get('env_index', 0): r['episode'] for r in mine}
  return [last.get(index, 0) for index in range(max(last) + 1)], mine[-1]['env_steps']


def actor_writer(actor_id: int) -> str:
  """The name of an actor's own record files."""
  return f'actor_{actor_id}'


def run_actor(config: ExperimentConfig, actor_id: int, attempt: int,
              params_source: Callable[[], Optional[Tuple[int, Params]]],
              replay_client: reverb.Client, should_stop: Callable[[], bool], restart: int = 0,
              replay_address: Optional[Callable[[], str]] = None) -> None:
  """Acts as actor `actor_id` of the run until `should_stop()` or `params_source()` returns None.

  Shared by the program's actors and attached ones (`launch.attach_actors`);
  its seed is new for each launch and restart, its counters go on from the
  actor's last logged episode. Its inserts wait while the replay does not
  answer (Reverb's writer reconnects), and `params_source` while the learner
  does not (the program's: Courier waits for its peer; attached ones retry
  with backoff, `launch.program.attach.LiveRun`): through a partition or a restart in
  place the actor rejoins. `replay_address` (attached actors) gives the
  replay's address as a relaunch republishes it (`replay.ReverbSink`).
  """
  seed = actor_seed(config.seed, actor_id, attempt, restart)
  envs = [environments.make(config.env, seed=env_seed, **config.env_options())
          for env_seed in environment_seeds(seed, config.launch.envs_per_actor)]
  episodes, env_steps = actor_progress(config.layout, actor_id)
  logging.info('Actor %d on %d x %s, data: %s; restart %d, going on from episodes %s (%d env steps).', actor_id,
               len(envs), config.env, envs[0].data_source, restart, episodes, env_steps)
  agent = make_agent(config.agent, envs[0].action_spec().num_values)
  sink = replay.ReverbSink(replay_client, should_stop=should_stop, address=replay_address)
  logger = config.layout.logger(RunLayout.ACTORS, actor_writer(actor_id),
                                extra={'actor_id': actor_id, 'attempt': attempt}, tensorboard=actor_id == 0)
  actor = Actor(agent, config.agent, envs, params_source=params_source, add=sink, seed=seed,
                params_update_period=config.actor_params_update_period, logger=logger, episodes=episodes,
                env_steps=env_steps)
  actor.run(should_stop=should_stop)
  sink.close()  # Its last transitions reach the replay (and its final checkpoint).
  logger.close()


class ActorNode:

  def __init__(self, config: ExperimentConfig, attempt: int, actor_id: int, learner, replay_client: reverb.Client):
    self._config = config
    self._attempt = attempt
    self._actor_id = actor_id
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    if self._actor_id == 0:  # Actors hold handles to both the learner and the replay.
      publish_addresses(self._config, self._learner.address, self._replay_client.server_address)
    pull = pull_when_newer(until_stopped(self._learner.futures.get_params, lp.stop_event().is_set))

    def params_source():
      try:
        return pull()
      except StopRequested:
        return None  # The actor stops.

    with reporting_full_disk(self._config.layout, actor_writer(self._actor_id)):
      run_actor(self._config, self._actor_id, self._attempt, params_source, self._replay_client,
                should_stop=_stop_requested, restart=supervisor.node_restart())


def make_evaluator(config: ExperimentConfig, out: RunLayout, params_source: ParamsSource, replay_address: str,
                   seed: int, reference_probes: Optional[RunLayout] = None,
                   initial_source: Optional[ParamsSource] = None, attempt: int = 1) -> Evaluator:
  """The evaluator of a run, writing the files of `out` (the built-in one: the run directory's).

  Every evaluator of a run reads the run's probe set (drawn by the first to need it).
  """
  _, num_actions = environment_specs(config)
  return Evaluator.for_run(config, make_agent(config.agent, num_actions), params_source=params_source,
                           replay_source=replay.ReverbSource(replay_address), out=out, seed=seed,
                           reference_probes=reference_probes, initial_source=initial_source, attempt=attempt)


def publish_addresses(config: ExperimentConfig, learner_address: str, replay_address: str) -> None:
  """Writes where the live run's learner and replay answer, for `launch.attach_evaluator`."""
  if config.launch.launch_type == 'vertex_ai':  # A replica's address is its host's, from Vertex AI's CLUSTER_SPEC.
    address = lambda node: node
  else:
    address = lambda node: network.published(node, config.launch.bind_host, config.launch.publish_host)
  record = {'learner': address(learner_address), 'replay': address(replay_address), 'host': socket.gethostname(),
            'bind_host': config.launch.bind_host, 'launch_type': config.launch.launch_type, 'written_at': time.time()}
  storage.write_atomically(config.layout.addresses, json.dumps(record, indent=2).encode())


def withdraw_addresses(config: ExperimentConfig) -> None:
  """Marks `addresses.json` stale (`stopped_at`) once the launch's nodes have stopped: nothing answers there."""
  try:
    record = json.loads(storage.path(config.layout.addresses).read_text())
  except (OSError, ValueError):
    return  # None published (the actors never started), or unreadable: nothing to withdraw.
  storage.write_atomically(config.layout.addresses, json.dumps({**record, 'stopped_at': time.time()},
                                                               indent=2).encode())


class EvaluatorNode:

  def __init__(self, config: ExperimentConfig, attempt: int, learner, replay_client: reverb.Client):
    self._config = config
    self._attempt = attempt
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    config = self._config
    should_stop = lp.stop_event().is_set
    learner = {name: until_stopped(getattr(self._learner.futures, name), should_stop)
               for name in ('get_snapshot', 'get_step', 'is_finished')}
    evaluator = make_evaluator(config, config.layout, learner['get_snapshot'],
                               self._replay_client.server_address, seed=config.seed, attempt=self._attempt)
    # The learner writes the probe points' snapshots (`snapshot_every`); they wait in the run directory.
    with reporting_full_disk(config.layout, EVALUATOR_WRITER):
      evaluator.run(config.probe_every, learner_step=learner['get_step'], learner_finished=learner['is_finished'],
                    should_stop=should_stop, take_snapshots=False)
    lp.wait_for_stop()  # The coordinator (in the learner's node) reads the records written and stops the program.


class EvaluationNode:
  """Evaluation episodes every --eval_every_frames training frames (probes/evaluation.py) into the evaluation stream."""

  def __init__(self, config: ExperimentConfig, attempt: int, learner):
    self._config = config
    self._attempt = attempt
    self._learner = learner

  def run(self) -> None:
    config, layout = self._config, self._config.layout
    learner = {name: until_stopped(getattr(self._learner.futures, name), _stop_requested)
               for name in ('get_params', 'get_step', 'is_finished')}
    seed = evaluation_seed(config.seed, self._attempt)
    env = environments.make(config.env, seed=seed, **config.env_options())
    schedule = FrameSchedule(config.evaluation.every_frames, config.replay, config.agent.batch_size,
                             action_repeat(env))
    # A relaunch goes on after the last evaluation written (the learner may repeat steps since its checkpoint).
    last = max((r['learner_step'] for r in layout.records(RunLayout.EVALUATION)), default=None)
    evaluator = EpisodeEvaluator(
        make_agent(config.agent, env.action_spec().num_values), config.agent, env, config.evaluation, schedule,
        logger=layout.logger(RunLayout.EVALUATION, 'evaluation', extra={'attempt': self._attempt}), seed=seed,
        game=atari_scores.game_of(config.env))
    evaluator.run(learner['get_step'], learner['get_params'], learner['is_finished'], _stop_requested,
                  last_evaluated=last)
    lp.wait_for_stop()  # The coordinator (in the learner's node) reads the records written and stops the program.


def make_program(config: ExperimentConfig, attempt: int = 1) -> lp.Program:
  """The program of one launch of the run; `attempt` (1, 2, ... per launch) is in every record it writes."""
  observation_spec, _ = environment_specs(config)
  host = config.launch.bind_host
  program = lp.Program(name='plasticity')
  with program.group('replay'):
    replay_handle = program.add_node(replay.ReplayNode(
        lambda: replay.make_tables(config.replay, observation_spec), config.layout,
        config.replay.checkpoint_every_minutes).on_host(host))
  with program.group('learner'):
    learner = program.add_node(CourierNode(LearnerNode, config, attempt, replay_handle).on_host(host))
  with program.group('actor'):
    for actor_id in range(config.launch.num_actors):
      program.add_node(CourierNode(ActorNode, config, attempt, actor_id, learner, replay_handle)
                       .on_host(host))
  if config.evaluation.enabled:
    with program.group('evaluation'):
      program.add_node(CourierNode(EvaluationNode, config, attempt, learner).on_host(host))
  if config.probe_every > 0:
    with program.group('evaluator'):
      program.add_node(CourierNode(EvaluatorNode, config, attempt, learner, replay_handle)
                       .on_host(host))
  return program


def local_resources(config: ExperimentConfig) -> dict:
  """Per-group process environments for local_mp: replay and actors on the CPU, learner and evaluator placed by
  `--learner_device` / `--evaluator_device` (launch/program/placement.py)."""
  from launchpad.nodes.python import local_multi_processing
  return {group: local_multi_processing.PythonProcess(env=env) for group, env in placement.run_envs(config).items()}
