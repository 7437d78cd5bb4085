r"""What one accelerator does for this code, measured side by side in one run.

  bash scripts/device_check.sh                   # on the device machine: installs build/device_wheels first
  python -m launch.benchmarks.device_check [--quick]        # here (--quick: small sizes, the same table, on CPU)

Prints one table, every row naming beside its figure the device, Python, JAX
and library versions it was measured with:
  * `matmul_f32`: the float32 matmul rate (default precision: TF32 on
    Hopper), the reference of the FLOP/s shares below;
  * `update_loop`: the bare jitted double-DQN update (`agents.update`) in a
    Python loop on one device-resident batch of 32 (no replay, no host
    transfer), updates/s, for `mlp` on the MDP's observations and
    `nature_dqn` on Atari's;
  * `fused_learner`: the `Learner` with `--updates_per_call` K = 1, 4, 16,
    64 (K updates per compiled call, one host sync per call, held batches),
    updates/s and their FLOP/s (XLA's cost analysis of the lowered update) as
    a share of `matmul_f32`, for the same two;
  * `probe_vmapped`, `probe_loop`: the plasticity probe's wall time (its
    default 10 targets x 2,000 steps; compilation apart), all targets vmapped
    and target by target, for `mlp`, `cnn`, `nature_dqn`, with the FLOP/s
    achieved (3 x the forward FLOPs XLA's cost analysis counts, per example
    and step) as a share of `matmul_f32` (goal: >= 40% for `cnn` on the
    probe's own path: vmapped, target by target on CPU);
  * `hessian_density`, `covariance_ck`: those diagnostics' wall times at
    their `DiagnosticsConfig` defaults (a second call: compiled), per arch.
Imports nothing of TensorFlow, Reverb, Launchpad, ale-py or OpenCV: the
device machine has JAX and the wheels `scripts/device_check.sh` installs.
"""

import dataclasses
import importlib.metadata
import platform
import time
from typing import Sequence, Tuple

from absl import app
from absl import flags
import jax

from launch import benchmarks
from agents.builder import make_agent
from agents.config import AgentConfig
from agents.loops import avoid_compiled_loops
from agents.update import UPDATE_KEEPS, init_state, jit_keeping, make_update
from launch.benchmarks import timing
from probes.measures.diagnostics import DiagnosticsConfig
from probes.measures.plasticity import ProbeConfig

FLAGS = flags.FlagValues()  # This benchmark's own (launch/benchmarks/__init__.py).
QUICK = flags.DEFINE_bool('quick', False, 'Small sizes (CPU, tests): the same rows, figures not comparable.',
                          flag_values=FLAGS)
ARCHS = flags.DEFINE_list('archs', ['mlp', 'cnn', 'nature_dqn'], 'Architectures measured (of those below).',
                          flag_values=FLAGS)

# (arch, observation shape, actions): the MDP's digits and Atari's stacked frames (the full action set).
MDP, ATARI = ((28, 28, 1), 10), ((84, 84, 4), 18)
UPDATE_ARCHS = (('mlp', *MDP), ('nature_dqn', *ATARI))
PROBE_ARCHS = (('mlp', *MDP), ('cnn', *MDP), ('nature_dqn', *ATARI))


@dataclasses.dataclass(frozen=True)
class Sizes:
  matmul: int = 8192
  matmul_repeats: int = 30
  update_seconds: float = 3.0
  update_sync_every: int = 100  # Updates between the loop's waits for the device.
  updates_per_call: Tuple[int, ...] = (1, 4, 16, 64)
  fused_seconds: float = 6.0  # Of each arch's measurement, all Ks together.
  probe: ProbeConfig = ProbeConfig()
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()


QUICK_SIZES = Sizes(matmul=256, matmul_repeats=3, update_seconds=0.2, update_sync_every=5, updates_per_call=(1, 4),
                    fused_seconds=0.3,
                    probe=ProbeConfig(steps=4, batch_size=16, num_inputs=64, curve_every=2),
                    diagnostics=DiagnosticsConfig(hessian_batch_size=32, hessian_chunk_size=32, lanczos_steps=4,
                                                  covariance_samples=8, covariance_chunk_size=8,
                                                  td_covariance_samples=8, activation_chunk_size=64))


def versions() -> str:
  """Where a figure was measured: device, Python, JAX and the libraries the agent runs on."""
  device = jax.devices()[0]
  libraries = ' '.join(f'{name} {importlib.metadata.version(name)}'
                       for name in ('jaxlib', 'dm-haiku', 'optax', 'rlax', 'chex', 'distrax'))
  return (f'{device.platform}:{device.device_kind} x{jax.device_count()} | Python {platform.python_version()} '
          f'jax {jax.__version__} {libraries}')


