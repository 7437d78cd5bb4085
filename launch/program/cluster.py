r"""A run on Google Cloud's Vertex AI, through Launchpad's own support (`--launch_type=vertex_ai`).

  python -m launch.train --launch_type=vertex_ai --run_dir=/gcs/BUCKET/runs/x --num_actors=200 --dry_run

Launchpad (launchpad/launch/xm_docker) gives each program group the
`lp.DockerConfig` made here (this repository's packages, an image requirements
file, the group's machine as `xm.JobRequirements`), merges the groups whose
configs are equal into one Vertex AI worker pool (at most 4; the first with
exactly one replica), pickles each pool's nodes into its image context, and
hands the pools to xmanager, which builds and pushes one image per pool and
submits one CustomJob through its Vertex AI client.

`--dry_run` runs all of that for real and stops at the three points that reach
outside this machine: the image build (`build_image.build_by_dockerfile`:
docker or Cloud Build), the job (`aiplatform.CustomJob`: creation and
submission) and xmanager's experiment database (a temporary one, not
~/.xmanager's). No credentials are read: the project, bucket and service
account are placeholders. It prints the worker pools xmanager would submit.
"""

import contextlib
import dataclasses
import importlib.metadata
import io
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agents import config_flags
from agents.config import option
from launch.program import graph as program_lib
from launch.program import launchpad_internals
from probes.records.run_dir import ExperimentConfig

LAUNCH_TYPE = 'vertex_ai'
DISTRIBUTION = 'plasticity-rl'
ROLES = ('replay', 'learner', 'actor', 'evaluator')  # The program's groups (launch/program/graph.py).
RUN_DIR_PREFIX = '/gcs/'  # Where Vertex AI mounts Cloud Storage in every container: the nodes' shared run directory.
PLACEHOLDER = 'DRY-RUN'  # The project, bucket and service account of a dry run.
_MACHINE_HELP = ('Vertex AI machine type of the {} node(s) (--launch_type=vertex_ai): one xmanager\'s Vertex AI '
                 'executor requests, n1-standard-*, n1-highmem-*, n1-highcpu-* (CPUs) or a2-highgpu-*g, '
                 'a2-megagpu-16g (A100 GPUs).')
_ACCELERATOR_HELP = ('GPUs attached to the {} node(s)\' n1 machine, as TYPE:COUNT (e.g. t4:1, v100:2); empty: none '
                     '(a2 machines come with their A100s).')


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Where each group of the program runs on Vertex AI; launch settings, not recorded in config.json."""
  dry_run: bool = option(False, 'With --launch_type=vertex_ai: run Launchpad\'s and xmanager\'s launch up to the '
                         'image build and the job submission, print the worker pools, and build, submit and write '
                         'nothing.')
  replay_machine: str = option('n1-highmem-8', _MACHINE_HELP.format('replay'))
  replay_accelerator: str = option('', _ACCELERATOR_HELP.format('replay'))
  learner_machine: str = option('a2-highgpu-1g', _MACHINE_HELP.format('learner'))
  learner_accelerator: str = option('', _ACCELERATOR_HELP.format('learner'))
  actor_machine: str = option('n1-standard-4', _MACHINE_HELP.format('actor'))
  actor_accelerator: str = option('', _ACCELERATOR_HELP.format('actor'))
  evaluator_machine: str = option('a2-highgpu-1g', _MACHINE_HELP.format('evaluator'))
  evaluator_accelerator: str = option('', _ACCELERATOR_HELP.format('evaluator'))


FIELDS = config_flags.define(ClusterConfig)


def cluster_config(config: ExperimentConfig) -> ClusterConfig:
  """The parsed cluster flags, checked against the experiment's launch type; a ValueError naming the flag."""
  cluster = config_flags.build(ClusterConfig, FIELDS)
  if config.launch.launch_type != LAUNCH_TYPE:
    if cluster.dry_run:
      raise ValueError(f'--dry_run plans a cluster launch: it needs --launch_type={LAUNCH_TYPE} '
                       f'(--launch_type={config.launch.launch_type} starts the run on this machine).')
    return cluster
  if not config.run_dir.startswith(RUN_DIR_PREFIX):
    raise ValueError(f'--run_dir={config.run_dir}: with --launch_type={LAUNCH_TYPE} every node writes the run '
                     f'directory, so it must be on Cloud Storage as Vertex AI mounts it, {RUN_DIR_PREFIX}BUCKET/...')
  if '_' in tempfile.gettempdir():  # Launchpad draws temporary directories until one has no '_': forever, here.
    raise ValueError(f'--launch_type={LAUNCH_TYPE}: Launchpad stages each image in a temporary directory whose path '
                     f'must have no "_" (Vertex AI rejects it), and {tempfile.gettempdir()} has one; set $TMPDIR '
                     f'to a directory without.')
  requirements(cluster)  # Bad machines and accelerators fail now.
  return cluster


