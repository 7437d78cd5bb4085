"""Architectures: a registry of Haiku functions, each `obs -> NetworkOutput`.

Every architecture takes uint8 (or float) observations, scales integer inputs
to [0, 1], and exposes its hidden activations (see `types.NetworkOutput`).
Adding an architecture means writing one builder and registering it here.
"""

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from agents.types import Network, NetworkOutput


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """Options shared by all architectures (interventions may set some)."""
  num_outputs: int
  width_multiplier: float = 1.0
  layer_norm: bool = False
  spectral_norm: bool = False


ArchBuilder = Callable[[ArchConfig], Callable[..., NetworkOutput]]
ARCHITECTURES: Dict[str, ArchBuilder] = {}


def register(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
  def decorator(builder: ArchBuilder) -> ArchBuilder:
    ARCHITECTURES[name] = builder
    return builder
  return decorator


def scale_observation(obs: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]; floats pass through."""
  if jnp.issubdtype(obs.dtype, jnp.integer):
    return obs.astype(jnp.float32) / 255.0
  return obs.astype(jnp.float32)


def first_linear(config: ArchConfig, output_size: int, name: str) -> Callable[[jax.Array], jax.Array]:
  """The first dense layer, spectrally normalised when asked (Gogianu et al. 2021)."""
  linear = hk.Linear(output_size, name=name)
  if not config.spectral_norm:
    return linear

  def apply(x: jax.Array) -> jax.Array:
    w = hk.get_parameter('w', (x.shape[-1], output_size), init=hk.initializers.VarianceScaling(1.0, 'fan_avg', 'uniform'))
    b = hk.get_parameter('b', (output_size,), init=jnp.zeros)
    w = hk.SpectralNorm(name='spectral_norm')(w)
    return x @ w + b

  return hk.to_module(apply)(name=name)


def maybe_layer_norm(config: ArchConfig, x: jax.Array, name: str) -> jax.Array:
  if not config.layer_norm:
    return x
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)(x)


@register('mlp')
def mlp(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """Two hidden ReLU layers of width 512 x multiplier (appendix A.2)."""
  width = int(round(512 * config.width_multiplier))

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    del is_training
    x = hk.Flatten()(scale_observation(obs))
    hidden = []
    for i in range(2):
      layer = first_linear(config, width, f'linear_{i}') if i == 0 else hk.Linear(width, name=f'linear_{i}')
      x = jax.nn.relu(maybe_layer_norm(config, layer(x), f'layer_norm_{i}'))
      hidden.append(x)
    return NetworkOutput(hk.Linear(config.num_outputs, name='head')(x), tuple(hidden))

  return forward


def make_network(arch: str, config: ArchConfig) -> Network:
  """Builds a pure `Network` from a registered architecture name."""
  if arch not in ARCHITECTURES:
    raise ValueError(f'Unknown architecture {arch!r} (--arch); accepted: {", ".join(sorted(ARCHITECTURES))}.')
  transformed = hk.transform(ARCHITECTURES[arch](config))

  def init(rng: jax.Array, obs: jax.Array):
    return transformed.init(rng, obs, is_training=False)

  def apply(params, obs: jax.Array, rng: Optional[jax.Array] = None) -> NetworkOutput:
    return transformed.apply(params, rng, obs, is_training=rng is not None)

  return Network(init=init, apply=apply)

