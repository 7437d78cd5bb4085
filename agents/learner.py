"""The learner: owns the training state, steps the pure update, checkpoints.

The same class runs in a unit test (fed a Python iterator) and in a Launchpad
node (fed a Reverb dataset); actors read its parameters through `get_params`
and evaluators through `get_snapshot` (with the target parameters), each one
quick call that never waits for an update. At the steps its measurer asked
for (`snapshot_every`: the evaluator's probe points) and at the end of
training it also writes a snapshot file (`agents/snapshots.py`), which
outlives the measurer: a restarted evaluator still finds its points.

What a measurer gets (snapshot files and `get_snapshot`) is the state the
training of the step produced, before that step's interventions act (the
periodic actions and the target-update hooks: a reset last layer, a shrink
and perturbation): a probe step is a multiple of the target period, so
measuring after them would always measure a network just reset or perturbed.
The target parameters measured are the ones the target update's copy makes
of those parameters (at a target-update step) or the current ones.
`measure_after_interventions` measures the state after them instead.

A non-finite loss or parameter ends training at once (`Diverged`): the state
kept, published and checkpointed is the last finite one, and the learner's
last record says `diverged`.

`updates_per_call` (K) fuses up to K updates in one jitted call over K
batches (`agents.update.make_fused_update`), one host sync per call instead
of one per update: a call ends at the next step where something outside the
update is due (a periodic action, a snapshot, a checkpoint, a log), so every
event keeps its step and its state; target updates and their hooks are made
inside. Calls shorter than K are cut into powers of two, which bounds the
compiled shapes. On CPU a convolutional network's call dispatches its updates
one by one instead, still with one sync (agents/loops.py). A non-finite
update inside a call is not kept: the learner redoes the call's updates
before it (the same computation) and raises `Diverged` naming its step, as
with K = 1.
"""

import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from agents import checkpointing, host_memory, loops, snapshots
from agents.builder import AgentParts
from agents.config import AgentConfig
from agents.update import (FUSED_UPDATE_KEEPS, UPDATE_KEEPS, TrainingState, init_state, jit_keeping, make_fused_update,
                           make_target_update, make_update)
from agents.types import Logger, Network, Params, Transition

# Updates per call by default (`--updates_per_call` unset), from `launch.benchmarks.agent --sections=fused`: on CPU the
# batch-32 matmuls bound an update more than its dispatch (MLP: K = 16 1.2-1.6x K = 1 across runs, K = 64 no
# more), and a convolutional network's updates, dispatched one by one there (agents/loops.py), gain nothing; on an
# accelerator a dispatch and a host sync cost more than a small update (`scripts/device_check.sh`, one H200: K = 64
# 5.2x K = 1 for the MLP, 3.6-3.9x for the Nature DQN, 1.9x and 1.6x K = 16; docs/benchmarks.md).
DEFAULT_UPDATES_PER_CALL = {'cpu': 16, 'cpu_convolutions': 1, 'accelerator': 64}


def default_updates_per_call(params: Params) -> int:
  """The default K for this backend and network (`DEFAULT_UPDATES_PER_CALL`); `params` may be shapes."""
  if jax.default_backend() != 'cpu':
    return DEFAULT_UPDATES_PER_CALL['accelerator']
  return DEFAULT_UPDATES_PER_CALL['cpu_convolutions' if loops.has_convolutions(params) else 'cpu']


def resolve_updates_per_call(requested: Optional[int], network: Network, dummy_observation: np.ndarray) -> int:
  """`requested`, or the default for this backend and network (None); an error naming the flag below 1."""
  if requested is None:
    shapes = jax.eval_shape(network.init, jax.random.PRNGKey(0), np.asarray(dummy_observation)[None])
    return default_updates_per_call(shapes)
  if requested < 1:
    raise ValueError(f'--updates_per_call={requested}: updates per learner call must be >= 1 (or unset: the '
                     f'backend\'s default).')
  return requested


class Diverged(Exception):
  """An update produced a non-finite loss or parameter."""

  def __init__(self, step: int, metrics: Dict[str, float]):
    super().__init__(f'the update of learner step {step} gave a non-finite loss or parameter '
                     f'(td_loss {metrics.get("td_loss")}); training stopped at the last finite state, step {step - 1}.')
    self.step = step
    self.metrics = metrics