def _xmanager():
  try:
    from xmanager import xm
    from xmanager import xm_local  # noqa: F401  First: importing vertex alone is circular.
    from xmanager.cloud import vertex
  except ImportError as e:
    raise ValueError(f'--launch_type={LAUNCH_TYPE} needs the cluster extra ({e}): pip install -e ".[cluster]" '
                     f'(requirements/cluster.txt pins it).') from e
  return xm, vertex


def requirements(cluster: ClusterConfig) -> Dict[str, Any]:
  """Each group's machine as xmanager's requirements: the CPUs and memory (or A100s) that its Vertex AI client
  turns back into the machine type named."""
  xm, vertex = _xmanager()
  a2 = {machine: gpus for gpus, machine in vertex._A100_GPUS_TO_MACHINE_TYPE.items()}  # pylint: disable=protected-access
  n1 = vertex._MACHINE_TYPE_TO_CPU_RAM  # pylint: disable=protected-access
  gpu_types = sorted(str(gpu).lower() for gpu in xm.GpuType)
  out = {}
  for role in ROLES:
    machine, accelerator = getattr(cluster, f'{role}_machine'), getattr(cluster, f'{role}_accelerator')
    if machine in a2:
      if accelerator:
        raise ValueError(f'--{role}_accelerator={accelerator}: --{role}_machine={machine} comes with its '
                         f'{a2[machine]} A100 GPU(s); leave --{role}_accelerator empty.')
      out[role] = xm.JobRequirements(a100=a2[machine])
      continue
    if machine not in n1:
      raise ValueError(f'--{role}_machine={machine} is not a machine type xmanager\'s Vertex AI executor requests; '
                       f'accepted: {", ".join([*n1, *a2])}.')
    cpu, ram = n1[machine]
    resources = {'cpu': cpu, 'ram': ram}
    if accelerator:
      gpu, _, count = accelerator.lower().partition(':')
      if gpu not in gpu_types or not count.isdigit() or int(count) < 1:
        raise ValueError(f'--{role}_accelerator={accelerator} is not TYPE:COUNT with TYPE one of '
                         f'{", ".join(gpu_types)} and COUNT >= 1.')
      resources[gpu] = int(count)
    out[role] = xm.JobRequirements(**resources)
  return out


def _has_gpu(need: Any) -> bool:
  xm, _ = _xmanager()
  return any(resource in xm.GpuType for resource in need.task_requirements)


def _image_requirements(root: str, gpu: bool) -> str:
  """An image's pip requirements: the lock and the cluster extra's pins (the checked environment), and the `gpu`
  extra on GPU machines."""
  lines = []
  for name in ('lock.txt', 'cluster.txt'):
    path = os.path.join(root, 'requirements', name)
    if not os.path.exists(path):
      raise ValueError(f'Vertex AI images are built from this repository\'s checkout: {path} is missing.')
    with open(path) as f:
      lines += [line.strip() for line in f if line.strip() and not line.startswith('#')]
  if gpu:
    lines += [r.split(';')[0].strip() for r in _metadata_requires() if re.search(r'extra\s*==\s*"gpu"', r)]
  return '\n'.join(lines) + '\n'


