"""The plasticity probe of section 2.2 (equation 4).

From a copy of the current parameters theta_t, fit each of `num_targets`
random functions

    g_i(x) = a + sin(frequency * q(x; theta0_i)),

theta0_i a fresh random initialisation of the same architecture, q a
network's predicted values (one per action) and `a` the current network's
mean predicted value (per action) on the probe inputs, with the agent's
optimizer from a fresh state (weight decay included, when the agent has it:
section 2.2's "optimizer used on its primary objective"), for `steps`
minibatch steps. The final loss (mean squared error of the predicted values
over the whole probe input set) says how well the network can still fit new
targets; `baseline` is the loss of predicting each target's mean (its
variance), so `plasticity = baseline - final loss` is the share of target
variance the network still manages to fit.

What a network predicts, and how it is fitted, is its output encoding's
(`ProbeHead`, from `agents.encodings`): a regression network's outputs are
its values, fitted by their mean squared error; a categorical network's
(two-hot, HL-Gauss) values are the expectations of its softmaxes over the
support, fitted through the agent's own loss (cross-entropy to the encoding
of the target on the agent's support), so that every encoding's plasticity is
measured on the same footing: values against the same kind of targets
(figures 10 and 11 compare them on one axis).

All targets run as one jit-compiled computation, vmapped over targets, its
optimizer steps a `lax.scan`; `make_sequential_probe` runs the same fits
target by target (same keys, same result) for tests and the benchmark.

On CPU, for convolutional networks, the scan becomes calls of `steps_per_call`
steps unrolled at trace time (see probes/measures/compiled_loops.py), and the targets
run in turn (`make_sequential_probe`), `targets_at_once` of them at a time in
threads: vmapped over targets, each with its own weights and batch, a
convolution becomes one grouped convolution, which XLA:CPU runs on slow
kernels (the full-width CNN's probe step: 1.42x the time of the 10 targets'
steps in turn, CPU time on one thread). Same results.
"""

from concurrent import futures
import dataclasses
import functools
import os
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from agents import host_memory, loops
from agents.builder import AgentParts
from agents.config import option
from agents.encodings import Encoding
from agents.types import Params
from probes.measures import compiled_loops

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
  # convolutional networks, where it is 1 (see probes/measures/compiled_loops.py).
  steps_per_call: Optional[int] = option(None, 'Optimizer steps per compiled call of unrolled probe steps (default: '
                                         'one compiled loop, or 1 on CPU for convolutional networks).', lower_bound=1)
  # Two targets in two threads on 2 CPU cores: 1.17-1.19x the rate of one after the other, each op on both cores
  # (the CNN's probe steps, at full and an eighth of its width: XLA:CPU's small kernels split poorly).
  targets_at_once: Optional[int] = option(None, 'Targets fitted at once, each in a thread of its own, where they '
                                          'run in turn (on CPU for convolutional networks; default: one per CPU '
                                          'core, at most --probe_targets).', lower_bound=1)
  progress_every: int = option(100, 'Probe steps per compiled loop when progress is reported (the evaluator\'s '
                               'status line).', lower_bound=1)
  fresh_inputs: bool = option(False, 'Draw new probe inputs, targets and transitions at every probe point (default: '
                              'one set for the whole run, drawn at the first point and saved as probe_set.npz).')
  # A probe step is a multiple of the target period, where reset_last_layer and shrink_and_perturb act: by default
  # the learner's snapshot is taken before them (agents/learner.py), so the probe measures what training produced.
  after_interventions: bool = option(False, 'Probe the parameters after the interventions of the probe step (a '
                                     'reset last layer, a shrink and perturbation) instead of before them.',
                                     flag='probe_after_interventions')


def _mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(outputs - targets))


class ProbeHead(NamedTuple):
  """How the probe reads a network's outputs as values, and the loss it minimises to fit them."""
  fit_loss_name: str  # Recorded as `probe_fit_loss`.
  values: Callable[[jax.Array], jax.Array]  # outputs [N, K * m] -> values [N, K]
  fit_loss: Callable[[jax.Array, jax.Array], jax.Array]  # (outputs [N, K * m], targets [N, K]) -> scalar
  support: Optional[Tuple[float, float]] = None  # The interval the targets must lie in; None: anywhere.


REGRESSION = ProbeHead('mse', lambda outputs: outputs, _mse)


