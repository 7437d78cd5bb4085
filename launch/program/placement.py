"""Where each node's JAX computes (`--learner_device`, `--evaluator_device`): the one translation into process
environments, applied under local_mp.

Replay and actors always run on the CPU. The learner and the evaluator each
take `cpu`, `gpu` or `auto` (the GPU when one is visible). With two or more
GPUs they get one each; on one GPU they share it, both without JAX's
preallocation of 75% of its memory (`XLA_PYTHON_CLIENT_PREALLOCATE=false`),
each capped at `SHARED_GPU_MEMORY_FRACTION` of it, so that both fit. Under
local_mt every node is a thread of the launcher's process: one JAX, on its
default device (the GPU if visible, unless the launcher's own `JAX_PLATFORMS`
says otherwise), so only `auto` is accepted there.
"""

import functools
import os
import shutil
import subprocess
import sys
from typing import Dict, Sequence, Tuple

from probes.records.run_dir import ExperimentConfig

CPU_ONLY_ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}
SHARED_GPU_MEMORY_FRACTION = 0.45
GPU_NODES = ('learner', 'evaluator')  # The groups that may use a GPU; the others are CPU_ONLY_ENV.
CPU_NODES = ('replay', 'actor', 'evaluation')


@functools.lru_cache(maxsize=1)
def visible_gpus() -> Tuple[str, ...]:
  """The CUDA device ids a node could use (as `CUDA_VISIBLE_DEVICES` names them).

  None when the launcher's `JAX_PLATFORMS` leaves CUDA out or no NVIDIA driver
  is loaded; otherwise JAX counts them in a child process, so that the
  launcher's own JAX never takes GPU memory.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  driver = os.path.exists('/proc/driver/nvidia') or shutil.which('nvidia-smi')
  if (platforms and not {'cuda', 'gpu'} & set(platforms.split(','))) or not driver:
    return ()
  query = subprocess.run([sys.executable, '-c', 'import jax; print(jax.local_device_count("cuda"))'],
                         env={**os.environ, 'JAX_PLATFORMS': 'cuda', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'},
                         capture_output=True, text=True, timeout=300, check=False)
  count = int(query.stdout.split()[-1]) if query.returncode == 0 and query.stdout.split() else 0
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  ids = [i.strip() for i in visible.split(',') if i.strip()] if visible is not None else [str(i) for i in range(count)]
  return tuple(ids[:count])


def node_envs(devices: Dict[str, str], gpus: Sequence[str]) -> Dict[str, Dict[str, str]]:
  """Each node group's process environment, given each GPU node's resolved device (`cpu` or `gpu`; a missing
  group is absent from the program) and the visible GPUs."""
  on_gpu = [node for node in GPU_NODES if devices.get(node) == 'gpu']
  envs = {node: dict(CPU_ONLY_ENV) for node in (*CPU_NODES, *GPU_NODES)}
  for index, node in enumerate(on_gpu):
    envs[node] = {'JAX_PLATFORMS': 'cuda', 'CUDA_VISIBLE_DEVICES': gpus[index % len(gpus)]}
    if len(on_gpu) > len(gpus):  # They share one.
      envs[node].update(XLA_PYTHON_CLIENT_PREALLOCATE='false',
                        XLA_PYTHON_CLIENT_MEM_FRACTION=str(SHARED_GPU_MEMORY_FRACTION))
  return envs


def resolve(config: ExperimentConfig, gpus: Sequence[str]) -> Dict[str, str]:
  """The device (`cpu`, `gpu`) of each GPU node in the program; a ValueError naming the flag when one cannot be
  honoured."""
  requested = {'learner': config.launch.learner_device}
  if config.probe_every > 0:
    requested['evaluator'] = config.launch.evaluator_device
  devices = {}
  for node, device in requested.items():
    if config.launch.launch_type != 'local_mp' and device != 'auto':
      raise ValueError(f'--{node}_device={device} applies under --launch_type=local_mp only: under '
                       f'{config.launch.launch_type} every node runs in the launcher\'s process on JAX\'s default '
                       f'device '
                       f'(set JAX_PLATFORMS for the launcher instead), and only auto is accepted.')
    if device == 'gpu' and not gpus:
      raise ValueError(f'--{node}_device=gpu, but no GPU is visible to JAX (JAX_PLATFORMS='
                       f'{os.environ.get("JAX_PLATFORMS", "")!r}, CUDA_VISIBLE_DEVICES='
                       f'{os.environ.get("CUDA_VISIBLE_DEVICES")!r}; a GPU needs the `gpu` extra and an NVIDIA '
                       f'driver); use cpu or auto.')
    devices[node] = 'gpu' if device == 'gpu' or (device == 'auto' and gpus) else 'cpu'
  return devices


def run_envs(config: ExperimentConfig) -> Dict[str, Dict[str, str]]:
  """The node groups' environments of this run under local_mp ({} under local_mt); checks the flags."""
  if config.launch.launch_type != 'local_mp':
    resolve(config, ())  # Only `auto` passes; nothing to place.
    return {}
  gpus = visible_gpus()
  return node_envs(resolve(config, gpus), gpus)