def _metadata_requires() -> List[str]:
  try:
    return importlib.metadata.requires(DISTRIBUTION) or []
  except importlib.metadata.PackageNotFoundError as e:
    raise ValueError(f'{DISTRIBUTION} is not installed (its extras name the GPU image\'s packages): '
                     f'pip install -e ".[cluster]".') from e


def _packages() -> List[str]:
  """This project's top-level packages (pyproject.toml's), copied into every image."""
  return importlib.metadata.distribution(DISTRIBUTION).read_text('top_level.txt').split()


@contextlib.contextmanager
def _scratch() -> Iterator[str]:
  """A directory every temporary file of the launch goes in (Launchpad's image contexts, xmanager's Dockerfiles:
  both leave them behind), removed afterwards; its path has no '_', as Launchpad's staging needs."""
  path = '_'
  while '_' in path:
    path = tempfile.mkdtemp(prefix='plasticity-cluster-')
    if '_' in path:
      os.rmdir(path)
  before, tempfile.tempdir = tempfile.tempdir, path  # tempfile's documented default directory.
  try:
    yield path
  finally:
    tempfile.tempdir = before
    shutil.rmtree(path, ignore_errors=True)


def _docker_configs(cluster: ClusterConfig, directory: str) -> Tuple[Dict[str, object], Dict[str, str]]:
  """Each group's `lp.DockerConfig` ({role: config}) and the images' requirements ({'cpu' or 'gpu': text}), staged
  in `directory`: the packages (nothing else of the checkout: no venv, no runs) and the requirements files."""
  import launchpad as lp
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(program_lib.__file__))))
  code = os.path.join(directory, 'code')
  for package in _packages():
    shutil.copytree(os.path.join(root, package), os.path.join(code, package),
                    ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  texts, paths = {}, {}
  for kind in ('cpu', 'gpu'):
    texts[kind] = _image_requirements(root, gpu=kind == 'gpu')
    paths[kind] = os.path.join(directory, f'requirements-{kind}.txt')
    with open(paths[kind], 'w') as f:
      f.write(texts[kind])
  configs = {role: lp.DockerConfig(code_directory=code, hw_requirements=need,
                                   docker_requirements=paths['gpu' if _has_gpu(need) else 'cpu'])
             for role, need in requirements(cluster).items()}
  return configs, texts


def submit(config: ExperimentConfig, cluster: ClusterConfig) -> None:
  """Builds the images and submits the program as one Vertex AI custom job (Launchpad prints where each node
  runs)."""
  import launchpad as lp
  program = program_lib.make_program(config, config.layout.attempts() + 1)
  with _scratch() as scratch:
    configs, _ = _docker_configs(cluster, scratch)
    lp.launch(program, launch_type=LAUNCH_TYPE, xm_resources=configs)


@dataclasses.dataclass
class _Recorder:
  """What xmanager would have built and submitted; with `keep`, each image's build context copied there."""
  images: Dict[str, Tuple[str, str, int]] = dataclasses.field(default_factory=dict)  # name -> (Dockerfile, reqs, bytes)
  jobs: List[Tuple[str, list]] = dataclasses.field(default_factory=list)  # (display name, worker pool specs)
  keep: Optional[str] = None
  contexts: Dict[str, str] = dataclasses.field(default_factory=dict)  # image name -> its kept build context

  def build_by_dockerfile(self, path: str, dockerfile: str, image_name: str, *args, **kwargs) -> str:
    del args, kwargs
    with open(dockerfile) as f:
      text = f.read()
    (requirements_path,) = [os.path.join(path, d, 'requirements.txt') for d in os.listdir(path)
                            if os.path.isfile(os.path.join(path, d, 'requirements.txt'))]
    with open(requirements_path) as f:
      reqs = f.read()
    size = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(path) for name in names)
    self.images[image_name] = (text, reqs, size)
    if self.keep:
      self.contexts[image_name] = os.path.join(self.keep, f'image{len(self.contexts)}')
      shutil.copytree(path, self.contexts[image_name])
      shutil.copyfile(dockerfile, os.path.join(self.contexts[image_name], 'Dockerfile'))
    return image_name

  def custom_job(self, display_name: str, worker_pool_specs, **kwargs):
    del kwargs
    self.jobs.append((display_name, list(worker_pool_specs)))
    return launchpad_internals.submitted_job(f'{PLACEHOLDER}-job', '(dry run: not submitted)')


