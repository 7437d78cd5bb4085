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

All targets run as one jit-compiled computation, vmapped over targets, its
optimizer steps a `lax.scan`; `make_sequential_probe` runs the same fits
target by target (same keys, same result) for tests and the benchmark.

On CPU, for convolutional networks, the scan becomes calls of `steps_per_call`
steps unrolled at trace time (see probes/compiled_loops.py): same results.
"""

import dataclasses
import functools
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agents.config import option
from agents.types import Params
from probes import compiled_loops

ApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, inputs [N, ...]) -> outputs [N, K]
InitFn = Callable[[jax.Array, jax.Array], Params]  # (rng, example inputs) -> params


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """The probe's settings; their flags are `--probe_<field>` unless named otherwise."""
  num_targets: int = option(10, 'Random target functions per probe (section 2.2).', flag='probe_targets',
                            lower_bound=1)
  steps: int = option(2000, 'Optimizer steps of each probe fit (section 4.1, appendix A.2).', lower_bound=1)
  batch_size: int = option(128, 'Minibatch size of the probe fits.', lower_bound=1)
  num_inputs: int = option(2048, 'Distinct replay observations in the probe input set (fewer if the replay holds '
                           'fewer at the first probe point).', flag='probe_inputs', lower_bound=1)
  curve_every: int = option(20, 'Probe steps per point of the recorded learning curve.', lower_bound=1)
  frequency: float = option(1e5, 'The sine\'s frequency in equation 4.')
  # None (or >= steps): all of them in one compiled loop, except on CPU for
  # convolutional networks, where it is 1 (see probes/compiled_loops.py).
  steps_per_call: Optional[int] = option(None, 'Optimizer steps per compiled call of unrolled probe steps (default: '
                                         'one compiled loop, or 1 on CPU for convolutional networks).', lower_bound=1)
  progress_every: int = option(100, 'Probe steps per compiled loop when progress is reported (the evaluator\'s '
                               'status line).', lower_bound=1)
  fresh_inputs: bool = option(False, 'Draw new probe inputs, targets and transitions at every probe point (default: '
                              'one set for the whole run, drawn at the first point and saved as probe_set.npz).')


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


class _Fit(NamedTuple):
  """One target's fit in three pure pieces, so that its steps can run in chunks."""
  # (params, inputs, offset, key) -> (opt_state, targets, baseline, step keys [steps, 2])
  start: Callable
  # (params, opt_state, inputs, targets, step keys [n, 2]) -> (params, opt_state, step losses [n]):
  # as a `lax.scan`, and unrolled at trace time (no loop for XLA:CPU to mis-lower; for short chunks).
  run_steps: Callable
  run_steps_unrolled: Callable
  # (params, inputs, targets) -> full-input-set loss
  final_loss: Callable


