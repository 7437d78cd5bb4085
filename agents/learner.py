"""The learner: owns the training state, steps the pure update, checkpoints.

The same class runs in a unit test (fed a Python iterator) and in a Launchpad
node (fed a Reverb dataset); actors and evaluators read its parameters through
`get_params`, which is one quick call that never waits for an update.
"""

import threading
import time
from typing import Callable, Dict, Iterator, Optional

from absl import logging
import jax
import numpy as np

from agents import checkpointing
from agents.builder import AgentParts
from agents.config import AgentConfig
from agents.learning import TrainingState, init_state, make_target_update, make_update
from agents.types import Params, Transition

Logger = Callable[[Dict[str, object]], None]


class Learner:

  def __init__(self, agent: AgentParts, config: AgentConfig, iterator: Iterator[Transition],
               dummy_observation: np.ndarray, seed: int = 0,
               checkpoint_dir: Optional[str] = None, checkpoint_every: int = 5000,
               logger: Optional[Logger] = None, log_every: int = 100):
    self._config = config
    self._iterator = iterator
    self._checkpoint_dir = checkpoint_dir
    self._checkpoint_every = checkpoint_every
    self._logger = logger
    self._log_every = log_every
    dummy = np.asarray(dummy_observation)[None]
    self._update = jax.jit(make_update(agent.network, agent.encoding, agent.optimizer, config.discount))
    self._target_update = jax.jit(make_target_update(agent.network, agent.target_update_hooks, dummy))
    self._state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(seed), dummy)
    self._restored_from = None
    if checkpoint_dir and (path := checkpointing.latest(checkpoint_dir)):
      _, restored = checkpointing.load(path)
      self._state = jax.tree_util.tree_map(jax.numpy.asarray, TrainingState(*restored))
      self._restored_from = path
      logging.info('Learner restored step %d from %s', self.step_count, path)
    self._published = (self.step_count, jax.device_get(self._state.params))
    self._lock = threading.Lock()
    self._last_log_time = time.time()
    self._last_log_step = self.step_count

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
    """One update on the next batch; target update and checkpoint when due."""
    batch = next(self._iterator)
    self._state, metrics = self._update(self._state, batch)
    step = self.step_count
    if step % self._config.target_update_period == 0:
      self._state = self._target_update(self._state)
    if self._checkpoint_dir and step % self._checkpoint_every == 0:
      self.save()
    if step % self._log_every == 0:
      self._publish_and_log(step, metrics)
    return metrics

  def _publish_and_log(self, step: int, metrics) -> None:
    params = jax.device_get(self._state.params)
    with self._lock:
      self._published = (step, params)
    if self._logger:
      now = time.time()
      record = {'learner_step': step, **{k: float(v) for k, v in metrics.items()},
                'updates_per_s': (step - self._last_log_step) / max(now - self._last_log_time, 1e-9)}
      self._last_log_time, self._last_log_step = now, step
      self._logger(record)

  def run(self, max_steps: int, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Steps until `max_steps` updates in total (resumed runs count earlier ones)."""
    try:
      while self.step_count < max_steps and not should_stop():
        try:
          self.step()
        except StopIteration:  # The batch source ended: it was asked to stop.
          break
    finally:
      with self._lock:
        self._published = (self.step_count, jax.device_get(self._state.params))
      if self._checkpoint_dir:
        self.save()

  def save(self) -> str:
    return checkpointing.save(self._checkpoint_dir, self.step_count, tuple(self._state))

  def get_params(self) -> tuple:
    """(learner step, parameters as numpy); published every `log_every` steps."""
    with self._lock:
      return self._published

  def get_step(self) -> int:
    with self._lock:
      return self._published[0]
