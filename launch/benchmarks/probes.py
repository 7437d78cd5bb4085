r"""Cost of the evaluator's diagnostics against the plasticity probe, per architecture.

  python -m launch.benchmarks.probes --archs=mlp,cnn [--lanczos_steps=30 --probe_steps=200 --covariance_samples=64]
      [--width_multiplier=0.125 --optimizer=rmsprop]

For each architecture (at initialisation, 10 actions, random uint8 inputs of
the MNIST MDP's shape) prints each diagnostic's wall time after compilation
(the second call), its warm-up (the first call's extra time: compilation plus
first-touch allocation; noisy on a shared machine), and its share of one
evaluator cycle:
the plasticity probe at its default `ProbeConfig` plus every diagnostic at its
default `DiagnosticsConfig`. Fewer Lanczos steps, probe steps or covariance
samples may be timed; their times are then extrapolated to the defaults, as
printed: Lanczos linearly in steps; the probe as its fixed cost (targets, final
loss) plus its per-step cost, both measured from runs at N and 2N steps; the
covariance as a k + b k^2 (row blocks of gradients, then block pairs), fitted
to runs at k and 2k samples.
Also prints the largest buffers (the Lanczos basis and the gradient blocks), and
the probe's achieved FLOP/s (`timing.probe_flops`: 3 x the forward FLOPs of
each minibatch step, by XLA's cost analysis) as `NN% of the matmul rate`, the
float32 rate of a 1024 x 1024 matmul measured in the same run, just before and
after the probe (their mean). Where the probe fits its targets in turn (CPU,
convolutions), it is timed again one target at a time, against the default
of one per core at once.
Unregistered architectures are skipped with a note.
"""

import dataclasses
import time
from typing import Optional, Tuple

from absl import flags
import jax
import numpy as np

from launch import benchmarks
from agents import config_flags, networks
from agents.builder import make_agent
from agents.loops import avoid_compiled_loops
from probes.measures import curvature
from probes.measures import plasticity
from launch.benchmarks import timing
from probes.measures.diagnostics import DiagnosticsConfig, covariance_block_size
from probes.records.run_dir import ExperimentConfig

FLAGS = flags.FlagValues()  # This benchmark's own (launch/benchmarks/__init__.py).
ARCHS = flags.DEFINE_list('archs', ['mlp', 'cnn'], 'Architectures to benchmark.', flag_values=FLAGS)
NUM_INPUTS = flags.DEFINE_integer('num_inputs', 2048, 'Replay observations given to the probe and diagnostics.',
                                  flag_values=FLAGS)
OBSERVATION_SHAPE = flags.DEFINE_list('observation_shape', ['28', '28', '1'], 'Observation shape.', flag_values=FLAGS)
NUM_ACTIONS = flags.DEFINE_integer('num_actions', 10, 'Actions (network outputs).', flag_values=FLAGS)
# The run's own declarations: each value is timed, then extrapolated to the field's default.
FIELDS = config_flags.define(ExperimentConfig, only=['lanczos_steps', 'probe_steps', 'covariance_samples',
                                                     'covariance_memory_mb', 'width_multiplier', 'optimizer'],
                             help_suffix=' Timed at this value, then extrapolated to the default.', flag_values=FLAGS)


def _run() -> ExperimentConfig:
  return config_flags.build(ExperimentConfig, FIELDS)


def _config() -> DiagnosticsConfig:
  return _run().diagnostics


def _probe_config(inputs: np.ndarray, steps: Optional[int] = None, **options) -> plasticity.ProbeConfig:
  steps = steps or _run().probe.steps
  return dataclasses.replace(plasticity.ProbeConfig(), steps=steps, num_inputs=inputs.shape[0],
                             curve_every=min(20, steps), **options)


def _time_probe(agent, params, inputs: np.ndarray, steps: Optional[int] = None, **options) -> Tuple[float, float]:
  """(compilation seconds, run seconds) of the plasticity probe at `steps` (default `--probe_steps`), its config's
  other fields `options`."""
  result = plasticity.agent_probe(agent, _probe_config(inputs, steps, **options))(params, inputs,
                                                                                  jax.random.PRNGKey(0))
  return result.compile_time_s, result.wall_time_s


def _extrapolate(n: int, seconds: float, seconds_twice: float, target: int, powers: Tuple[int, int]) -> float:
  """t(target) for t(n) = a n^p + b n^q (p < q; a, b >= 0) fitted to the times measured at n and 2n."""
  p, q = powers
  high = max(seconds_twice - 2**p * seconds, 0.0) / (2**q - 2**p)  # b n^q
  low = max(seconds - high, 0.0)  # a n^p
  return low * (target / n)**p + high * (target / n)**q


def _covariance_at_default(network, params, inputs: np.ndarray) -> float:
  """Seconds of C_k at the default k, from a k + b k^2 fitted to compiled runs at k and 2k samples."""
  config = _config()
  block = covariance_block_size(config, params)
  output_fn = lambda p, x: network.apply(p, x).outputs
  per_example_gradients = curvature.make_per_example_gradients(curvature.regression_example_loss(output_fn))
  k = config.covariance_samples
  targets = np.asarray(jax.jit(output_fn)(params, inputs[:max(2 * k, block)])) + 1.0
  for size in {block, k % block, 2 * k % block} - {0}:  # Compile every block shape first.
    per_example_gradients(params, None, (inputs[:size], targets[:size])).block_until_ready()
  seconds = []
  for samples in (k, 2 * k):
    start = time.time()
    curvature.gradient_covariance(per_example_gradients, params, None, (inputs[:samples], targets[:samples]),
                                  block, config.kmeans_clusters, config.kmeans_seed)
    seconds.append(time.time() - start)
  return _extrapolate(k, *seconds, DiagnosticsConfig.covariance_samples, powers=(1, 2))


