"""Architectures: a registry of Haiku functions, each `obs -> NetworkOutput`.

Every architecture takes uint8 (or float) observations, scales integer inputs
to [0, 1], names its output layer `head` (the `reset_last_layer` intervention
relies on it), and exposes its hidden activations (see `types.NetworkOutput`).
The two switches every architecture honours:
  * `layer_norm`: a LayerNorm after each hidden convolutional or fully
    connected layer, before its nonlinearity (the ViT: the standard pre-norm
    positions instead);
  * `spectral_norm`: the first linear or convolutional layer's weight divided
    by its largest singular value (Gogianu et al. 2021), a function of the
    parameters applied before the forward pass (`Network.prepare`), so that an
    actor pays for the power iteration once per parameter pull, not per step.
Adding an architecture means writing one builder and registering it here,
naming its first weight layer in `FIRST_LAYERS` (and, if its hidden layers form
a simple chain, listing its layers in `CHAINS` so that unit-level interventions
such as ReDo can apply to it).
"""

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from environments.registry import Registry
from agents.types import Network, NetworkOutput, Params

# Power iterations per forward pass of the spectral normalisation. Haiku's
# SpectralNorm keeps its vector in transform state, which would fork the
# learner; a fixed start and enough iterations (60: within 1% on the first
# layers here) make it stateless instead.
SPECTRAL_NORM_ITERATIONS = 60


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """Options shared by all architectures (interventions may set some)."""
  num_outputs: int
  width_multiplier: float = 1.0
  layer_norm: bool = False
  spectral_norm: bool = False


ArchBuilder = Callable[[ArchConfig], Callable[..., NetworkOutput]]
ARCHITECTURES: Registry[ArchBuilder] = Registry('architecture', '--arch')
register = ARCHITECTURES.register

HEAD = 'head'  # The output layer's module name in every architecture.

# The weight layers of the architectures whose hidden layers form a simple chain
# (hidden layer i, `NetworkOutput.hidden[i]`, is the output of layer i, through
# its optional `<layer>_layer_norm`, and feeds layer i + 1 only), in that order,
# then `head`: what a unit-level intervention (ReDo) needs to find a hidden
# unit's incoming and outgoing weights. A conv layer feeding a dense one does so
# through a row-major flatten of [H, W, C]. The residual resnet18 and the vit
# are not chains.
CHAINS: Dict[str, Tuple[str, ...]] = {
    'mlp': ('linear_0', 'linear_1', HEAD),
    'cnn': ('conv_0', 'conv_1', 'linear_0', 'linear_1', HEAD),
    'nature_dqn': ('conv_0', 'conv_1', 'conv_2', 'linear_0', HEAD),
}
# Each architecture's first weight layer: the one `spectral_norm` normalises.
FIRST_LAYERS: Dict[str, str] = {'mlp': 'linear_0', 'cnn': 'conv_0', 'nature_dqn': 'conv_0', 'resnet18': 'stem',
                                'vit': 'patch_embedding'}


def scale_observation(obs: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]; floats pass through."""
  if jnp.issubdtype(obs.dtype, jnp.integer):
    return obs.astype(jnp.float32) / 255.0
  return obs.astype(jnp.float32)


def top_singular_value(matrix: jax.Array, iterations: int = SPECTRAL_NORM_ITERATIONS) -> jax.Array:
  """sigma_max by power iteration; gradients flow through `matrix` only (as in Miyato et al. 2018)."""
  fixed = jax.lax.stop_gradient(matrix)
  v = jax.random.normal(jax.random.PRNGKey(0), (matrix.shape[1],), matrix.dtype)

  def step(_, v):
    v = (fixed @ v) @ fixed  # = fixed.T @ (fixed @ v), without XLA copying the transpose: 20x faster on CPU.
    return v / (jnp.linalg.norm(v) + 1e-12)

  v = jax.lax.stop_gradient(jax.lax.fori_loop(0, iterations, step, v / jnp.linalg.norm(v)))
  return jnp.linalg.norm(matrix @ v)


def spectral_normalize(params: Params, layer: str) -> Params:
  """`params` with `layer`'s weight divided by its top singular value (conv kernels as [kh*kw*in, out])."""
  w = params[layer]['w']
  return {**params, layer: {**params[layer], 'w': w / top_singular_value(w.reshape(-1, w.shape[-1]))}}


def maybe_layer_norm(config: ArchConfig, x: jax.Array, name: str) -> jax.Array:
  """LayerNorm over the features (channels for convolutions) when the switch is on."""
  if not config.layer_norm:
    return x
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)(x)