def _make_fit(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
              config: ProbeConfig) -> _Fit:

  def loss_fn(params, x, y):
    return _mse(apply_fn(params, x), y)

  def start(params: Params, inputs: jax.Array, offset: jax.Array, key: jax.Array):
    init_key, batch_key = jax.random.split(key)
    targets = offset + jnp.sin(config.frequency * apply_fn(init_fn(init_key, inputs[:1]), inputs))
    baseline = jnp.mean(jnp.var(targets, axis=0))
    return optimizer.init(params), targets, baseline, jax.random.split(batch_key, config.steps)

  def step(carry, step_key, inputs, targets):
    params, opt_state = carry
    index = jax.random.randint(step_key, (config.batch_size,), 0, inputs.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs[index], targets[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def run_steps(params: Params, opt_state, inputs: jax.Array, targets: jax.Array, step_keys: jax.Array,
                unrolled: bool = False):
    (params, opt_state), step_losses = compiled_loops.scan(
        lambda carry, step_key: step(carry, step_key, inputs, targets), (params, opt_state), step_keys, unrolled)
    return params, opt_state, step_losses

  return _Fit(start, run_steps, functools.partial(run_steps, unrolled=True), loss_fn)


def _prepare(apply_fn: ApplyFn, params: Params, inputs: jax.Array, key: jax.Array, num_targets: int):
  offset = jnp.mean(apply_fn(params, inputs), axis=0)
  return offset, jax.random.split(key, num_targets)


def steps_per_call(config: ProbeConfig, params: Params) -> Optional[int]:
  """Unrolled optimizer steps per compiled call; None: all steps in one compiled loop (`lax.scan`)."""
  if config.steps_per_call:
    return config.steps_per_call if config.steps_per_call < config.steps else None
  # Even a one-step probe: a loop of trip count 1 is as slow on XLA:CPU.
  return 1 if compiled_loops.avoid_compiled_loops(params) else None


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


Progress = Callable[[int], None]  # Called with the number of probe steps done.


def _run_in_chunks(run_steps: Callable, params, opt_state, inputs, targets, step_keys: jax.Array,
                   chunk: int, progress: Optional[Progress] = None) -> Tuple[object, jax.Array, float]:
  """Runs `step_keys` ([..., steps, 2], steps on axis -2) in calls of `chunk` steps; (params, losses, compile s)."""
  losses, compile_time = [], 0.0
  for begin in range(0, step_keys.shape[-2], chunk):
    (params, opt_state, chunk_losses), seconds = run_steps(params, opt_state, inputs, targets,
                                                           step_keys[..., begin:begin + chunk, :])
    losses.append(chunk_losses)
    compile_time += seconds
    if progress is not None:
      progress(min(begin + chunk, step_keys.shape[-2]))
  return params, jnp.concatenate(losses, axis=-1), compile_time


def make_probe(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
               config: ProbeConfig) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """The probe: all targets in one jit-compiled, vmapped computation."""
  fit = _make_fit(apply_fn, init_fn, optimizer, config)

  def start_all(params, inputs, key):
    offset, keys = _prepare(apply_fn, params, inputs, key, config.num_targets)
    opt_states, targets, baselines, step_keys = jax.vmap(fit.start, in_axes=(None, None, None, 0))(
        params, inputs, offset, keys)
    return offset, opt_states, targets, baselines, step_keys

  # Steps of every target: `params` holds one copy per target.
  run_all, run_all_unrolled = (jax.vmap(run, in_axes=(0, 0, None, 0, 0))
                               for run in (fit.run_steps, fit.run_steps_unrolled))
  final_all = jax.vmap(fit.final_loss, in_axes=(0, None, 0))

  def fit_all(params, inputs, key):
    offset, opt_states, targets, baselines, step_keys = start_all(params, inputs, key)
    params, _, losses = run_all(_copies(params, config.num_targets), opt_states, inputs, targets, step_keys)
    return offset, final_all(params, inputs, targets), baselines, losses

  whole = _Compiled(fit_all)
  start, run, run_scanned, final = (_Compiled(f) for f in (start_all, run_all_unrolled, run_all, final_all))

  def probe(params: Params, inputs: np.ndarray, key: jax.Array, progress: Optional[Progress] = None) -> ProbeResult:
    """Fits every target; `progress`, if given, hears how many steps are done (the fits then run in loops
    of `config.progress_every` steps: the same computation, cut)."""
    started = time.time()
    inputs = jnp.asarray(inputs)
    chunk = steps_per_call(config, params)
    if chunk is None and progress is None:
      (offset, final_losses, baselines, losses), compile_time = whole(params, inputs, key)
    else:
      run_chunk = run if chunk else run_scanned
      (offset, opt_states, targets, baselines, step_keys), compile_time = start(params, inputs, key)
      params, losses, seconds = _run_in_chunks(run_chunk, _copies(params, config.num_targets), opt_states, inputs,
                                               targets, step_keys, chunk or config.progress_every, progress)
      final_losses, final_seconds = final(params, inputs, targets)
      compile_time += seconds + final_seconds
    offset, final_losses, baselines, losses = jax.device_get((offset, final_losses, baselines, losses))
    return ProbeResult(final_losses, baselines, losses, offset, config.curve_every,
                       time.time() - started - compile_time, compile_time)

  return probe


def _copies(params: Params, num: int) -> Params:
  """`num` stacked copies of the parameters, one per target."""
  return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (num, *jnp.shape(leaf))), params)


def make_sequential_probe(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
                          config: ProbeConfig) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """The same fits as `make_probe`, one target at a time in a Python loop."""
  fit = _make_fit(apply_fn, init_fn, optimizer, config)
  prepare = _Compiled(lambda params, inputs, key: _prepare(apply_fn, params, inputs, key, config.num_targets))
  start, run, scanned, final = (_Compiled(f) for f in (fit.start, fit.run_steps_unrolled, fit.run_steps,
                                                         fit.final_loss))

  def probe(params: Params, inputs: np.ndarray, key: jax.Array) -> ProbeResult:
    started = time.time()
    inputs = jnp.asarray(inputs)
    chunk = steps_per_call(config, params)
    chunk_run = scanned if chunk is None else run
    chunk = chunk or config.steps
    (offset, keys), compile_time = prepare(params, inputs, key)
    results = []
    for target_key in keys:
      (opt_state, targets, baseline, step_keys), seconds = start(params, inputs, offset, target_key)
      fitted, losses, run_seconds = _run_in_chunks(chunk_run, params, opt_state, inputs, targets, step_keys, chunk)
      final_loss, final_seconds = final(fitted, inputs, targets)
      results.append(jax.device_get((final_loss, baseline, losses)))
      compile_time += seconds + run_seconds + final_seconds
    final_losses, baselines, losses = (np.stack(x) for x in zip(*results))
    return ProbeResult(final_losses, baselines, losses, np.asarray(offset), config.curve_every,
                       time.time() - started - compile_time, compile_time)

  return probe
