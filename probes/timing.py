"""Timings of the probe and the diagnostics, flag-free: shared by the commands that print them
(`probes.benchmark`, `probes.device_check`, `launch.benchmark`)."""

from typing import Dict, Tuple

import jax
import numpy as np

from probes import plasticity
from probes.diagnostics import DiagnosticsConfig, make_diagnostics


def time_diagnostics(network, params, inputs: np.ndarray,
                     config: DiagnosticsConfig) -> Tuple[Dict[str, float], Dict[str, float]]:
  """(first call's extra seconds, second call's seconds) per diagnostic."""
  diagnose = make_diagnostics(network, config, jax.random.PRNGKey(2))
  first = diagnose(params, inputs, jax.random.PRNGKey(0)).wall_times
  second = diagnose(params, inputs, jax.random.PRNGKey(1)).wall_times
  return {name: max(first[name] - second[name], 0.0) for name in second}, second


def vmapped_and_loop(agent, params, inputs: np.ndarray,
                     config: plasticity.ProbeConfig) -> Dict[str, plasticity.ProbeResult]:
  """The plasticity probe's fits, all targets vmapped and target by target in a Python loop: each result's
  `wall_time_s` excludes its compilation (`compile_time_s`)."""
  results = {}
  for name, make in (('vmapped', plasticity.make_probe), ('loop', plasticity.make_sequential_probe)):
    results[name] = plasticity.agent_probe(agent, config, make)(params, inputs, jax.random.PRNGKey(0))
  return results
