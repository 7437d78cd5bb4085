"""The Vertex AI launch (launch/program/cluster.py): its dry run end to end, the machine flags, the cluster extra's
pins."""

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import flagsaver
import pytest

from launch.program import cluster
from launch import flags as run_flags
from probes.records.run_dir import ExperimentConfig, LaunchConfig, RunLayout, check_config, write_or_check_config
from tests.conftest import ROOT

POOL = re.compile(r'^  (workerpool\d): replicas=(\d+) machine=(\S+) accelerator=(.+?) image=(\w+) .*nodes=(.+)$')


def _pins(name: str) -> dict:
  with open(os.path.join(ROOT, 'requirements', name)) as f:
    return dict(line.strip().split('==') for line in f if '==' in line and not line.startswith('#'))


@pytest.mark.slow
def test_xmanager_and_launchpads_vertex_path_import_at_the_pinned_versions():
  from launchpad.launch.xm_docker import launch  # noqa: F401
  from xmanager import xm_local
  pins = _pins('cluster.txt')
  for package in ('xmanager', 'google-cloud-aiplatform', 'grpcio-status'):
    assert importlib.metadata.version(package) == pins[package]
  assert xm_local.Vertex.Spec  # Launchpad's `xm_local.Caip` executor is this one.
  assert importlib.metadata.version('protobuf') == _pins('lock.txt')['protobuf']  # The lock's, beside xmanager.


@pytest.fixture
def scratch():
  """An empty directory whose path has no '_' (Launchpad's Vertex AI staging needs one for $TMPDIR)."""
  path = '_'
  while '_' in path:
    path = tempfile.mkdtemp(prefix='plasticitycluster', dir='/tmp')
  yield pathlib.Path(path)
  shutil.rmtree(path)


@pytest.mark.slow
def test_dry_run_prints_the_worker_pools_and_builds_submits_and_writes_nothing(tmp_path, scratch):
  home = tmp_path / 'home'
  home.mkdir()
  run_dir = f'/gcs/plasticity-test-{os.getpid()}/run'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PLASTICITY_DOWNLOAD': '0', 'HOME': str(home), 'TMPDIR': str(scratch)}
  env.pop('GOOGLE_APPLICATION_CREDENTIALS', None)
  result = subprocess.run([sys.executable, '-m', 'launch.train', '--launch_type=vertex_ai', '--dry_run',
                           '--num_actors=200', f'--run_dir={run_dir}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  pools = [POOL.match(line).groups() for line in lines if POOL.match(line)]
  # Launchpad merges equal groups (learner and evaluator: the same GPU machine) and puts a 1-replica pool first.
  assert pools == [
      ('workerpool0', '1', 'n1-highmem-8', 'none', 'cpu', 'replay-0'),
      ('workerpool1', '2', 'a2-highgpu-1g', 'NVIDIA_TESLA_A100 x1', 'gpu', 'learner-0 evaluator-0'),
      ('workerpool2', '200', 'n1-standard-4', 'none', 'cpu', 'actor-[0:200]'),
  ]
  cpu_pins = len(_pins('lock.txt')) + len(_pins('cluster.txt'))
  assert (f'  cpu (workerpool0, workerpool2): requirements/lock.txt + requirements/cluster.txt ({cpu_pins} pins)'
          in lines)
  assert (f'  gpu (workerpool1): requirements/lock.txt + requirements/cluster.txt + jax[cuda12]==0.4.30 '
          f'({cpu_pins + 1} pins)' in lines)
  assert '  FROM python:3.10' in lines and '  RUN python -m pip install -r requirements.txt' in lines
  assert 'Starting run' not in result.stdout and 'Submitted' not in result.stdout
  # Nothing written: no run directory, no xmanager database in $HOME (~/.xmanager), Launchpad's and the staging's
  # temporary directories removed.
  assert not os.path.exists(run_dir)
  assert not (home / '.xmanager').exists() and list(scratch.iterdir()) == []


def test_machine_flags_become_the_machines_xmanager_requests():
  from xmanager import xm, xm_local
  from xmanager.cloud import vertex
  requirements = cluster.requirements(cluster.ClusterConfig(
      replay_machine='n1-highmem-16', learner_machine='a2-highgpu-2g', actor_machine='n1-highcpu-16',
      evaluator_machine='n1-standard-8', evaluator_accelerator='t4:1'))

  def machine(role):
    job = xm.Job(executable=None, executor=xm_local.Vertex(requirements=requirements[role]))
    spec = vertex.get_machine_spec(job)
    return spec['machine_type'], str(spec.get('accelerator_type', 'none')), spec.get('accelerator_count', 0)

  assert machine('replay') == ('n1-highmem-16', 'none', 0)
  assert machine('learner') == ('a2-highgpu-2g', 'AcceleratorType.NVIDIA_TESLA_A100', 2)
  assert machine('actor') == ('n1-highcpu-16', 'none', 0)
  assert machine('evaluator') == ('n1-standard-8', 'AcceleratorType.NVIDIA_TESLA_T4', 1)


@pytest.mark.parametrize('machines, message', [
    ({'actor_machine': 'n1-standard-3'}, '--actor_machine=n1-standard-3 is not a machine type'),
    ({'learner_accelerator': 'a100:1'}, '--learner_machine=a2-highgpu-1g comes with its 1 A100'),
    ({'replay_accelerator': 'h100:1'}, '--replay_accelerator=h100:1 is not TYPE:COUNT'),
    ({'actor_accelerator': 't4:0'}, '--actor_accelerator=t4:0 is not TYPE:COUNT'),
])
def test_bad_machines_name_the_flag(machines, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    cluster.requirements(cluster.ClusterConfig(**machines))


def _cluster_config(*argv: str) -> cluster.ClusterConfig:
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['train', *argv])
    try:
      return cluster.cluster_config(run_flags.experiment_config())
    finally:
      flags.FLAGS.unparse_flags()


def test_dry_run_is_of_a_vertex_ai_launch_onto_cloud_storage():
  with pytest.raises(ValueError, match=re.escape('--dry_run plans a cluster launch: it needs '
                                                 '--launch_type=vertex_ai (--launch_type=local_mp')):
    _cluster_config('--run_dir=/tmp/run', '--dry_run')
  with pytest.raises(ValueError, match=re.escape('--run_dir=/tmp/run: with --launch_type=vertex_ai every node')):
    _cluster_config('--run_dir=/tmp/run', '--launch_type=vertex_ai', '--dry_run')
  assert _cluster_config('--run_dir=/gcs/b/run', '--launch_type=vertex_ai', '--dry_run').dry_run
  assert not _cluster_config('--run_dir=/tmp/run').dry_run


def test_a_temporary_directory_with_an_underscore_is_refused(monkeypatch, tmp_path):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'has_underscore'))
  with pytest.raises(ValueError, match=re.escape(f'{tmp_path}/has_underscore has one; set $TMPDIR')):
    _cluster_config('--run_dir=/gcs/b/run', '--launch_type=vertex_ai')


