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
"""

import threading
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

from absl import logging
import jax
import numpy as np

from agents import checkpointing, snapshots
from agents.builder import AgentParts
from agents.config import AgentConfig
from agents.update import TrainingState, init_state, make_target_update, make_update
from agents.types import Logger, Transition


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
               measure_after_interventions: bool = False):
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
    self._update = jax.jit(make_update(agent.network, agent.encoding, agent.optimizer, config.discount,
                                       agent.loss_terms))
    self._target_update = jax.jit(make_target_update(agent.network, agent.target_update_hooks, dummy))
    self._has_hooks = bool(agent.target_update_hooks)
    self._periodic_actions = [(action.period, jax.jit(action.act)) for action in agent.periodic_actions]
    self._state = initial_state(agent, seed, dummy_observation)
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
        logging.info('Learner restored step %d from %s', self.step_count, path)
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
    return int(self._state.step)

  @property
  def restored_from(self) -> Optional[str]:
    return self._restored_from

  @property
  def state(self) -> TrainingState:
    return self._state

  def step(self) -> Dict[str, float]:
    """One update on the next batch; the interventions' periodic actions, target update and checkpoint when due.

    Raises `Diverged`, keeping the state before the update, if it was not finite.
    """
    batch = next(self._iterator)
    state, metrics = self._update(self._state, batch)
    finite = bool(metrics.pop('finite'))  # One sync per update: the step is not applied before it is checked.
    if not finite:
      raise Diverged(int(state.step), {k: float(v) for k, v in metrics.items()})
    self._state = state
    step = self.step_count
    target_update = step % self._config.target_update_period == 0
    trained = (state.params, state.params if target_update else state.target_params)
    if self._rate_since is None:
      self._rate_since = (time.time(), step, self._input_wait(), self._pulls)
    intervened = target_update and self._has_hooks
    for period, act in self._periodic_actions:
      if step % period == 0:
        self._state, action_metrics = act(self._state, batch)
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
          self.step()
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
