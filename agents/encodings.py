"""Output encodings: how network outputs become Q-values and a loss.

The learner computes the double-Q target once (`agents.learning`) and hands the
chosen action's outputs and the scalar target to the encoding's loss, so adding
an encoding (two-hot, HL-Gauss) changes nothing else.
"""

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import rlax


@dataclasses.dataclass(frozen=True)
class EncodingConfig:
  # Clip the TD error's gradient to +-td_error_clip (DQN Zoo uses 1/32 with
  # RMSProp); None leaves the squared TD error untouched.
  td_error_clip: Optional[float] = None


class Encoding(NamedTuple):
  outputs_per_action: int
  # [B, A * outputs_per_action] -> [B, A]
  q_values: Callable[[jax.Array], jax.Array]
  # (chosen action's outputs [B, outputs_per_action], target [B]) -> loss [B]
  loss: Callable[[jax.Array, jax.Array], jax.Array]


EncodingBuilder = Callable[[EncodingConfig], Encoding]
ENCODINGS: Dict[str, EncodingBuilder] = {}


def register(name: str) -> Callable[[EncodingBuilder], EncodingBuilder]:
  def decorator(builder: EncodingBuilder) -> EncodingBuilder:
    ENCODINGS[name] = builder
    return builder
  return decorator


@register('regress')
def regress(config: EncodingConfig) -> Encoding:
  """One output per action is its Q-value; the loss is half the squared TD error."""

  def loss(action_outputs: jax.Array, target: jax.Array) -> jax.Array:
    td_error = target - action_outputs[:, 0]
    if config.td_error_clip is not None:
      td_error = rlax.clip_gradient(td_error, -config.td_error_clip, config.td_error_clip)
    return 0.5 * jnp.square(td_error)

  return Encoding(outputs_per_action=1, q_values=lambda outputs: outputs, loss=loss)


def make_encoding(name: str, config: EncodingConfig) -> Encoding:
  if name not in ENCODINGS:
    raise ValueError(f'Unknown output encoding {name!r} (--output); accepted: {", ".join(sorted(ENCODINGS))}.')
  return ENCODINGS[name](config)