def test_the_dry_runs_check_of_an_existing_run_reads_only(tmp_path):
  config = ExperimentConfig(run_dir=str(tmp_path / 'run'))
  assert not check_config(config) and not os.path.exists(config.run_dir)
  write_or_check_config(config)
  before = {name: os.path.getmtime(os.path.join(config.run_dir, name)) for name in os.listdir(config.run_dir)}
  more_actors = dataclasses.replace(config, launch=LaunchConfig(num_actors=300), max_learner_steps=10**6)
  assert check_config(more_actors)  # Resumable differences: how it is launched, how long it trains.
  with pytest.raises(ValueError, match=re.escape("seed: 0 -> 1")):
    check_config(dataclasses.replace(config, seed=1))
  assert {name: os.path.getmtime(os.path.join(config.run_dir, name)) for name in os.listdir(config.run_dir)} == before


def test_on_vertex_ai_a_node_is_at_its_replicas_address_from_cluster_spec(monkeypatch):
  """Launchpad's xm_docker launch binds each node to its worker pool and replica; the nodes' --bind_host mixin used
  to bind them to this machine's loopback and a port picked here, which no replica of a Vertex AI job listens on."""
  from launchpad import context
  from launch.program import graph as program_lib
  from launch.program import replay
  spec = {'cluster': {'workerpool0': ['198.18.0.1:2222'], 'workerpool1': ['198.18.0.1:2223', '198.18.0.2:2222']},
          'task': {'type': 'workerpool1', 'index': 1}}
  monkeypatch.setenv('CLUSTER_SPEC', json.dumps(spec))
  courier_node = program_lib.CourierNode(dict).on_host('127.0.0.1')
  replay_node = replay.ReplayNode(list, RunLayout('/nonexistent'), 0).on_host('127.0.0.1')
  for node, pool, instance in [(courier_node, 'workerpool1', 1), (replay_node, 'workerpool0', 0)]:
    node._initialize_context(context.LaunchType.VERTEX_AI, launch_config=None)  # pylint: disable=protected-access
    node.bind_addresses(cluster=pool, instance=instance)
  assert courier_node.courier_address.resolve() == '198.18.0.2:2222'
  assert replay_node.reverb_address.resolve() == '198.18.0.1:2222'
  local = program_lib.CourierNode(dict).on_host('127.0.0.1')
  local.bind_addresses()  # Local launches: --bind_host and a free port, as before.
  assert local.courier_address.resolve().startswith('127.0.0.1:')


def test_the_replicas_nodes_are_read_back_from_launchpads_node_mapping():
  output = ('\x1b[34mreplay-0 -> workerpool0-0\x1b[0m\nlearner-0 -> workerpool1-0\nevaluator-0 -> workerpool1-1\n'
            'actor-[0:3] -> workerpool2-[0:3]\nactor-3 -> workerpool3-0\n')
  nodes = cluster._replica_nodes(output)  # pylint: disable=protected-access
  assert nodes == {'workerpool0': ['replay-0'], 'workerpool1': ['learner-0', 'evaluator-0'],
                   'workerpool2': ['actor-0', 'actor-1', 'actor-2'], 'workerpool3': ['actor-3']}
  assert cluster._ranges(nodes['workerpool2'] + nodes['workerpool1']) == [  # pylint: disable=protected-access
      'actor-[0:3]', 'learner-0', 'evaluator-0']
