"""The builder that knows the agent: turns an `AgentConfig` into its pure parts.

The learner node, the actor nodes, the evaluator and the unit tests all build
their network, encoding and optimizer here, so they cannot disagree.
"""

from typing import List, NamedTuple

import optax

from agents import encodings, interventions, networks, optimizers
from agents.config import AgentConfig
from agents.learning import TargetUpdateHook
from agents.types import Network


class AgentParts(NamedTuple):
  network: Network
  encoding: encodings.Encoding
  optimizer: optax.GradientTransformation
  target_update_hooks: List[TargetUpdateHook]
  num_actions: int


def make_optimizer(config: AgentConfig) -> optax.GradientTransformation:
  """The agent's optimizer preset with the interventions' options (the probe uses it too)."""
  options = {}
  for name in config.interventions:
    options.update(interventions.INTERVENTIONS[name].optimizer_options(config))
  return optimizers.make_optimizer(optimizers.OptimizerConfig(
      name=config.optimizer, learning_rate=config.learning_rate, **options))


def make_agent(config: AgentConfig, num_actions: int) -> AgentParts:
  interventions.validate(config.interventions)
  encoding = encodings.make_encoding(config.output, encodings.EncodingConfig(
      td_error_clip=config.td_error_clip, num_bins=config.num_bins, support_min=config.support_min,
      support_max=config.support_max))
  arch_options = {}
  for name in config.interventions:
    arch_options.update(interventions.INTERVENTIONS[name].arch_options(config))
  network = networks.make_network(config.arch, networks.ArchConfig(
      num_outputs=num_actions * encoding.outputs_per_action,
      width_multiplier=config.width_multiplier, **arch_options))
  optimizer = make_optimizer(config)
  hooks = [interventions.INTERVENTIONS[name].target_update_hook(config, optimizer)
           for name in config.interventions if interventions.INTERVENTIONS[name].target_update_hook]
  return AgentParts(network, encoding, optimizer, hooks, num_actions)
