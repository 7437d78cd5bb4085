"""The plasticity probe of section 2.2 (equation 4).

From a copy of the current parameters theta_t, fit each of `num_targets`
random functions

    g_i(x) = a + sin(frequency * f(x; theta0_i)),

theta0_i a fresh random initialisation of the same architecture and `a` the
current network's mean prediction (per output) on the probe inputs, with the
agent's optimizer from a fresh state, for `steps` minibatch steps. The final
loss (mean squared error over the whole probe input set) says how well the
network can still fit new targets; `baseline` is the loss of predicting each
target's mean (its variance), so `plasticity = baseline - final loss` is the
share of target variance the network still manages to fit.

All targets run as one jit-compiled computation, vmapped over targets and a
`lax.scan` over steps; `make_sequential_probe` runs the same fits target by
target (same keys, same result) for tests and the benchmark.
"""

import dataclasses
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agents.types import Params

ApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, inputs [N, ...]) -> outputs [N, K]
InitFn = Callable[[jax.Array, jax.Array], Params]  # (rng, example inputs) -> params


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  num_targets: int = 10  # Section 2.2.
  steps: int = 2000  # Section 4.1 / appendix A.2.
  batch_size: int = 128
  num_inputs: int = 2048  # Replay observations forming the probe's input set.
  curve_every: int = 20  # Probe steps per point of the recorded learning curve.
  frequency: float = 1e5  # The sine's frequency in equation 4.


class ProbeResult(NamedTuple):
  final_losses: np.ndarray  # [num_targets]: full-input-set MSE after the fit.
  baselines: np.ndarray  # [num_targets]: each target's variance.
  step_losses: np.ndarray  # [num_targets, steps]: minibatch loss before each update.
  target_offset: np.ndarray  # [K]: `a`, the network's mean prediction.
  curve_every: int
  wall_time_s: float  # The fits alone.
  compile_time_s: float  # Compilation (0 once compiled for these shapes).

  @property
  def baseline(self) -> float:
    return float(self.baselines.mean())

  @property
  def plasticity(self) -> float:
    return self.baseline - float(self.final_losses.mean())

  def curve(self) -> List[List[float]]:
    """[[probe step, mean loss over targets of the window starting there], ...]."""
    mean = self.step_losses.mean(axis=0)
    return [[int(start), float(mean[start:start + self.curve_every].mean())]
            for start in range(0, len(mean), self.curve_every)]

  def as_record(self) -> Dict[str, object]:
    return {
        'probe_steps': int(self.step_losses.shape[1]),
        'num_targets': int(len(self.final_losses)),
        'final_loss_mean': float(self.final_losses.mean()),
        'final_loss_std': float(self.final_losses.std()),
        'final_losses': [float(x) for x in self.final_losses],
        'baseline': self.baseline,
        'plasticity': self.plasticity,
        'target_offset': float(self.target_offset.mean()),
        'curve': self.curve(),
        'wall_time_s': float(self.wall_time_s),
        'compile_time_s': float(self.compile_time_s),
    }


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(outputs - targets))


def _make_fit(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
              config: ProbeConfig) -> Callable:
  """(params, inputs, offset, key) -> (final loss, baseline, step losses) of one target."""

  def loss_fn(params, x, y):
    return _mse(apply_fn(params, x), y)

  def fit(params: Params, inputs: jax.Array, offset: jax.Array, key: jax.Array):
    init_key, batch_key = jax.random.split(key)
    target_params = init_fn(init_key, inputs[:1])
    targets = offset + jnp.sin(config.frequency * apply_fn(target_params, inputs))
    baseline = jnp.mean(jnp.var(targets, axis=0))

    def step(carry, step_key):
      params, opt_state = carry
      index = jax.random.randint(step_key, (config.batch_size,), 0, inputs.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, inputs[index], targets[index])
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), step_losses = jax.lax.scan(
        step, (params, optimizer.init(params)), jax.random.split(batch_key, config.steps))
    return loss_fn(params, inputs, targets), baseline, step_losses

  return fit


def _prepare(apply_fn: ApplyFn, params: Params, inputs: jax.Array, key: jax.Array, num_targets: int):
  offset = jnp.mean(apply_fn(params, inputs), axis=0)
  return offset, jax.random.split(key, num_targets)


class _Compiled:
  """A jit-compiled function compiled ahead of its first call, so runs can be timed apart from compilation."""

  def __init__(self, fn: Callable):
    self._jitted = jax.jit(fn)
    self._executables: Dict[tuple, Callable] = {}

  def __call__(self, *args) -> Tuple[object, float]:
    """(outputs, seconds spent compiling for this call)."""
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args))
    compile_time = 0.0
    if key not in self._executables:
      start = time.time()
      self._executables[key] = self._jitted.lower(*args).compile()
      compile_time = time.time() - start
    return self._executables[key](*args), compile_time


def make_probe(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
               config: ProbeConfig) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """The probe: all targets in one jit-compiled, vmapped computation."""
  fit = _make_fit(apply_fn, init_fn, optimizer, config)

  def fit_all(params, inputs, key):
    offset, keys = _prepare(apply_fn, params, inputs, key, config.num_targets)
    return (offset,) + jax.vmap(fit, in_axes=(None, None, None, 0))(params, inputs, offset, keys)

  compiled = _Compiled(fit_all)

  def probe(params: Params, inputs: np.ndarray, key: jax.Array) -> ProbeResult:
    start = time.time()
    outputs, compile_time = compiled(params, jnp.asarray(inputs), key)
    offset, final, baselines, losses = jax.device_get(outputs)
    return ProbeResult(final, baselines, losses, offset, config.curve_every,
                       time.time() - start - compile_time, compile_time)

  return probe


def make_sequential_probe(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
                          config: ProbeConfig) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """The same fits as `make_probe`, one target at a time in a Python loop."""
  fit = _Compiled(_make_fit(apply_fn, init_fn, optimizer, config))
  prepare = _Compiled(lambda params, inputs, key: _prepare(apply_fn, params, inputs, key, config.num_targets))

  def probe(params: Params, inputs: np.ndarray, key: jax.Array) -> ProbeResult:
    start = time.time()
    inputs = jnp.asarray(inputs)
    (offset, keys), compile_time = prepare(params, inputs, key)
    results = []
    for target_key in keys:
      outputs, seconds = fit(params, inputs, offset, target_key)
      results.append(jax.device_get(outputs))
      compile_time += seconds
    final, baselines, losses = (np.stack(x) for x in zip(*results))
    return ProbeResult(final, baselines, losses, np.asarray(offset), config.curve_every,
                       time.time() - start - compile_time, compile_time)

  return probe