class Table:
  """Rows printed as they are measured (a run cut short keeps what it measured), each with `versions()`."""

  def __init__(self):
    self._where = versions()
    print(f'{"figure":16s} {"arch":11s} {"value":>11s} {"unit":10s} {"beside it":54s} | measured on', flush=True)

  def row(self, figure: str, arch: str, value: float, unit: str, note: str = '') -> None:
    print(f'{figure:16s} {arch:11s} {value:11.4g} {unit:10s} {note:54s} | {self._where}', flush=True)


def updates_per_s(arch: str, shape: Tuple[int, ...], num_actions: int, sizes: Sizes) -> float:
  """The jitted double-DQN update in a Python loop on one device-resident batch (`AgentConfig`'s batch size)."""
  config = AgentConfig(arch=arch)
  agent = make_agent(config, num_actions)
  update = jit_keeping(make_update(agent.network, agent.encoding, agent.optimizer, config.discount, agent.loss_terms),
                       UPDATE_KEEPS)
  batch = jax.device_put(timing.random_batch(shape, num_actions, config.batch_size))
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), batch.observation[:1])
  state = jax.block_until_ready(update(state, batch))[0]  # Compile.
  done, start = 0, time.perf_counter()
  while time.perf_counter() - start < sizes.update_seconds:
    for _ in range(sizes.update_sync_every):
      state, _ = update(state, batch)
    jax.block_until_ready(state)
    done += sizes.update_sync_every
  return done / (time.perf_counter() - start)


def check(sizes: Sizes, archs: Sequence[str]) -> None:
  table = Table()
  matmul = timing.matmul_flops_per_s(sizes.matmul, sizes.matmul_repeats)
  table.row('matmul_f32', '-', matmul, 'FLOP/s', f'[{sizes.matmul}]^2 float32, default precision')
  for arch, shape, num_actions in (entry for entry in UPDATE_ARCHS if entry[0] in archs):
    table.row('update_loop', arch, updates_per_s(arch, shape, num_actions, sizes), 'updates/s',
              f'batch {AgentConfig.batch_size}, observations {shape}')
    config = AgentConfig(arch=arch)
    flops = timing.update_flops(config, shape, num_actions)
    rates, _ = timing.fused_updates_per_s(config, shape, num_actions, sizes.updates_per_call, sizes.fused_seconds)
    for k, rate in rates.items():
      share = f'{flops / 1e6:.0f} MFLOP/update, {rate * flops / matmul:6.1%} of matmul_f32' if flops else \
          'no FLOP count'
      table.row('fused_learner', arch, rate, 'updates/s', f'K={k}, {share}')
  probe = sizes.probe
  for arch, shape, num_actions in (entry for entry in PROBE_ARCHS if entry[0] in archs):
    agent = make_agent(AgentConfig(arch=arch), num_actions)
    inputs = timing.random_observations(shape, probe.num_inputs)
    params = agent.network.init(jax.random.PRNGKey(0), inputs[:1])
    flops = timing.probe_flops(agent, params, inputs, probe)
    results = timing.vmapped_and_loop(agent, params, inputs, probe)
    for name, result in results.items():
      share = f'{flops / result.wall_time_s / matmul:6.1%} of matmul_f32' if flops else 'no FLOP count'
      # The goal is the probe's own path's: target by target on CPU for convolutions (probes/measures/plasticity.py).
      own = 'loop' if avoid_compiled_loops(params) else 'vmapped'
      goal = ' (goal >= 40%)' if (arch, name) == ('cnn', own) else ''
      speedup = f', loop/vmapped {results["loop"].wall_time_s / result.wall_time_s:.2f}x' if name == 'vmapped' else ''
      table.row(f'probe_{name}', arch, result.wall_time_s, 's',
                f'{probe.num_targets} x {probe.steps} steps, {share}{goal}{speedup}')
    _, run_times = timing.time_diagnostics(agent.network, params, inputs, sizes.diagnostics)
    config = sizes.diagnostics
    table.row('hessian_density', arch, run_times['hessian'], 's',
              f'{config.lanczos_steps} Lanczos steps, batch {min(config.hessian_batch_size, len(inputs))}')
    table.row('covariance_ck', arch, run_times['covariance'], 's', f'k={config.covariance_samples}')


def main(argv) -> None:
  del argv
  known = {arch for arch, _, _ in PROBE_ARCHS}
  if not set(ARCHS.value) <= known:
    raise app.UsageError(f'--archs={",".join(ARCHS.value)}: accepted: {", ".join(sorted(known))}.')
  check(QUICK_SIZES if QUICK.value else Sizes(), ARCHS.value)


if __name__ == '__main__':
  benchmarks.run(main, FLAGS)
