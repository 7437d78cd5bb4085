"""The Launchpad program graph (see WORKSPACE.md for the picture).

    actor_i --(Reverb gRPC: insert transitions)--> replay
    actor_i --(Courier: get_params)--------------> learner
    learner --(Reverb gRPC: sample batches)------> replay
    evaluator --(Courier: get_snapshot, get_step, is_finished)-> learner
    evaluator --(Reverb gRPC: sample the probe set, once)-> replay
    attached evaluators (launch.attach_evaluator) -> learner, replay, as above,
      at the addresses actor 0 publishes in the run directory

Each node class below is a thin shell: it builds the Launchpad-free piece
(`agents.Learner`, `agents.Actor`, `probes.Evaluator`) from the experiment
config and connects it to its peers. The program stops itself: the evaluator
(or, with no evaluator, the learner) calls `lp.stop()` once the learner has
reached `max_learner_steps` and the final probe is written.
"""

from concurrent import futures
import json
import os
import socket
import time
from typing import Callable, Optional, Tuple

from absl import logging
import launchpad as lp
import numpy as np
import reverb

import environments
from agents.actor import Actor, actor_seed, environment_seeds
from agents.builder import make_agent
from agents.learner import Diverged, Learner
from agents.types import Params, StopRequested
from launch import replay
from probes.run_dir import ExperimentConfig, RunLayout
from probes.evaluator import Evaluator, ParamsSource

# Nodes that must keep JAX off any accelerator: only the learner may use it.
CPU_ONLY_ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}


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


def environment_specs(config: ExperimentConfig):
  """(observation spec, number of actions) of the experiment's environment."""
  env = environments.make(config.env, seed=config.seed, **config.env_options())
  return env.observation_spec(), env.action_spec().num_values


class LearnerNode:
  """Serves parameters over Courier while training on Reverb batches."""

  def __init__(self, config: ExperimentConfig, attempt: int, replay_client: reverb.Client):
    self._config = config
    observation_spec, num_actions = environment_specs(config)
    agent = make_agent(config.agent, num_actions)
    iterator = replay.batch_iterator(replay_client.server_address, config.agent.batch_size,
                                    should_stop=_stop_requested)
    self._learner = Learner(
        agent, config.agent, iterator, np.zeros(observation_spec.shape, observation_spec.dtype),
        seed=config.seed, checkpoint_dir=config.layout.checkpoints,
        checkpoint_every=config.checkpoint_every,
        logger=config.layout.logger(RunLayout.LEARNER, extra={'attempt': attempt}),
        log_every=config.log_every)
    self._finished = False

  def get_params(self) -> Tuple[int, Params]:
    return self._learner.get_params()

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
      self._learner.run(self._config.max_learner_steps, should_stop=_stop_requested)
      logging.info('Learner finished at step %d.', self._learner.step_count)
    except Diverged:  # Logged and recorded by the learner; the evaluator still probes the last finite state.
      pass
    self._finished = True
    if self._config.probe_every <= 0 and not _stop_requested():  # Not when stopped by another's failure.
      lp.stop()
    else:
      lp.wait_for_stop()


class ActorNode:

  def __init__(self, config: ExperimentConfig, attempt: int, actor_id: int, learner, replay_client: reverb.Client):
    self._config = config
    self._attempt = attempt
    self._actor_id = actor_id
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    config = self._config
    if self._actor_id == 0:  # Actors hold handles to both the learner and the replay.
      publish_addresses(config, self._learner.address, self._replay_client.server_address)
    seed = actor_seed(config.seed, self._actor_id, self._attempt)
    envs = [environments.make(config.env, seed=env_seed, **config.env_options())
            for env_seed in environment_seeds(seed, config.envs_per_actor)]
    logging.info('Actor %d on %d x %s, data: %s', self._actor_id, len(envs), config.env, envs[0].data_source)
    agent = make_agent(config.agent, envs[0].action_spec().num_values)
    get_params = until_stopped(self._learner.futures.get_params, lp.stop_event().is_set)

    def params_source():
      try:
        return get_params()
      except StopRequested:
        return None  # The actor stops.

    sink = replay.ReverbSink(self._replay_client, should_stop=_stop_requested)
    logger = config.layout.logger(RunLayout.ACTORS, extra={'actor_id': self._actor_id, 'attempt': self._attempt},
                                  tensorboard=self._actor_id == 0)
    actor = Actor(agent, config.agent, envs, params_source=params_source, add=sink, seed=seed,
                  params_update_period=config.actor_params_update_period, logger=logger)
    actor.run(should_stop=_stop_requested)
    sink.close()  # Its last transitions reach the replay (and its final checkpoint).