class TargetsOutsideSupport(ValueError):
  """A categorical network's probe targets leave its support: it cannot represent them, the fit would be
  meaningless."""


def head_for(encoding: Encoding) -> ProbeHead:
  """The probe of a network with this output encoding: regression fits its outputs by their mean squared error;
  a categorical encoding fits its decoded values through its own loss (cross-entropy to the target's encoding)."""
  if encoding.support is None:
    return REGRESSION
  per_value = encoding.outputs_per_action

  def fit_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    chex.assert_shape(outputs, (targets.shape[0], targets.shape[1] * per_value))
    return jnp.mean(encoding.loss(outputs.reshape(-1, per_value), targets.reshape(-1)))

  return ProbeHead('cross_entropy', encoding.q_values, fit_loss, encoding.support)


class ProbeResult(NamedTuple):
  final_losses: np.ndarray  # [num_targets]: full-input-set MSE of the values after the fit.
  baselines: np.ndarray  # [num_targets]: each target's variance.
  step_losses: np.ndarray  # [num_targets, steps]: minibatch MSE of the values before each update.
  target_offset: np.ndarray  # [K]: `a`, the network's mean predicted value.
  curve_every: int
  wall_time_s: float  # The fits alone.
  compile_time_s: float  # Compilation (0 once compiled for these shapes).
  fit_loss: str = REGRESSION.fit_loss_name  # What the fit minimised (`ProbeHead.fit_loss_name`).

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
        'probe_fit_loss': self.fit_loss,
        'curve': self.curve(),
        'wall_time_s': float(self.wall_time_s),
        'compile_time_s': float(self.compile_time_s),
    }


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
  # (inputs, offset, key) -> targets [N, K]
  targets: Callable


def _make_fit(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
              config: ProbeConfig, head: ProbeHead) -> _Fit:

  def loss_fn(params, x, y):
    """(the loss minimised, the values' MSE reported): the same number for regression."""
    outputs = apply_fn(params, x)
    return head.fit_loss(outputs, y), _mse(head.values(outputs), y)

  def targets_fn(inputs: jax.Array, offset: jax.Array, key: jax.Array) -> jax.Array:
    init_key, _ = jax.random.split(key)
    return offset + jnp.sin(config.frequency * head.values(apply_fn(init_fn(init_key, inputs[:1]), inputs)))

  def start(params: Params, inputs: jax.Array, offset: jax.Array, key: jax.Array):
    _, batch_key = jax.random.split(key)
    targets = targets_fn(inputs, offset, key)
    baseline = jnp.mean(jnp.var(targets, axis=0))
    return optimizer.init(params), targets, baseline, jax.random.split(batch_key, config.steps)

  def step(carry, step_key, inputs, targets):
    params, opt_state = carry
    index = jax.random.randint(step_key, (config.batch_size,), 0, inputs.shape[0])
    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs[index], targets[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  def run_steps(params: Params, opt_state, inputs: jax.Array, targets: jax.Array, step_keys: jax.Array,
                unrolled: bool = False):
    (params, opt_state), step_losses = compiled_loops.scan(
        lambda carry, step_key: step(carry, step_key, inputs, targets), (params, opt_state), step_keys, unrolled)
    return params, opt_state, step_losses

  final_loss = lambda params, inputs, targets: loss_fn(params, inputs, targets)[1]
  return _Fit(start, run_steps, functools.partial(run_steps, unrolled=True), final_loss, targets_fn)


def _prepare(apply_fn: ApplyFn, head: ProbeHead, params: Params, inputs: jax.Array, key: jax.Array,
             num_targets: int):
  offset = jnp.mean(head.values(apply_fn(params, inputs)), axis=0)
  return offset, jax.random.split(key, num_targets)


def _support_check(apply_fn: ApplyFn, head: ProbeHead, fit: _Fit,
                   num_targets: int) -> Callable[[Params, jax.Array, jax.Array], float]:
  """For a head with a support: a check, before any fit, that every target lies in it (`TargetsOutsideSupport`
  otherwise, naming the flags that set it); compiles nothing for regression."""
  if head.support is None:
    return lambda params, inputs, key: 0.0

  def target_range(params, inputs, key):
    offset, keys = _prepare(apply_fn, head, params, inputs, key, num_targets)
    targets = jax.vmap(fit.targets, in_axes=(None, None, 0))(inputs, offset, keys)
    return jnp.min(targets), jnp.max(targets)

  compiled = _Compiled(target_range)

  def check(params: Params, inputs: jax.Array, key: jax.Array) -> float:
    (low, high), seconds = compiled(params, inputs, key)
    low, high = float(low), float(high)
    support_min, support_max = head.support
    if low < support_min or high > support_max:
      raise TargetsOutsideSupport(
          f'The plasticity probe\'s targets (the network\'s mean value per action + a sine of amplitude 1) span '
          f'[{low:.3f}, {high:.3f}], outside the categorical support [{support_min:g}, {support_max:g}] '
          f'(--support_min, --support_max): the network predicts values within 1 of the support\'s edge, where '
          f'it cannot represent the targets. Widen the support so that it holds every value the network '
          f'predicts plus 1 (e.g. --support_min={support_min - 10:g} --support_max={support_max + 10:g}).')
    return seconds

  return check


def steps_per_call(config: ProbeConfig, params: Params) -> Optional[int]:
  """Unrolled optimizer steps per compiled call; None: all steps in one compiled loop (`lax.scan`)."""
  if config.steps_per_call:
    return config.steps_per_call if config.steps_per_call < config.steps else None
  # Even a one-step probe: a loop of trip count 1 is as slow on XLA:CPU.
  return 1 if loops.avoid_compiled_loops(params) else None


class _Compiled:
  """A jit-compiled function compiled ahead of its first call, so runs can be timed apart from compilation; callers
  in several threads share one compilation."""

  def __init__(self, fn: Callable):
    self._jitted = jax.jit(fn)
    self._executables: Dict[tuple, Callable] = {}
    self._compiling = threading.Lock()

  def __call__(self, *args) -> Tuple[object, float]:
    """(outputs, seconds spent compiling for this call)."""
    key = tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args))
    compile_time = 0.0
    if key not in self._executables:
      with self._compiling:
        if key not in self._executables:
          start = time.time()
          self._executables[key] = self._jitted.lower(*args).compile()
          compile_time = time.time() - start
    return self._executables[key](*args), compile_time


