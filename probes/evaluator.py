"""The evaluator: snapshots the learner's parameters and probes their plasticity.

Launchpad-free: it reads parameters and probe inputs through two callables, so
the same class serves the built-in evaluator node, an evaluator attached to a
live run, and unit tests.
"""

import os
import time
from typing import Callable, Dict, Optional, Tuple

from absl import logging
import jax
import numpy as np

from agents.builder import AgentParts
from agents.types import Params
from launch.loggers import JsonlLogger
from probes import diagnostics, plasticity

PROBES = 'probes'
DIAGNOSTICS = 'diagnostics'


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

  def evaluate(self) -> Dict[str, object]:
    """Probes (and diagnoses) the learner's current parameters once; returns the probe record."""
    learner_step, params = self._params_source()
    inputs = self._observation_source(self._probe_config.num_inputs)
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
          should_stop: Callable[[], bool] = lambda: False, poll_seconds: float = 0.5) -> None:
    """Probes at learner steps 0, probe_every, 2 * probe_every, ... and once at the end.

    The probe runs on a snapshot while the learner keeps training; when a probe
    takes longer than `probe_every` learner steps, the next one takes the newest
    snapshot (the record's `learner_step` says which).
    """
    next_step = 0
    if self.last_probed_step is not None:
      next_step = (self.last_probed_step // probe_every + 1) * probe_every
    while not should_stop():
      finished = learner_finished()
      step = learner_step()
      if step >= next_step or (finished and step != self.last_probed_step):
        self.evaluate()
        next_step = (self.last_probed_step // probe_every + 1) * probe_every
        continue
      if finished:
        return
      time.sleep(poll_seconds)
