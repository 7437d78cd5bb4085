"""Timings of the learner, the probe and the diagnostics, flag-free: shared by the commands that print them
(`launch.benchmarks.probes`, `launch.benchmarks.device_check`, `launch.benchmarks.agent`)."""

import functools
import itertools
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from agents.builder import make_agent
from agents.config import AgentConfig
from agents.learner import Learner
from agents.types import Transition
from agents.update import init_state, make_update
from probes.measures import plasticity
from probes.measures.diagnostics import DiagnosticsConfig, make_diagnostics


def matmul_flops_per_s(n: int = 1024, repeats: int = 30) -> float:
  """float32 [n, n] @ [n, n] at default precision, FLOP/s over `repeats` compiled calls: the reference rate.

  After as many untimed calls: on a core that was doing something else, the first tenths of a second ran at 55-65%
  of the rate (measured on 2 cores, 2026-12-04)."""
  a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready([matmul(a, b) for _ in range(repeats)])
  start = time.perf_counter()
  jax.block_until_ready([matmul(a, b) for _ in range(repeats)])
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_observations(shape: Tuple[int, ...], count: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def random_batch(shape: Tuple[int, ...], num_actions: int, batch_size: int, seed: int = 0) -> Transition:
  """A batch of uint8 observations of `shape` and random actions and rewards, as the replay gives them."""
  rng = np.random.default_rng(seed)
  return Transition(observation=random_observations(shape, batch_size, seed + 1),
                    action=rng.integers(0, num_actions, batch_size).astype(np.int32),
                    reward=rng.standard_normal(batch_size).astype(np.float32),
                    discount=np.ones(batch_size, np.float32),
                    next_observation=random_observations(shape, batch_size, seed + 2))


def hlo_flops(fn: Callable, *args) -> Optional[float]:
  """FLOPs of `fn(*args)` by XLA's cost analysis of the HLO lowered for the CPU: the same program everywhere, where
  a GPU's analysis (current JAX) counts none before compilation and no cuDNN convolution after it, and the compiled
  CPU analysis omits dots. None where the analysis counts none."""
  on_cpu = jax.device_put(args, jax.devices('cpu')[0])
  analysis = jax.jit(fn).lower(*on_cpu).cost_analysis()
  if isinstance(analysis, (list, tuple)):  # JAX 0.4.30: one dict per computation; current JAX: the dict.
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and analysis.get('flops', 0) > 0 else None


def update_flops(config: AgentConfig, shape: Tuple[int, ...], num_actions: int) -> Optional[float]:
  """FLOPs of one double-DQN update (`hlo_flops`)."""
  agent = make_agent(config, num_actions)
  batch = random_batch(shape, num_actions, config.batch_size)
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), batch.observation[:1])
  update = make_update(agent.network, agent.encoding, agent.optimizer, config.discount, agent.loss_terms)
  return hlo_flops(update, state, batch)


def fused_updates_per_s(config: AgentConfig, shape: Tuple[int, ...], num_actions: int, ks: Sequence[int],
                        seconds: float, rounds: int = 3, held: int = 64) -> Tuple[Dict[int, float], float]:
  """Updates/s of the `Learner` with each `--updates_per_call` K of `ks` (its calls, syncs and host logic, no
  event due), on `held` random batches cycled on the device, and the float32 matmul rate (`matmul_flops_per_s`)
  beside them: the Ks and the matmul alternate in `rounds` rounds (of `seconds / rounds` per K), after a compiling
  call, so that a change in the machine's load weighs on all."""
  agent = make_agent(config, num_actions)
  batches = [jax.device_put(random_batch(shape, num_actions, config.batch_size, seed)) for seed in range(held)]
  dummy = batches[0].observation[0]
  learners = {k: Learner(agent, config, itertools.cycle(batches), dummy, log_every=10**9, updates_per_call=k)
              for k in ks}
  done, spent = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0.0)
  for learner in learners.values():
    jax.block_until_ready(learner.step())  # Compile.
  matmul = []
  for _ in range(rounds):
    for k, learner in learners.items():
      start_step, start = learner.step_count, time.perf_counter()
      while time.perf_counter() - start < seconds / rounds:
        learner.step()
      jax.block_until_ready(learner.state)
      done[k] += learner.step_count - start_step
      spent[k] += time.perf_counter() - start
    matmul.append(matmul_flops_per_s())
  return {k: done[k] / spent[k] for k in ks}, float(np.median(matmul))


def probe_flops(agent, params, inputs: np.ndarray, config: plasticity.ProbeConfig) -> Optional[float]:
  """Model FLOPs of one probe: per target, `steps` minibatch steps (forward and backward: 3 x the forward) and
  two forward passes over every input (its target function, its final loss)."""
  apply_fn = lambda p, x: agent.network.apply(p, x).outputs
  step, whole = (hlo_flops(apply_fn, params, inputs[:n]) for n in (config.batch_size, inputs.shape[0]))
  if step is None or whole is None:
    return None
  return config.num_targets * (3 * config.steps * step + 2 * whole)


def time_diagnostics(network, params, inputs: np.ndarray,
                     config: DiagnosticsConfig) -> Tuple[Dict[str, float], Dict[str, float]]:
  """(first call's extra seconds, second call's seconds) per diagnostic."""
  diagnose = make_diagnostics(network, config, jax.random.PRNGKey(2))
  first = diagnose(params, inputs, jax.random.PRNGKey(0)).wall_times
  second = diagnose(params, inputs, jax.random.PRNGKey(1)).wall_times
  return {name: max(first[name] - second[name], 0.0) for name in second}, second


def vmapped_and_loop(agent, params, inputs: np.ndarray,
                     config: plasticity.ProbeConfig) -> Dict[str, plasticity.ProbeResult]:
  """The plasticity probe's fits, all targets vmapped and target by target in a Python loop (the probe's own
  path on CPU for a convolutional network): each result's `wall_time_s` excludes its compilation
  (`compile_time_s`)."""
  results = {}
  vmapped = functools.partial(plasticity.make_probe, targets_in_turn=False)
  for name, make in (('vmapped', vmapped), ('loop', plasticity.make_sequential_probe)):
    results[name] = plasticity.agent_probe(agent, config, make)(params, inputs, jax.random.PRNGKey(0))
  return results