_MAPPING = re.compile(r'^(\w+)-(\S+) -> (workerpool\d)-(\S+)$')  # Launchpad's 'label-range -> pool-range' lines.


def _launch_offline(config: ExperimentConfig, cluster: ClusterConfig,
                    recorder: _Recorder) -> Tuple[str, Dict[str, str]]:
  """Launchpad's and xmanager's launch short of building and submitting: (Launchpad's output, images' requirements)."""
  import launchpad as lp
  _xmanager()  # Its modules in their order (xmanager.cloud.vertex alone is a circular import), or the extra's error.
  program = program_lib.make_program(config, config.layout.attempts() + 1)
  output = io.StringIO()
  with contextlib.ExitStack() as stack:
    scratch = stack.enter_context(_scratch())
    stack.enter_context(launchpad_internals.offline_xmanager(
        recorder.build_by_dockerfile, recorder.custom_job, PLACEHOLDER, os.path.join(scratch, 'xm.db')))
    stack.enter_context(contextlib.redirect_stdout(output))
    configs, texts = _docker_configs(cluster, scratch)
    lp.launch(program, launch_type=LAUNCH_TYPE, xm_resources=configs)
  return output.getvalue(), texts


def _replica_nodes(launchpad_output: str) -> Dict[str, List[str]]:
  """{pool: the node of each replica, in order} from Launchpad's mapping lines (`actor-[0:4] -> workerpool2-[0:4]`)."""

  def expand(text: str) -> List[int]:
    if text.isdigit():
      return [int(text)]
    start, stop = text.strip('[]').split(':')
    return list(range(int(start), int(stop)))

  nodes: Dict[str, Dict[int, str]] = {}
  for line in re.sub(r'\x1b\[[0-9;]*m', '', launchpad_output).splitlines():
    match = _MAPPING.match(line.strip())
    if match:
      for index, replica in zip(expand(match[2]), expand(match[4])):
        nodes.setdefault(match[3], {})[replica] = f'{match[1]}-{index}'
  return {pool: [replicas[i] for i in sorted(replicas)] for pool, replicas in nodes.items()}


def dry_run(config: ExperimentConfig, cluster: ClusterConfig) -> str:
  """Launchpad's and xmanager's launch short of building and submitting; the plan, for people."""
  recorder = _Recorder()
  output, texts = _launch_offline(config, cluster, recorder)
  return _plan(config, recorder, texts, output)


@dataclasses.dataclass(frozen=True)
class Pool:
  """One Vertex AI worker pool as the job would run it: its image's build context, command and replicas."""
  name: str  # workerpool<k>
  replicas: int
  context: str  # The image's build context: Dockerfile, entrypoint.sh and the directory its WORKDIR names.
  workdir: str  # That directory (Launchpad's staged job: job.pkl, process_entry.py, the packages).
  args: Tuple[str, ...]  # The container's arguments.
  env: Dict[str, str]  # The container's environment variables.
  nodes: Tuple[str, ...]  # The program's node each replica runs (`actor-3`), by replica index.