def benchmark(arch: str, inputs: np.ndarray) -> None:
  agent = make_agent(dataclasses.replace(_run().agent, arch=arch), NUM_ACTIONS.value)
  params = agent.network.init(jax.random.PRNGKey(0), inputs[:1])
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f'\narch={arch}: {num_params:,} parameters, inputs {inputs.shape}, {jax.device_count()} '
        f'{jax.default_backend()} device(s)')
  compile_times, run_times = timing.time_diagnostics(agent.network, params, inputs, _config())
  del compile_times['total'], run_times['total']
  lanczos_scale = DiagnosticsConfig.lanczos_steps / _config().lanczos_steps
  probe_scale = plasticity.ProbeConfig.steps / _run().probe.steps
  matmul_before = timing.matmul_flops_per_s()
  probe_compile, probe_run = _time_probe(agent, params, inputs)
  matmul = (matmul_before + timing.matmul_flops_per_s()) / 2
  probe_flops = timing.probe_flops(agent, params, inputs, _probe_config(inputs))
  probe_at_default = probe_run
  if probe_scale != 1:
    # Fixed cost (the targets, the final loss) and per-step cost from two step counts.
    _, probe_twice = _time_probe(agent, params, inputs, 2 * _run().probe.steps)
    probe_at_default = _extrapolate(_run().probe.steps, probe_run, probe_twice, plasticity.ProbeConfig.steps,
                                    powers=(0, 1))
  at_default = dict(run_times, hessian=run_times['hessian'] * lanczos_scale)
  covariance_extrapolated = _config().covariance_samples != DiagnosticsConfig.covariance_samples
  if covariance_extrapolated:
    at_default['covariance'] = _covariance_at_default(agent.network, params, inputs)
  rows = [(name, compile_times[name], run_times[name], at_default[name]) for name in run_times]
  rows.append(('plasticity_probe', probe_compile, probe_run, probe_at_default))
  cycle = sum(row[3] for row in rows)
  print(f'  {"":18s}{"warmup_s":>10s}{"run_s":>10s}{"run_s@default":>15s}{"cycle_share":>13s}')
  for name, compiled, ran, scaled in rows:
    print(f'  {name:18s}{compiled:10.2f}{ran:10.2f}{scaled:15.2f}{scaled / cycle:13.1%}')
  print(f'  {"cycle":18s}{"":10s}{"":10s}{cycle:15.2f}{1:13.1%}')
  print(f'  diagnostics: {sum(row[3] for row in rows[:-1]) / cycle:.1%} of the cycle')
  block = covariance_block_size(_config(), params)
  print(f'  memory: Lanczos basis {_config().lanczos_steps} x {num_params:,} float32 = '
        f'{_config().lanczos_steps * num_params * 4 / 2**20:.0f} MiB; gradient blocks 2 x {block} x {num_params:,} '
        f'float32 = {2 * block * num_params * 4 / 2**20:.0f} MiB')
  if lanczos_scale != 1:
    print(f'  hessian timed at {_config().lanczos_steps} Lanczos steps, x{lanczos_scale:g} to '
          f'{DiagnosticsConfig.lanczos_steps} (linear extrapolation)')
  if covariance_extrapolated:
    print(f'  covariance timed at k={_config().covariance_samples} (and {2 * _config().covariance_samples} for the '
          f'fit); a k + b k^2 extrapolated to k={DiagnosticsConfig.covariance_samples}')
  if probe_flops:
    print(f'  plasticity probe: {probe_flops / probe_run / 1e9:.1f} GFLOP/s = {probe_flops / probe_run / matmul:.0%} '
          f'of the matmul rate ({matmul / 1e9:.1f} GFLOP/s float32, 1024^2, measured beside it)'
          + (', targets in turn (convolutions on XLA:CPU)' if avoid_compiled_loops(params) else ''))
  if avoid_compiled_loops(params):
    _, one_at_a_time = _time_probe(agent, params, inputs, targets_at_once=1)
    at_once = plasticity.targets_at_once(_probe_config(inputs))
    print(f'  plasticity probe, targets in turn: {at_once} at once (the default, one per core) {probe_run:.2f} s, '
          f'one at a time {one_at_a_time:.2f} s: {one_at_a_time / probe_run:.2f}x')
  if probe_scale != 1:
    print(f'  plasticity probe timed at {_run().probe.steps} and {2 * _run().probe.steps} steps; fixed cost plus '
          f'per-step cost extrapolated to {plasticity.ProbeConfig.steps}')


def main(argv) -> None:
  del argv
  shape = tuple(int(x) for x in OBSERVATION_SHAPE.value)
  inputs = np.random.default_rng(0).integers(0, 256, (NUM_INPUTS.value, *shape), dtype=np.uint8)
  config = DiagnosticsConfig()
  print(f'Diagnostics defaults: Hessian batch {config.hessian_batch_size} (chunks of {config.hessian_chunk_size}), '
        f'{config.lanczos_steps} Lanczos steps x {config.lanczos_draws} draw(s), covariance k='
        f'{config.covariance_samples} (blocks of up to {config.covariance_chunk_size} within '
        f'{_config().covariance_memory_mb:g} MiB); probe: '
        f'{plasticity.ProbeConfig.num_targets} targets x {plasticity.ProbeConfig.steps} steps.')
  for arch in ARCHS.value:
    if arch not in networks.ARCHITECTURES:
      print(f'\narch={arch}: not registered in agents/networks.py; skipped.')
      continue
    benchmark(arch, inputs)


if __name__ == '__main__':
  benchmarks.run(main, FLAGS)
