"""Optimizer presets: a registry of small functions returning Optax transforms.

The agent and the plasticity probe build their optimizer from the same preset
(the paper's eq. 4 uses "the optimizer used by the network on its primary
learning objective").
"""

import dataclasses
from typing import Callable

import optax

from environments.registry import Registry


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = 'adam'
  learning_rate: float = 1e-3
  # Weight decay as an l2 penalty added to the gradient (before the preset's
  # scaling, exactly as a penalty in the loss would be); 0 disables it.
  l2_penalty: float = 0.0


OptimizerBuilder = Callable[[OptimizerConfig], optax.GradientTransformation]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry('optimizer', '--optimizer')
register = OPTIMIZERS.register


@register('adam')
def adam(config: OptimizerConfig) -> optax.GradientTransformation:
  """Appendix A.1's default Adam: b1 0.9, b2 0.999, eps 1e-9, eps_root 0."""
  return optax.adam(config.learning_rate, b1=0.9, b2=0.999, eps=1e-9, eps_root=0.0)


@register('adam_tuned')
def adam_tuned(config: OptimizerConfig) -> optax.GradientTransformation:
  """Section 3.1's robust Adam: faster second-moment decay and a large eps_root."""
  return optax.adam(config.learning_rate, b1=0.9, b2=0.9, eps=1e-9, eps_root=1e-3)


@register('adam_rainbow')
def adam_rainbow(config: OptimizerConfig) -> optax.GradientTransformation:
  """Rainbow's Adam (Hessel et al. 2018, table 1): eps 1.5e-4; their learning rate, 6.25e-5, is --learning_rate."""
  return optax.adam(config.learning_rate, b1=0.9, b2=0.999, eps=1.5e-4, eps_root=0.0)


@register('rmsprop')
def rmsprop(config: OptimizerConfig) -> optax.GradientTransformation:
  """DQN Zoo's double-DQN optimizer (double_q/run_atari.py, lr 2.5e-4 there): centred RMSProp, no gradient clip."""
  return optax.rmsprop(config.learning_rate, decay=0.95, eps=0.01 / 32**2, centered=True)


@register('rmsprop_clipped')
def rmsprop_clipped(config: OptimizerConfig) -> optax.GradientTransformation:
  """`rmsprop` behind a global-norm clip at 10: the clip DQN Zoo puts in front of Adam in c51, qrdqn and rainbow.

  No preset uses it; it exists to measure what that clip changes for double DQN.
  """
  return optax.chain(optax.clip_by_global_norm(10.0), rmsprop(config))


@register('sgd')
def sgd(config: OptimizerConfig) -> optax.GradientTransformation:
  return optax.sgd(config.learning_rate)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  optimizer = OPTIMIZERS.get(config.name)(config)
  if config.l2_penalty:
    optimizer = optax.chain(optax.add_decayed_weights(config.l2_penalty), optimizer)
  return optimizer