def package(config: ExperimentConfig, cluster: ClusterConfig, directory: str) -> List[Pool]:
  """What `--launch_type=vertex_ai` submits, kept in `directory` instead: Launchpad's `xm_docker` packaging of the
  program (one cloudpickled job per worker pool, in its image's build context) and the job's worker pools.

  `launch.cluster_sim` starts each replica from it as Vertex AI does. Unlike `cluster_config`, any `--run_dir` is
  taken: there the run directory is a path every host sees.
  """
  recorder = _Recorder(keep=directory)
  output, _ = _launch_offline(config, cluster, recorder)
  nodes = _replica_nodes(output)
  (_, specs), = recorder.jobs
  pools = []
  for index, spec in enumerate(specs):
    context = recorder.contexts[spec.container_spec.image_uri]
    with open(os.path.join(context, 'Dockerfile')) as f:
      workdir = [line.split()[1] for line in f if line.startswith('WORKDIR ')][-1]
    name = f'workerpool{index}'
    pools.append(Pool(name, spec.replica_count, context, os.path.join(context, workdir),
                      tuple(spec.container_spec.args), {e.name: e.value for e in spec.container_spec.env},
                      tuple(nodes[name])))
  return pools


def _ranges(nodes: List[str]) -> List[str]:
  """Replicas' nodes as Launchpad names them in runs: `actor-[0:200]` for `actor-0` ... `actor-199`."""
  runs: List[Tuple[str, int, int]] = []  # (label, first index, count)
  for node in nodes:
    label, index = node.rsplit('-', 1)
    if runs and runs[-1][0] == label and runs[-1][1] + runs[-1][2] == int(index):
      runs[-1] = (label, runs[-1][1], runs[-1][2] + 1)
    else:
      runs.append((label, int(index), 1))
  return [f'{label}-{first}' if count == 1 else f'{label}-[{first}:{first + count}]' for label, first, count in runs]


def _plan(config: ExperimentConfig, recorder: _Recorder, texts: Dict[str, str], launchpad_output: str) -> str:
  """The recorded job as text: its worker pools (with Launchpad's node mapping), images and what a submission
  needs."""
  nodes = {pool: _ranges(replicas) for pool, replicas in _replica_nodes(launchpad_output).items()}
  (job_name, pools), = recorder.jobs
  kinds = {text: kind for kind, text in texts.items()}
  lines = [f'Dry run of --launch_type={LAUNCH_TYPE}: nothing built, submitted or written.',
           f'Vertex AI custom job {job_name}: {len(pools)} worker pools (Vertex AI takes at most 4, the first with '
           f'1 replica).']
  images = {}
  for index, pool in enumerate(pools):
    name = f'workerpool{index}'
    spec = pool.machine_spec
    accelerator = (f'{spec.accelerator_type.name} x{spec.accelerator_count}' if spec.accelerator_count else 'none')
    _, reqs, size = recorder.images[pool.container_spec.image_uri]
    images.setdefault(kinds[reqs], []).append(name)
    lines.append(f'  {name}: replicas={pool.replica_count} machine={spec.machine_type} accelerator={accelerator} '
                 f'image={kinds[reqs]} ({size / 1e6:.1f} MB context) nodes={" ".join(nodes[name])}')
  gpu_extra = [line for line in texts['gpu'].splitlines() if line not in texts['cpu'].splitlines()]
  lines.append(f'Images (Dockerfile below): this repository\'s packages ({", ".join(_packages())}) and '
               f'pip install -r requirements.txt of')
  for kind, pool_names in sorted(images.items()):
    extra = ' + ' + ', '.join(gpu_extra) if kind == 'gpu' else ''
    lines.append(f'  {kind} ({", ".join(pool_names)}): requirements/lock.txt + requirements/cluster.txt{extra} '
                 f'({len(texts[kind].splitlines())} pins)')
  dockerfile, _, _ = next(iter(recorder.images.values()))
  lines += ['Dockerfile (each pool\'s image, with its own directory):',
            *('  ' + line for line in dockerfile.splitlines() if line.strip()),
            f'A real submission (without --dry_run) needs: Google Cloud credentials (gcloud auth application-default '
            f'login) and a project (gcloud config set project PROJECT) with Vertex AI enabled, '
            f'$GOOGLE_CLOUD_BUCKET_NAME (the job\'s staging bucket), docker (else Cloud Build builds the images), '
            f'and --run_dir={config.run_dir} on that Cloud Storage, mounted at the same path here (gcsfuse).']
  return '\n'.join(lines)