def make_evaluator(config: ExperimentConfig, out: RunLayout, params_source: ParamsSource, replay_address: str,
                   seed: int, reference_probes: Optional[str] = None,
                   initial_source: Optional[ParamsSource] = None, attempt: int = 1) -> Evaluator:
  """The evaluator of a run, writing the files of `out` (the built-in one: the run directory's).

  Every evaluator of a run reads the run's probe set (drawn by the first to need it).
  """
  _, num_actions = environment_specs(config)
  return Evaluator(
      make_agent(config.agent, num_actions), config.probe, params_source=params_source,
      replay_source=replay.ReverbSource(replay_address), out=out,
      probe_set_path=config.layout.probe_set,
      diagnostics_config=config.diagnostics if config.diagnostics_enabled else None, seed=seed,
      discount=config.agent.discount, reference_probes=reference_probes, initial_source=initial_source,
      probe_logger=out.logger(RunLayout.PROBES, extra={'attempt': attempt}),
      diagnostics_logger=out.logger(RunLayout.DIAGNOSTICS, extra={'attempt': attempt}))


def publish_addresses(config: ExperimentConfig, learner_address: str, replay_address: str) -> None:
  """Writes where the live run's learner and replay answer, for `launch.attach_evaluator`."""
  record = {'learner': learner_address, 'replay': replay_address, 'host': socket.gethostname(),
            'launch_type': config.launch_type, 'written_at': time.time()}
  path = config.layout.addresses
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(path + '.tmp', path)


class EvaluatorNode:

  def __init__(self, config: ExperimentConfig, attempt: int, learner, replay_client: reverb.Client):
    self._config = config
    self._attempt = attempt
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    config = self._config
    should_stop = lp.stop_event().is_set  # The event itself: the snapshot thread reads it too.
    learner = {name: until_stopped(getattr(self._learner.futures, name), should_stop)
               for name in ('get_snapshot', 'get_initial_snapshot', 'get_step', 'is_finished')}
    evaluator = make_evaluator(config, config.layout, learner['get_snapshot'],
                               self._replay_client.server_address, seed=config.seed,
                               initial_source=learner['get_initial_snapshot'], attempt=self._attempt)
    evaluator.run(config.probe_every, learner_step=learner['get_step'], learner_finished=learner['is_finished'],
                  should_stop=should_stop)
    if not should_stop():  # The work is done; a stop already under way (a failure elsewhere) needs no help.
      lp.stop()


def make_program(config: ExperimentConfig, attempt: int = 1) -> lp.Program:
  """The program of one launch of the run; `attempt` (1, 2, ... per launch) is in every record it writes."""
  observation_spec, _ = environment_specs(config)
  program = lp.Program(name='plasticity')
  with program.group('replay'):
    replay_handle = program.add_node(replay.ReplayNode(
        lambda: replay.make_tables(config.replay, observation_spec), config.layout.replay_checkpoint,
        config.layout.replay_status, config.replay.checkpoint_every_minutes))
  with program.group('learner'):
    learner = program.add_node(lp.CourierNode(LearnerNode, config, attempt, replay_handle))
  with program.group('actor'):
    for actor_id in range(config.num_actors):
      program.add_node(lp.CourierNode(ActorNode, config, attempt, actor_id, learner, replay_handle))
  if config.probe_every > 0:
    with program.group('evaluator'):
      program.add_node(lp.CourierNode(EvaluatorNode, config, attempt, learner, replay_handle))
  return program


def local_resources(config: ExperimentConfig) -> dict:
  """Per-group process environments for local_mp: only the learner may see a GPU."""
  from launchpad.nodes.python import local_multi_processing
  groups = ['replay', 'actor', 'evaluator']
  resources = {group: local_multi_processing.PythonProcess(env=dict(CPU_ONLY_ENV)) for group in groups}
  resources['learner'] = local_multi_processing.PythonProcess(env={})
  return resources