class StridedConv2D(hk.Conv2D):
  """`hk.Conv2D` with VALID padding and a stride that divides the kernel, computed on the space-to-depth input.

  The same parameters (created as `hk.Conv2D` creates them) and the same
  function: the input's s x s blocks become channels and the kernel [k, k, C,
  O] the matching [k/s, k/s, s*s*C, O], so the convolution has stride 1 over
  s*s times the channels, which XLA:CPU's kernels run far better than few
  channels at a stride (the Nature DQN's 8x8/4 over 4 frames and 4x4/2: its
  forward pass 1.49x faster at batch 16, its gradient 1.59x at batch 32, CPU
  time on one thread).
  """

  def __init__(self, output_channels: int, kernel: int, stride: int, name: str):
    if kernel % stride:
      raise ValueError(f'StridedConv2D needs a stride dividing the kernel, not {kernel}/{stride}.')
    super().__init__(output_channels, kernel, stride=stride, padding='VALID', name=name)

  def __call__(self, inputs: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
    (k, _), (s, _), channels = self.kernel_shape, self.stride, inputs.shape[-1]
    w = hk.get_parameter('w', (k, k, channels, self.output_channels), inputs.dtype,
                         init=hk.initializers.TruncatedNormal(stddev=1. / np.sqrt(k * k * channels)))
    b = hk.get_parameter('b', (self.output_channels,), inputs.dtype, init=jnp.zeros)
    batch, height, width = inputs.shape[0], inputs.shape[1] // s, inputs.shape[2] // s
    # Rows and columns past the last whole block are read by no output of the strided convolution.
    blocks = inputs[:, :height * s, :width * s].reshape(batch, height, s, width, s, channels)
    blocks = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, s * s * channels)
    kernel = w.reshape(k // s, s, k // s, s, channels, self.output_channels).transpose(0, 2, 1, 3, 4, 5)
    out = jax.lax.conv_general_dilated(blocks, kernel.reshape(k // s, k // s, s * s * channels, self.output_channels),
                                       (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return out + b


@jax.custom_jvp
def _tap_sum_conv(inputs: jax.Array, w: jax.Array) -> jax.Array:
  """A stride-1, SAME-padded convolution of a one-channel input [B, H, W, 1] by w [k, k, 1, O], as the sum over
  the k*k taps of the shifted input times that tap's weights: products that XLA fuses into one loop."""
  k, pad = w.shape[0], w.shape[0] // 2
  height, width = inputs.shape[1:3]
  padded = jnp.pad(inputs, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = jnp.zeros((*inputs.shape[:3], w.shape[-1]), inputs.dtype)
  for i in range(k):
    for j in range(k):
      out = out + padded[:, i:i + height, j:j + width] * w[i, j, 0]
  return out


def _lax_conv(inputs: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(inputs, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(_tap_sum_conv.defjvp, symbolic_zeros=True)
def _tap_sum_conv_jvp(primals, tangents):
  """Derivatives are XLA's convolution's (the convolution is bilinear: its tangent is the convolution of the
  tangents), so that gradients (the transposed tangent) use XLA's gradient kernels, not slow for one input channel,
  and forward over reverse (the Hessian-vector products of the curvature diagnostics) works."""
  (inputs, w), (inputs_dot, w_dot) = primals, tangents
  out = _tap_sum_conv(inputs, w)
  out_dot = jnp.zeros_like(out)
  for x, y in ((inputs_dot, w), (inputs, w_dot)):
    if not any(isinstance(operand, jax.custom_derivatives.SymbolicZero) for operand in (x, y)):
      out_dot = out_dot + _lax_conv(x, y)
  return out, out_dot


class OneChannelConv2D(hk.Conv2D):
  """`hk.Conv2D` with stride 1 and SAME padding over a one-channel input (MNIST's), computed as a sum of taps.

  The same parameters (created as `hk.Conv2D` creates them) and the same
  function; XLA:CPU runs a convolution with one input channel on slow
  kernels (the CNN's 5x5 first layer at an eighth of its width, batch 128:
  3% of the matmul rate), while the k*k shifted products fuse into one loop:
  that layer 7.6x faster, the CNN's forward pass at an eighth of its width
  1.8x (batch 128), its learner update 1.30x (batch 32); no change at full
  width, nor in the probe's step, where XLA recomputes the sum inside the
  transposition that the next layer's filter gradient reads.
  """

  def __init__(self, output_channels: int, kernel: int, with_bias: bool = True, name: Optional[str] = None):
    if kernel % 2 == 0:
      raise ValueError(f'OneChannelConv2D needs an odd kernel (SAME padding is then symmetric), not {kernel}.')
    super().__init__(output_channels, kernel, with_bias=with_bias, name=name)

  def __call__(self, inputs: jax.Array) -> jax.Array:  # pylint: disable=arguments-differ
    if inputs.ndim != 4 or inputs.shape[-1] != 1:
      raise ValueError(f'OneChannelConv2D takes [B, H, W, 1] inputs, not {inputs.shape}.')
    k = self.kernel_shape[0]
    w = hk.get_parameter('w', (k, k, 1, self.output_channels), inputs.dtype,
                         init=hk.initializers.TruncatedNormal(stddev=1. / k))
    out = _tap_sum_conv(inputs, w)
    if self.with_bias:
      out = out + hk.get_parameter('b', (self.output_channels,), inputs.dtype, init=jnp.zeros)
    return out


def conv2d(inputs: jax.Array, output_channels: int, kernel: int, *, stride: int = 1, with_bias: bool = True,
           name: str) -> jax.Array:
  """`hk.Conv2D` (SAME padding), as `OneChannelConv2D` where it applies (stride 1, one input channel, odd kernel)."""
  if stride == 1 and inputs.shape[-1] == 1 and kernel % 2 and inputs.ndim == 4:
    return OneChannelConv2D(output_channels, kernel, with_bias=with_bias, name=name)(inputs)
  return hk.Conv2D(output_channels, kernel, stride=stride, with_bias=with_bias, name=name)(inputs)


def _width(config: ArchConfig, base: int) -> int:
  return max(1, int(round(base * config.width_multiplier)))


def _dense_stack(config: ArchConfig, x: jax.Array, widths: Sequence[int], hidden: List[jax.Array]) -> jax.Array:
  """ReLU fully connected layers (layer norm before each ReLU when on), recording activations."""
  for i, width in enumerate(widths):
    x = jax.nn.relu(maybe_layer_norm(config, hk.Linear(width, name=f'linear_{i}')(x), f'linear_{i}_layer_norm'))
    hidden.append(x)
  return x


def _flat_hidden(hidden: List[jax.Array]) -> tuple:
  """The hidden activations, the last one flattened to [B, D] (the penultimate representation)."""
  return tuple(hidden[:-1]) + (hidden[-1].reshape(hidden[-1].shape[0], -1),)


@register('mlp')
def mlp(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """Two hidden ReLU layers of width 512 x multiplier (appendix A.2).

  Figure 5's width sweep (base 16, factors 1, 2, 4, 8, 12, 16) is
  --width_multiplier = 16 * factor / 512, i.e. 0.03125 ... 0.5.
  """

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    del is_training
    hidden: List[jax.Array] = []
    x = _dense_stack(config, hk.Flatten()(scale_observation(obs)), [_width(config, 512)] * 2, hidden)
    return NetworkOutput(hk.Linear(config.num_outputs, name=HEAD)(x), _flat_hidden(hidden))

  return forward


@register('cnn')
def cnn(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """Appendix A.2: conv 5x5 and conv 3x3 with 64 channels, then two dense layers of 256.

  Stride 1, SAME padding and no pooling: the paper names none.
  """

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    del is_training
    hidden: List[jax.Array] = []
    x = scale_observation(obs)
    for i, kernel in enumerate((5, 3)):
      x = conv2d(x, _width(config, 64), kernel, name=f'conv_{i}')
      x = jax.nn.relu(maybe_layer_norm(config, x, f'conv_{i}_layer_norm'))
      hidden.append(x)
    x = _dense_stack(config, hk.Flatten()(x), [_width(config, 256)] * 2, hidden)
    return NetworkOutput(hk.Linear(config.num_outputs, name=HEAD)(x), _flat_hidden(hidden))

  return forward


@register('nature_dqn')
def nature_dqn(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """Mnih et al. (2015): conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1 (VALID), dense 512; the strided ones
  computed as `StridedConv2D`."""

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    del is_training
    hidden: List[jax.Array] = []
    x = scale_observation(obs)
    for i, (channels, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
      conv = StridedConv2D if stride > 1 else functools.partial(hk.Conv2D, padding='VALID')
      x = conv(_width(config, channels), kernel, stride=stride, name=f'conv_{i}')(x)
      x = jax.nn.relu(maybe_layer_norm(config, x, f'conv_{i}_layer_norm'))
      hidden.append(x)
    x = _dense_stack(config, hk.Flatten()(x), [_width(config, 512)], hidden)
    return NetworkOutput(hk.Linear(config.num_outputs, name=HEAD)(x), _flat_hidden(hidden))

  return forward


@register('resnet18')
def resnet18(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """ResNet-18 (He et al. 2016): a 3x3 stem, 4 stages x 2 basic blocks of 64/128/256/512 channels.

  Two deviations keep it a pure function of (params, obs) on small images:
  no batch normalisation (its running statistics would be transform state;
  the `layernorm` switch puts a LayerNorm after every convolution instead),
  and the CIFAR-style stem (3x3 stride 1, no max-pool) that 28x28 and 32x32
  inputs call for.
  """

  def conv(x, channels, kernel, stride, name):
    x = conv2d(x, channels, kernel, stride=stride, with_bias=not config.layer_norm, name=name)
    return maybe_layer_norm(config, x, f'{name}_layer_norm')

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    del is_training
    hidden: List[jax.Array] = []
    x = jax.nn.relu(conv(scale_observation(obs), _width(config, 64), 3, 1, 'stem'))
    hidden.append(x)
    for stage, base in enumerate((64, 128, 256, 512)):
      channels = _width(config, base)
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        name = f'stage_{stage}_block_{block}'
        y = jax.nn.relu(conv(x, channels, 3, stride, f'{name}_conv_0'))
        hidden.append(y)
        y = conv(y, channels, 3, 1, f'{name}_conv_1')
        if stride != 1 or x.shape[-1] != channels:
          x = conv(x, channels, 1, stride, f'{name}_shortcut')
        x = jax.nn.relu(x + y)
        hidden.append(x)
    features = jnp.mean(x, axis=(1, 2))
    hidden.append(features)
    return NetworkOutput(hk.Linear(config.num_outputs, name=HEAD)(features), _flat_hidden(hidden))

  return forward


@register('vit')
def vit(config: ArchConfig) -> Callable[..., NetworkOutput]:
  """A small vision transformer (appendix A.2): patches 3x3, model width 256, MLP 1024, one block, dropout 0.1.

  Norm-free by default, so that the `layer_norm` switch can compare it with
  and without layer norm (the paper's figure 6): the switch adds the pre-norm
  block's three LayerNorms, before the attention, before the MLP and before
  the pooling. Learned position embeddings, mean pooling over patches, then
  `head`. Images whose sides are not multiples of 3 are cropped (28x28 ->
  27x27: 81 patches).
  """
  patch, model_dim, mlp_dim, heads, dropout = 3, _width(config, 256), _width(config, 1024), 8, 0.1

  def forward(obs: jax.Array, is_training: bool = False) -> NetworkOutput:
    hidden: List[jax.Array] = []
    x = scale_observation(obs)
    height, width = x.shape[1] // patch * patch, x.shape[2] // patch * patch
    x = hk.Conv2D(model_dim, patch, stride=patch, padding='VALID', name='patch_embedding')(x[:, :height, :width])
    x = x.reshape(x.shape[0], -1, model_dim)
    x = x + hk.get_parameter('position_embedding', x.shape[1:], init=hk.initializers.TruncatedNormal(0.02))
    drop = (lambda y: hk.dropout(hk.next_rng_key(), dropout, y)) if is_training else (lambda y: y)
    attention = hk.MultiHeadAttention(num_heads=heads, key_size=model_dim // heads, model_size=model_dim,
                                      w_init=hk.initializers.VarianceScaling(1.0), name='attention')
    y = maybe_layer_norm(config, x, 'attention_layer_norm')
    x = x + drop(attention(y, y, y))
    y = jax.nn.gelu(hk.Linear(mlp_dim, name='mlp_0')(maybe_layer_norm(config, x, 'mlp_layer_norm')))
    hidden.append(y)
    x = x + drop(hk.Linear(model_dim, name='mlp_1')(drop(y)))
    features = jnp.mean(maybe_layer_norm(config, x, 'final_layer_norm'), axis=1)
    hidden.append(features)
    return NetworkOutput(hk.Linear(config.num_outputs, name=HEAD)(features), _flat_hidden(hidden))

  return forward


def make_network(arch: str, config: ArchConfig) -> Network:
  """Builds a pure `Network` from a registered architecture name."""
  transformed = hk.transform(ARCHITECTURES.get(arch)(config))

  def init(rng: jax.Array, obs: jax.Array):
    return transformed.init(rng, obs, is_training=False)

  def prepare(params: Params) -> Params:
    return spectral_normalize(params, FIRST_LAYERS[arch]) if config.spectral_norm else params

  def apply_prepared(params, obs: jax.Array, *, is_training: bool = False,
                     rng: Optional[jax.Array] = None) -> NetworkOutput:
    if is_training and rng is None:
      raise ValueError('Network.apply(..., is_training=True) needs an rng (the dropout key).')
    return transformed.apply(params, rng, obs, is_training=is_training)

  def apply(params, obs: jax.Array, **options) -> NetworkOutput:
    return apply_prepared(prepare(params), obs, **options)

  return Network(init=init, apply=apply, prepare=prepare, apply_prepared=apply_prepared)
