"""The evaluator: snapshots the learner's parameters and probes their plasticity.

Launchpad-free: it reads parameters and probe inputs through two callables, so
the same class serves the built-in evaluator node, an evaluator attached to a
live run, and unit tests.
"""

import os
import queue
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import jax
import numpy as np

from agents.builder import AgentParts
from agents.types import Params
from launch.loggers import JsonlLogger
from probes import diagnostics, plasticity

PROBES = 'probes'
DIAGNOSTICS = 'diagnostics'


class Snapshot(NamedTuple):
  """What one probe point measures: the learner's parameters at a step, and probe inputs from replay."""
  learner_step: int
  params: Params
  inputs: np.ndarray


class Evaluator:
  """Probes (and diagnoses) parameter snapshots, writing under `out_dir`.

  Files: probes.jsonl, diagnostics.jsonl, diagnostics/covariance_<step>.npy
  and tensorboard/<probes,diagnostics>/ (see WORKSPACE.md).
  """

  def __init__(self, agent: AgentParts, probe_config: plasticity.ProbeConfig,
               params_source: Callable[[], Tuple[int, Params]],
               observation_source: Callable[[int], np.ndarray], out_dir: str,
               diagnostics_config: Optional[diagnostics.DiagnosticsConfig] = None, seed: int = 0):
    self._probe_config = probe_config
    self._params_source = params_source
    self._observation_source = observation_source
    self._rng = jax.random.PRNGKey(seed)
    network = agent.network
    self._probe = plasticity.make_probe(
        apply_fn=lambda params, obs: network.apply(params, obs).outputs,
        init_fn=network.init, optimizer=agent.optimizer, config=probe_config)
    self._probe_logger = JsonlLogger(out_dir, PROBES)
    self._diagnose = None
    if diagnostics_config is not None:
      self._diagnose = diagnostics.make_diagnostics(network, diagnostics_config)
      self._diagnostics_logger = JsonlLogger(out_dir, DIAGNOSTICS)
      self._covariance_dir = os.path.join(out_dir, DIAGNOSTICS)
      os.makedirs(self._covariance_dir, exist_ok=True)
    self.last_probed_step: Optional[int] = None

  def snapshot(self) -> Snapshot:
    """One quick call for the parameters (the learner never waits) and one replay sample."""
    learner_step, params = self._params_source()
    return Snapshot(int(learner_step), params, self._observation_source(self._probe_config.num_inputs))

  def evaluate(self, snapshot: Optional[Snapshot] = None) -> Dict[str, object]:
    """Probes (and diagnoses) a snapshot, by default of the learner now; returns the probe record."""
    learner_step, params, inputs = snapshot or self.snapshot()
    self._rng, probe_key, diagnostics_key = jax.random.split(self._rng, 3)
    start = time.time()
    result = self._probe(params, inputs, probe_key)
    record = {'learner_step': int(learner_step), **result.as_record()}
    logging.info('Probe at learner step %d: plasticity %.4f (final loss %.4f, baseline %.4f) in %.1fs',
                 learner_step, record['plasticity'], record['final_loss_mean'], record['baseline'],
                 time.time() - start)
    self._probe_logger(record)
    if self._diagnose is not None:
      diagnosed = self._diagnose(params, inputs, diagnostics_key)
      np.save(os.path.join(self._covariance_dir, f'covariance_{int(learner_step):09d}.npy'), diagnosed.covariance)
      self._diagnostics_logger({'learner_step': int(learner_step), **diagnosed.as_record()})
      logging.info('Diagnostics at learner step %d in %.1fs', learner_step, diagnosed.wall_times['total'])
    self.last_probed_step = int(learner_step)
    return record

  def run(self, probe_every: int, learner_step: Callable[[], int], learner_finished: Callable[[], bool],
          should_stop: Callable[[], bool] = lambda: False, poll_seconds: float = 0.5, max_pending: int = 4) -> None:
    """Probes snapshots taken at learner steps 0, probe_every, 2 * probe_every, ... and at the end.

    A thread takes each snapshot on time (at the first look at or past each
    multiple of probe_every) while earlier snapshots are probed, so a probe
    slower than the learner still measures the scheduled steps. At most
    `max_pending` snapshots wait; a probe point that finds them all waiting is
    skipped with a warning (the record's `learner_step` says which were kept);
    the end of training is always probed.
    """
    pending: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors = []

    def take_snapshots() -> None:
      try:  # `should_stop` stays in the caller's thread: Launchpad's stop event answers only there.
        self._take_snapshots(probe_every, learner_step, learner_finished, stop, poll_seconds, max_pending, pending)
      except BaseException as e:  # pylint: disable=broad-except  Re-raised in the caller's thread.
        errors.append(e)
      finally:
        pending.put(None)

    thread = threading.Thread(target=take_snapshots, name='evaluator-snapshots', daemon=True)
    thread.start()
    try:
      while not should_stop():
        try:
          snapshot = pending.get(timeout=max(poll_seconds, 0.01))
        except queue.Empty:
          continue
        if snapshot is None:
          break
        self.evaluate(snapshot)
    finally:
      stop.set()
    thread.join()
    if errors:
      raise errors[0]

  def _take_snapshots(self, probe_every: int, learner_step: Callable[[], int], learner_finished: Callable[[], bool],
                      stop: threading.Event, poll_seconds: float, max_pending: int, pending: queue.Queue) -> None:
    last = self.last_probed_step
    next_step = 0 if last is None else (last // probe_every + 1) * probe_every
    while not stop.is_set():
      finished = learner_finished()
      step = learner_step()
      if step >= next_step or (finished and step != last):
        if finished or pending.qsize() < max_pending:
          snapshot = self.snapshot()
          pending.put(snapshot)
          last = snapshot.learner_step
        else:
          logging.warning('Evaluator behind: %d snapshots wait, so the probe at learner step %d is skipped '
                          '(fewer probe steps, a larger probe_every or an accelerator keep up).', max_pending, step)
        next_step = (step // probe_every + 1) * probe_every
        continue
      if finished:
        return
      stop.wait(poll_seconds)