Progress = Callable[[int], None]  # Called with the number of probe steps done.


def targets_at_once(config: ProbeConfig) -> int:
  """How many targets the in-turn probe fits at once: `--probe_targets_at_once`, by default one per CPU core."""
  return min(config.num_targets, config.targets_at_once or os.cpu_count() or 1)


class _Abandoned(Exception):
  """A target's fit stopped because another one failed or the caller was interrupted."""


def _in_threads(fn: Callable[[int, threading.Event], object], count: int, workers: int) -> List[object]:
  """[fn(0, stop), ..., fn(count - 1, stop)] in `workers` threads. An exception (one of fn's, or a Ctrl-C in the
  caller) sets `stop`, which fn checks between its compiled calls, cancels what has not started, and is raised
  once every thread has ended: no fit goes on behind the caller's back."""
  stop = threading.Event()
  pool = futures.ThreadPoolExecutor(workers, thread_name_prefix='probe-target')
  try:
    jobs = [pool.submit(fn, index, stop) for index in range(count)]
    futures.wait(jobs, return_when=futures.FIRST_EXCEPTION)  # Not in order: a later job's failure stops the rest.
    failed = [job.exception() for job in jobs if job.done() and job.exception() is not None]
    if failed:
      raise failed[0]
    return [job.result() for job in jobs]
  finally:
    stop.set()
    pool.shutdown(wait=True, cancel_futures=True)


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
               config: ProbeConfig, head: ProbeHead,
               targets_in_turn: Optional[bool] = None) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """The probe: all targets in one jit-compiled, vmapped computation, or (`targets_in_turn`; None: on CPU for a
  convolutional network) the same fits target by target (`make_sequential_probe`)."""
  sequential = make_sequential_probe(apply_fn, init_fn, optimizer, config, head)
  fit = _make_fit(apply_fn, init_fn, optimizer, config, head)
  check_support = _support_check(apply_fn, head, fit, config.num_targets)

  def start_all(params, inputs, key):
    offset, keys = _prepare(apply_fn, head, params, inputs, key, config.num_targets)
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
    if loops.avoid_compiled_loops(params) if targets_in_turn is None else targets_in_turn:
      return sequential(params, inputs, key, progress)
    started = time.time()
    inputs = jnp.asarray(inputs)
    chunk = steps_per_call(config, params)
    compile_time = check_support(params, inputs, key)
    if chunk is None and progress is None:
      (offset, final_losses, baselines, losses), seconds = whole(params, inputs, key)
      compile_time += seconds
    else:
      run_chunk = run if chunk else run_scanned
      (offset, opt_states, targets, baselines, step_keys), seconds = start(params, inputs, key)
      params, losses, run_seconds = _run_in_chunks(run_chunk, _copies(params, config.num_targets), opt_states,
                                                   inputs, targets, step_keys, chunk or config.progress_every,
                                                   progress)
      final_losses, final_seconds = final(params, inputs, targets)
      compile_time += seconds + run_seconds + final_seconds
    offset, final_losses, baselines, losses = jax.device_get((offset, final_losses, baselines, losses))
    return ProbeResult(final_losses, baselines, losses, offset, config.curve_every,
                       time.time() - started - compile_time, compile_time, head.fit_loss_name)

  return probe


