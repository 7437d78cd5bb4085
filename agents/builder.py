"""The builder that knows the agent: turns an `AgentConfig` into its pure parts.

The learner node, the actor nodes, the evaluator and the unit tests all build
their network, encoding and optimizer here, so they cannot disagree.
"""

from typing import Dict, List, NamedTuple

import optax

from agents import encodings, interventions, networks, optimizers
from agents.config import AgentConfig
from agents.update import LossTerm, PeriodicAction, TargetUpdateHook
from agents.types import Network


class AgentParts(NamedTuple):
  network: Network
  encoding: encodings.Encoding
  optimizer: optax.GradientTransformation
  target_update_hooks: List[TargetUpdateHook]
  num_actions: int
  # The interventions' extra loss terms by intervention name (`make_update`) and periodic actions (the learner).
  loss_terms: Dict[str, LossTerm]
  periodic_actions: List[PeriodicAction]


def make_optimizer(config: AgentConfig) -> optax.GradientTransformation:
  """The agent's optimizer preset with the interventions' options (the probe uses it too)."""
  options = {}
  for name in config.interventions:
    options.update(interventions.INTERVENTIONS.get(name).optimizer_options(config))
  return optimizers.make_optimizer(optimizers.OptimizerConfig(
      name=config.optimizer, learning_rate=config.learning_rate, **options))


def make_agent(config: AgentConfig, num_actions: int) -> AgentParts:
  interventions.validate(config.interventions, config.arch)
  chosen = {name: interventions.INTERVENTIONS.get(name) for name in config.interventions}
  encoding = encodings.make_encoding(config.output, encodings.EncodingConfig(
      td_error_clip=config.td_error_clip, num_bins=config.num_bins, support_min=config.support_min,
      support_max=config.support_max))
  arch_options = {}
  for intervention in chosen.values():
    arch_options.update(intervention.arch_options(config))
  network = networks.make_network(config.arch, networks.ArchConfig(
      num_outputs=num_actions * encoding.outputs_per_action,
      width_multiplier=config.width_multiplier, **arch_options))
  optimizer = make_optimizer(config)
  hooks = [i.target_update_hook(config, network, optimizer) for i in chosen.values() if i.target_update_hook]
  loss_terms = {name: i.loss_term(config, network, optimizer) for name, i in chosen.items() if i.loss_term}
  periodic = [PeriodicAction(i.period(config), i.periodic_action(config, network, optimizer))
              for i in chosen.values() if i.periodic_action]
  return AgentParts(network, encoding, optimizer, hooks, num_actions, loss_terms, periodic)
