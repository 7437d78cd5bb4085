"""Output encodings: how network outputs become Q-values and a loss.

The learner computes the double-Q target once (`agents.update`) and hands the
chosen action's outputs and the scalar target to the encoding's loss, so adding
an encoding (two-hot, HL-Gauss) changes nothing else.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import rlax

from environments.registry import Registry


@dataclasses.dataclass(frozen=True)
class EncodingConfig:
  # Clip the TD error's gradient to +-td_error_clip (DQN Zoo uses 1/32 with
  # RMSProp); None leaves the squared TD error untouched.
  td_error_clip: Optional[float] = None
  # The categorical encodings' fixed support: with rewards clipped to [-1, 1]
  # and discount 0.99, |Q| <= 1 / (1 - 0.99) = 100, so [-100, 100] holds every
  # value; 101 bins make each 2 wide.
  num_bins: int = 101
  support_min: float = -100.0
  support_max: float = 100.0
  # HL-Gauss's Gaussian width as a multiple of the bin width (Farebrother et al. 2024).
  hl_gauss_sigma_ratio: float = 0.75


class Encoding(NamedTuple):
  outputs_per_action: int
  # [B, A * outputs_per_action] -> [B, A]
  q_values: Callable[[jax.Array], jax.Array]
  # (chosen action's outputs [B, outputs_per_action], target [B]) -> loss [B]
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  # (lowest, highest) value a categorical encoding can represent; None: any value (regression).
  support: Optional[Tuple[float, float]] = None


EncodingBuilder = Callable[[EncodingConfig], Encoding]
ENCODINGS: Registry[EncodingBuilder] = Registry('output encoding', '--output')
register = ENCODINGS.register


def _checked(encoding: Encoding) -> Encoding:
  """The encoding with its documented shapes asserted at trace time (as rlax does at its functions' boundaries)."""

  def q_values(outputs: jax.Array) -> jax.Array:
    chex.assert_rank(outputs, 2)
    chex.assert_is_divisible(outputs.shape[1], encoding.outputs_per_action)
    q = encoding.q_values(outputs)
    chex.assert_shape(q, (outputs.shape[0], outputs.shape[1] // encoding.outputs_per_action))
    return q

  def loss(action_outputs: jax.Array, target: jax.Array) -> jax.Array:
    chex.assert_shape(action_outputs, (None, encoding.outputs_per_action))
    chex.assert_shape(target, action_outputs.shape[:1])
    chex.assert_type(target, float)
    value = encoding.loss(action_outputs, target)
    chex.assert_shape(value, target.shape)
    return value

  return encoding._replace(q_values=q_values, loss=loss)


@register('regress')
def regress(config: EncodingConfig) -> Encoding:
  """One output per action is its Q-value; the loss is half the squared TD error."""

  def loss(action_outputs: jax.Array, target: jax.Array) -> jax.Array:
    td_error = target - action_outputs[:, 0]
    if config.td_error_clip is not None:
      td_error = rlax.clip_gradient(td_error, -config.td_error_clip, config.td_error_clip)
    return 0.5 * jnp.square(td_error)

  return Encoding(outputs_per_action=1, q_values=lambda outputs: outputs, loss=loss)


def support(config: EncodingConfig) -> jax.Array:
  """The bins' centres, [num_bins]."""
  return jnp.linspace(config.support_min, config.support_max, config.num_bins)


def _categorical(config: EncodingConfig, target_distribution: Callable[[jax.Array], jax.Array]) -> Encoding:
  """A softmax over the support per action: Q is its mean; the loss is cross-entropy to the target's distribution."""
  if config.num_bins < 2 or config.support_max <= config.support_min:
    raise ValueError(f'The categorical encodings need --num_bins >= 2 and --support_max > --support_min; got '
                     f'{config.num_bins} bins over [{config.support_min}, {config.support_max}].')
  centres = support(config)

  def q_values(outputs: jax.Array) -> jax.Array:
    logits = outputs.reshape(outputs.shape[0], -1, config.num_bins)
    return jnp.sum(jax.nn.softmax(logits) * centres, axis=-1)

  def loss(action_outputs: jax.Array, target: jax.Array) -> jax.Array:
    target_probs = jax.lax.stop_gradient(target_distribution(target))
    return -jnp.sum(target_probs * jax.nn.log_softmax(action_outputs), axis=-1)

  return Encoding(outputs_per_action=config.num_bins, q_values=q_values, loss=loss,
                  support=(config.support_min, config.support_max))


@register('two_hot')
def two_hot(config: EncodingConfig) -> Encoding:
  """The scalar target as the two-hot distribution on its neighbouring bins (`rlax.transform_to_2hot`)."""
  return _categorical(config, lambda target: rlax.transform_to_2hot(
      target, config.support_min, config.support_max, config.num_bins))


def hl_gauss_distribution(target: jax.Array, config: EncodingConfig) -> jax.Array:
  """N(target, sigma^2) integrated over each bin, renormalised to the support (Farebrother et al. 2024)."""
  width = (config.support_max - config.support_min) / (config.num_bins - 1)
  sigma = config.hl_gauss_sigma_ratio * width
  edges = jnp.concatenate([support(config) - width / 2, jnp.array([config.support_max + width / 2])])
  cdf = jax.scipy.special.erf((edges - target[..., None]) / (jnp.sqrt(2.0) * sigma))
  mass = cdf[..., 1:] - cdf[..., :-1]
  return mass / jnp.maximum(jnp.sum(mass, axis=-1, keepdims=True), 1e-12)


@register('hl_gauss')
def hl_gauss(config: EncodingConfig) -> Encoding:
  """The scalar target as a Gaussian histogram over the bins (HL-Gauss)."""
  clipped = lambda target: jnp.clip(target, config.support_min, config.support_max)
  return _categorical(config, lambda target: hl_gauss_distribution(clipped(target), config))


def make_encoding(name: str, config: EncodingConfig) -> Encoding:
  return _checked(ENCODINGS.get(name)(config))