def initial_state(agent: AgentParts, seed: int, dummy_observation: np.ndarray) -> TrainingState:
  """The training state a run starts from, and the structure its checkpoints are read into (`jax.eval_shape` of
  it, where nothing should compute: the launcher)."""
  return init_state(agent.network, agent.optimizer, jax.random.PRNGKey(seed), np.asarray(dummy_observation)[None])


class Learner:

  def __init__(self, agent: AgentParts, config: AgentConfig, iterator: Iterator[Transition],
               dummy_observation: np.ndarray, seed: int = 0,
               checkpoint_dir: Optional[str] = None, checkpoint_every: int = 5000,
               logger: Optional[Logger] = None, log_every: int = 100,
               snapshot_dir: Optional[str] = None, snapshot_every: int = 0,
               measure_after_interventions: bool = False, updates_per_call: Optional[int] = 1):
    """`updates_per_call` None: the backend's default (`default_updates_per_call`)."""
    host_memory.reuse_freed_memory()
    self._config = config
    self._measure_after_interventions = measure_after_interventions
    self._snapshot_dir = snapshot_dir if snapshot_every > 0 else None
    self._snapshot_every = snapshot_every
    self._snapshot_step: Optional[int] = None  # The step of the last snapshot file written.
    self._iterator = iterator
    self._checkpoint_dir = checkpoint_dir
    self._checkpoint_every = checkpoint_every
    self._logger = logger
    self._log_every = log_every
    dummy = np.asarray(dummy_observation)[None]
    update = make_update(agent.network, agent.encoding, agent.optimizer, config.discount, agent.loss_terms)
    target_update = make_target_update(agent.network, agent.target_update_hooks, dummy)
    self._update, self._target_update = jit_keeping(update, UPDATE_KEEPS), jax.jit(target_update)
    self._has_hooks = bool(agent.target_update_hooks)
    self._periodic_actions = [(action.period, jax.jit(action.act)) for action in agent.periodic_actions]
    self._state = initial_state(agent, seed, dummy_observation)
    self.updates_per_call = resolve_updates_per_call(updates_per_call, agent.network, dummy_observation)
    self._fused = jit_keeping(make_fused_update(update, target_update, config.target_update_period),
                              FUSED_UPDATE_KEEPS)
    self._dispatched = loops.avoid_compiled_loops(self._state.params)  # A call's updates one by one.
    self._restored_from = None
    if checkpoint_dir:
      # Read into a fresh state's structure (optax's NamedTuples come from the code, never from the file).
      path, loaded, problems = checkpointing.latest_loadable(checkpoint_dir, template=self._state)
      if path is None and problems:
        raise checkpointing.CheckpointError(f'No checkpoint in {checkpoint_dir} is readable ({" ".join(problems)}); '
                                            f'move them away to start the run over.')
      if path is not None:
        self._state = jax.tree_util.tree_map(jax.numpy.asarray, loaded[1])
        self._restored_from = path
    self._step = int(self._state.step)  # Kept on the host: reading the state's would wait for the device.
    if self._restored_from:
      logging.info('Learner restored step %d from %s', self._step, path)
    # (params, target params) of the latest step as measurers see them (module docstring) when interventions
    # made them differ from the state's; None: the state's.
    self._measured: Optional[Tuple[object, object]] = None
    self._lock = threading.Lock()
    self._publish()
    if self.step_count == 0:
      self._write_snapshot()  # theta_0: a resumed learner wrote it at its first start.
    self._last_log_step = self.step_count
    # (time, step, input wait, parameter pulls) the next record's rates count from: the end of the first update,
    # so that neither the replay's fill nor compilation weighs on them.
    self._rate_since: Optional[Tuple[float, int, float, int]] = None
    self._pulls = 0  # `get_params` answers that carried parameters (actors' pulls of newer ones).
    self._last_metrics: Optional[Dict[str, float]] = None
    self.diverged_at: Optional[int] = None

  @property
  def step_count(self) -> int:
    return self._step

  @property
  def state(self) -> TrainingState:
    return self._state

  def _events(self) -> List[int]:
    """The periods of what happens outside the update: periodic actions, snapshots, checkpoints, logs."""
    periods = [period for period, _ in self._periodic_actions] + [self._log_every]
    periods += [self._snapshot_every] if self._snapshot_dir else []
    return periods + ([self._checkpoint_every] if self._checkpoint_dir else [])

  def _call_size(self, max_updates: Optional[int]) -> int:
    """Updates of the next call: up to K, ending at the next event or at `max_updates`; shorter than K, a power
    of two (one compiled shape each)."""
    step = self.step_count
    size = min([self.updates_per_call] + [period - step % period for period in self._events()])
    if max_updates is not None:
      size = max(min(size, max_updates - step), 1)
    return size if size == self.updates_per_call else 1 << (size.bit_length() - 1)

  def step(self, max_updates: Optional[int] = None) -> Dict[str, float]:
    """One call: up to `updates_per_call` updates on the next batches (not past `max_updates` in total), then the
    interventions' periodic actions, target update, snapshot, checkpoint and log due at its last step.

    Returns the last update's metrics. Raises `Diverged`, keeping the state of the last finite update, if an
    update was not finite.
    """
    return self._apply([next(self._iterator) for _ in range(self._call_size(max_updates))])

  def _apply(self, batches: Sequence[Transition]) -> Dict[str, float]:
    start = self.step_count
    if len(batches) == 1 or self._dispatched:
      state, each = self._state, []
      for i, batch in enumerate(batches):
        state, metrics = self._update(state, batch)
        each.append(metrics)
        if i < len(batches) - 1 and (start + i + 1) % self._config.target_update_period == 0:
          state = self._target_update(state)  # Inside the call (module docstring); the last step's is after it.
      # One sync per call: no update is kept before it is checked.
      finite = [bool(flag) for flag in jax.device_get([metrics.pop('finite') for metrics in each])]
      at = lambda i: each[i]
    else:
      state, stacked = self._fused(self._state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *batches))
      finite = list(np.asarray(stacked.pop('finite')))
      at = lambda i: {name: values[i] for name, values in stacked.items()}
    if not all(finite):
      bad = finite.index(False)
      if bad:
        self._apply(batches[:bad])  # The updates before it, as a call that ends there: its last finite state.
      raise Diverged(start + bad + 1, {k: float(v) for k, v in at(bad).items()})
    metrics = at(len(batches) - 1)
    self._state, self._step = state, start + len(batches)
    step = self._step
    target_update = step % self._config.target_update_period == 0
    trained = (state.params, state.params if target_update else state.target_params)
    if self._rate_since is None:
      self._rate_since = (time.time(), step, self._input_wait(), self._pulls)
    intervened = target_update and self._has_hooks
    for period, act in self._periodic_actions:
      if step % period == 0:
        self._state, action_metrics = act(self._state, batches[-1])
        metrics = {**metrics, **action_metrics}
        intervened = True
    if target_update:
      self._state = self._target_update(self._state)
    self._measured = None if self._measure_after_interventions or not intervened else trained
    self._last_metrics = metrics
    if self._snapshot_dir and step % self._snapshot_every == 0:
      self._write_snapshot()  # Before the checkpoint: a learner resumed from it has written the snapshot.
    if self._checkpoint_dir and step % self._checkpoint_every == 0:
      self.save()
    if step % self._log_every == 0:
      self._publish()
      self._log(step, metrics)
    return metrics

  def _publish(self) -> None:
    params, target_params = jax.device_get((self._state.params, self._state.target_params))
    measured = (params, target_params) if self._measured is None else jax.device_get(self._measured)
    with self._lock:
      self._published = (self.step_count, params, target_params)
      self._published_measured = (self.step_count, *measured)

  def _input_wait(self) -> float:
    """Seconds the learner has waited for batches (a prefetching iterator's count; 0 for a plain one)."""
    return getattr(self._iterator, 'wait_seconds', 0.0)

  def _log(self, step: int, metrics, **extra) -> None:
    """A record; since the previous one, `updates_per_s`, `input_wait_fraction` (of the time spent waiting for
    a batch: the learner's input-bound share) and `param_pulls_per_s` (parameters sent to actors)."""
    if self._logger:
      now = time.time()
      record = {'learner_step': step, **{k: float(v) for k, v in metrics.items()}, **extra}
      wait, pulls = self._input_wait(), self._pulls
      if self._rate_since is not None and step > self._rate_since[1]:
        since, since_step, since_wait, since_pulls = self._rate_since
        elapsed = max(now - since, 1e-9)
        record['updates_per_s'] = (step - since_step) / elapsed
        record['input_wait_fraction'] = min((wait - since_wait) / elapsed, 1.0)
        record['param_pulls_per_s'] = (pulls - since_pulls) / elapsed
      self._rate_since, self._last_log_step = (now, step, wait, pulls), step
      self._logger(record)

  def run(self, max_steps: int, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Steps until `max_steps` updates in total (resumed runs count earlier ones).

    Whatever ends it, the last step is logged, published and checkpointed;
    on divergence the last finite step is, and `Diverged` is raised after.
    When training is over (`max_steps` reached, or diverged; not on a stop)
    the last step's snapshot file is written too: the end is always measured.
    """
    diverged = None
    try:
      while self.step_count < max_steps and not should_stop():
        try:
          self.step(max_steps)
        except StopIteration:  # The batch source ended: it was asked to stop.
          break
        except Diverged as e:
          diverged = e
          break
    finally:
      self._publish()
      if (self.step_count >= max_steps or diverged is not None) and self._snapshot_step != self.step_count:
        self._write_snapshot()
      if self._checkpoint_dir:
        self.save()
      if diverged is not None:
        self.diverged_at = diverged.step
        logging.error('Learner diverged: %s', diverged)
        self._log(diverged.step, diverged.metrics, diverged=True)
      elif self._last_metrics is not None and self._last_log_step != self.step_count:
        self._log(self.step_count, self._last_metrics)
    if diverged is not None:
      raise diverged

  def _write_snapshot(self) -> None:
    if self._snapshot_dir:
      measured = self._measured or (self._state.params, self._state.target_params)
      snapshots.save(self._snapshot_dir, self.step_count, *measured)
      self._snapshot_step = self.step_count

  def save(self) -> str:
    return checkpointing.save(self._checkpoint_dir, self.step_count, self._state)

  def get_params(self, held_step: Optional[int] = None) -> Optional[tuple]:
    """(learner step, parameters as numpy), published every `log_every` steps and at the end.

    The step is the parameters' version: None when it is `held_step`, the step of the parameters the caller
    holds (a CNN's are 52 MB a pull; unchanged ones need not cross the wire again). A learner resumed from a
    checkpoint publishes that step's parameters, the very ones it published at that step before.
    """
    with self._lock:
      if held_step is not None and self._published[0] == held_step:
        return None
      self._pulls += 1
      return self._published[:2]

  def get_snapshot(self) -> tuple:
    """(learner step, parameters, target parameters) as numpy, published with `get_params`, as measurers see
    them (before the step's interventions: module docstring)."""
    with self._lock:
      return self._published_measured

  def get_initial_snapshot(self) -> tuple:
    """(0, theta_0, theta_0): the run's initial parameters, which are its own target at step 0.

    An evaluator that starts after training has (the learner on an accelerator is fast) still
    measures theta_0, the reference of the loss of plasticity.
    """
    initial = jax.device_get(self._state.initial_params)
    return 0, initial, initial

  def get_step(self) -> int:
    with self._lock:
      return self._published[0]


def pull_when_newer(get_params: Callable[[Optional[int]], Optional[tuple]]) -> Callable[[], tuple]:
  """An actor's `params_source` over a learner's `get_params(held_step)` (direct, or a Courier call): each call
  returns (step, parameters), fetching them only when the learner has published newer ones, and putting them on
  the device once (not at every policy call)."""
  held = None

  def params_source() -> tuple:
    nonlocal held
    update = get_params(None if held is None else held[0])
    if update is not None:
      held = (update[0], jax.device_put(update[1]))
    return held

  return params_source
