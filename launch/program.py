"""The Launchpad program graph (see WORKSPACE.md for the picture).

    actor_i --(Reverb gRPC: insert transitions)--> replay
    actor_i --(Courier: get_params)--------------> learner
    learner --(Reverb gRPC: sample batches)------> replay
    evaluator --(Courier: get_params, is_finished)-> learner
    evaluator --(Reverb gRPC: sample probe inputs)-> replay
    attached evaluators (launch.attach_evaluator) -> learner, replay, as above,
      at the addresses actor 0 publishes in the run directory

Each node class below is a thin shell: it builds the Launchpad-free piece
(`agents.Learner`, `agents.Actor`, `probes.Evaluator`) from the experiment
config and connects it to its peers. The program stops itself: the evaluator
(or, with no evaluator, the learner) calls `lp.stop()` once the learner has
reached `max_learner_steps` and the final probe is written.
"""

import json
import os
import socket
import time
from typing import Callable, Tuple

from absl import logging
import launchpad as lp
import numpy as np
import reverb

import environments
from agents.actor import Actor
from agents.builder import make_agent
from agents.learner import Learner
from agents.types import Params
from launch import replay
from launch.experiment import ExperimentConfig
from launch.loggers import JsonlLogger
from probes.evaluator import Evaluator

# Where a live run's learner and replay answer (see launch/attach_evaluator.py).
ADDRESSES_FILE = 'addresses.json'

# Nodes that must keep JAX off any accelerator: only the learner may use it.
CPU_ONLY_ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}


def _stop_requested() -> bool:
  return lp.stop_event().is_set()


def environment_specs(config: ExperimentConfig):
  """(observation spec, number of actions) of the experiment's environment."""
  env = environments.make(config.env, seed=config.seed, **config.env_options())
  return env.observation_spec(), env.action_spec().num_values


class LearnerNode:
  """Serves parameters over Courier while training on Reverb batches."""

  def __init__(self, config: ExperimentConfig, replay_client: reverb.Client):
    self._config = config
    observation_spec, num_actions = environment_specs(config)
    agent = make_agent(config.agent, num_actions)
    iterator = replay.batch_iterator(replay_client.server_address, config.agent.batch_size,
                                    should_stop=_stop_requested)
    self._learner = Learner(
        agent, config.agent, iterator, np.zeros(observation_spec.shape, observation_spec.dtype),
        seed=config.seed, checkpoint_dir=config.path('checkpoints'),
        checkpoint_every=config.checkpoint_every, logger=JsonlLogger(config.run_dir, 'learner'),
        log_every=config.log_every)
    self._finished = False

  def get_params(self) -> Tuple[int, Params]:
    return self._learner.get_params()

  def get_step(self) -> int:
    return self._learner.get_step()

  def is_finished(self) -> bool:
    return self._finished

  def run(self) -> None:
    self._learner.run(self._config.max_learner_steps, should_stop=_stop_requested)
    self._finished = True
    logging.info('Learner finished at step %d.', self._learner.step_count)
    if self._config.probe_every <= 0:
      lp.stop()
    else:
      lp.wait_for_stop()


class ActorNode:

  def __init__(self, config: ExperimentConfig, actor_id: int, learner, replay_client: reverb.Client):
    self._config = config
    self._actor_id = actor_id
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    config = self._config
    if self._actor_id == 0:  # Actors hold handles to both the learner and the replay.
      publish_addresses(config, self._learner.address, self._replay_client.server_address)
    seed = config.seed * 1000 + self._actor_id
    env = environments.make(config.env, seed=seed, **config.env_options())
    logging.info('Actor %d on %s, data: %s', self._actor_id, config.env, getattr(env, 'data_source', 'n/a'))
    agent = make_agent(config.agent, env.action_spec().num_values)
    actor = Actor(agent, env, config.agent.epsilon, params_source=self._learner.get_params,
                  add=replay.ReverbSink(self._replay_client, should_stop=_stop_requested), seed=seed,
                  reward_clip=config.agent.reward_clip,
                  params_update_period=config.actor_params_update_period,
                  logger=JsonlLogger(config.run_dir, 'actors', extra={'actor_id': self._actor_id},
                                     tensorboard=self._actor_id == 0))
    actor.run(should_stop=_stop_requested)


def make_evaluator(config: ExperimentConfig, out_dir: str, params_source: Callable[[], Tuple[int, Params]],
                   replay_address: str, seed: int) -> Evaluator:
  """The evaluator of a run, writing under `out_dir` (the built-in one writes in the run directory)."""
  _, num_actions = environment_specs(config)
  return Evaluator(
      make_agent(config.agent, num_actions), config.probe, params_source=params_source,
      observation_source=lambda n: replay.sample_observations(replay_address, n), out_dir=out_dir,
      diagnostics_config=config.diagnostics if config.diagnostics_enabled else None, seed=seed)


def publish_addresses(config: ExperimentConfig, learner_address: str, replay_address: str) -> None:
  """Writes where the live run's learner and replay answer, for `launch.attach_evaluator`."""
  record = {'learner': learner_address, 'replay': replay_address, 'host': socket.gethostname(),
            'launch_type': config.launch_type, 'written_at': time.time()}
  path = config.path(ADDRESSES_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(record, f, indent=2)
  os.replace(path + '.tmp', path)


class EvaluatorNode:

  def __init__(self, config: ExperimentConfig, learner, replay_client: reverb.Client):
    self._config = config
    self._learner = learner
    self._replay_client = replay_client

  def run(self) -> None:
    config = self._config
    evaluator = make_evaluator(config, config.run_dir, self._learner.get_params,
                               self._replay_client.server_address, seed=config.seed)
    evaluator.run(config.probe_every, learner_step=self._learner.get_step,
                  learner_finished=self._learner.is_finished, should_stop=_stop_requested)
    lp.stop()


def make_program(config: ExperimentConfig) -> lp.Program:
  observation_spec, _ = environment_specs(config)
  program = lp.Program(name='plasticity')
  with program.group('replay'):
    replay_handle = program.add_node(lp.ReverbNode(
        lambda: replay.make_tables(config.replay, observation_spec)))
  with program.group('learner'):
    learner = program.add_node(lp.CourierNode(LearnerNode, config, replay_handle))
  with program.group('actor'):
    for actor_id in range(config.num_actors):
      program.add_node(lp.CourierNode(ActorNode, config, actor_id, learner, replay_handle))
  if config.probe_every > 0:
    with program.group('evaluator'):
      program.add_node(lp.CourierNode(EvaluatorNode, config, learner, replay_handle))
  return program


def local_resources(config: ExperimentConfig) -> dict:
  """Per-group process environments for local_mp: only the learner may see a GPU."""
  from launchpad.nodes.python import local_multi_processing
  groups = ['replay', 'actor', 'evaluator']
  resources = {group: local_multi_processing.PythonProcess(env=dict(CPU_ONLY_ENV)) for group in groups}
  resources['learner'] = local_multi_processing.PythonProcess(env={})
  return resources