def _copies(params: Params, num: int) -> Params:
  """`num` stacked copies of the parameters, one per target."""
  return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (num, *jnp.shape(leaf))), params)


def make_sequential_probe(apply_fn: ApplyFn, init_fn: InitFn, optimizer: optax.GradientTransformation,
                          config: ProbeConfig, head: ProbeHead) -> Callable[[Params, np.ndarray, jax.Array],
                                                                            ProbeResult]:
  """The same fits as `make_probe`'s vmapped ones, each target's in a Python loop, `config.targets_at_once` of them
  at a time in threads; `progress` hears the steps done as a share of the whole: all targets' steps over their
  number (called from those threads, one call at a time, never decreasing)."""
  host_memory.reuse_freed_memory()
  fit = _make_fit(apply_fn, init_fn, optimizer, config, head)
  check_support = _support_check(apply_fn, head, fit, config.num_targets)
  prepare = _Compiled(lambda params, inputs, key: _prepare(apply_fn, head, params, inputs, key, config.num_targets))
  start, run, scanned, final = (_Compiled(f) for f in (fit.start, fit.run_steps_unrolled, fit.run_steps,
                                                         fit.final_loss))

  def probe(params: Params, inputs: np.ndarray, key: jax.Array, progress: Optional[Progress] = None) -> ProbeResult:
    started = time.time()
    inputs = jnp.asarray(inputs)
    chunk = steps_per_call(config, params)
    chunk_run = scanned if chunk is None else run
    chunk = chunk or (config.progress_every if progress else config.steps)
    compile_time = check_support(params, inputs, key)
    (offset, keys), seconds = prepare(params, inputs, key)
    compile_time += seconds
    steps_done, lock = [0] * len(keys), threading.Lock()

    def fit_target(index: int, stop: threading.Event):
      def done(steps: int) -> None:
        if stop.is_set():
          raise _Abandoned()
        with lock:
          steps_done[index] = steps
          if progress:
            progress(sum(steps_done) // len(keys))

      (opt_state, targets, baseline, step_keys), seconds = start(params, inputs, offset, keys[index])
      fitted, losses, run_seconds = _run_in_chunks(chunk_run, params, opt_state, inputs, targets, step_keys, chunk,
                                                   done)
      final_loss, final_seconds = final(fitted, inputs, targets)
      return jax.device_get((final_loss, baseline, losses)), seconds + run_seconds + final_seconds

    fitted = _in_threads(fit_target, len(keys), targets_at_once(config))
    compile_time += sum(seconds for _, seconds in fitted)
    final_losses, baselines, losses = (np.stack(x) for x in zip(*(result for result, _ in fitted)))
    return ProbeResult(final_losses, baselines, losses, np.asarray(offset), config.curve_every,
                       time.time() - started - compile_time, compile_time, head.fit_loss_name)

  return probe


def agent_probe(agent: AgentParts, config: ProbeConfig,
                make: Callable = make_probe) -> Callable[[Params, np.ndarray, jax.Array], ProbeResult]:
  """An agent's probe (`make_probe`, or `make_sequential_probe`): its network, optimizer and output encoding."""
  return make(lambda params, obs: agent.network.apply(params, obs).outputs, agent.network.init, agent.optimizer,
              config, head_for(agent.encoding))
