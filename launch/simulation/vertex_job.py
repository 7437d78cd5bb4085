"""The cluster manager of `launch.cluster_sim`: processes on the hosts of a `launch.simulation.netns.Cluster`,
restarted in place when they die; and the Vertex AI custom job of `--launch_type=vertex_ai` as such processes.

`launch.program.cluster.package` gives what the launch submits: Launchpad's
`xm_docker` packaging (each worker pool's image build context, holding one
cloudpickled job of its nodes) and the job's worker pools. `vertex_tasks`
makes each replica a task on the host its node is placed on, started as
Vertex AI starts a container: the image's entrypoint (`entrypoint.sh`:
`python -m process_entry --data_file=job.pkl`) in the image's WORKDIR, with
the environment Vertex AI sets, `CLUSTER_SPEC` (every pool's `host:port` list
and this replica's `task.index`: Launchpad's nodes take their own and their
peers' addresses from it), `TF_CONFIG`, `CLOUD_ML_JOB_ID` and
`CLOUD_ML_PROJECT_ID`. What differs from Vertex AI: no container (the venv's
interpreter, with the pins of the image's requirements, on the machine's file
system, where the run directory stands for the mounted bucket), replicas
sharing a host have ports of their own (2222, 2223, ...), and the Vertex AI
API's job cancel (what `lp.stop()` calls) is `launch/simulation/vertex_api/sitecustomize.py`
writing a file that the harness watches.

`ClusterManager`, like Vertex AI's, restarts a task that dies (a non-zero exit
or a signal, while no stop is under way) in place after `restart_delay_s`,
with the same command and addresses; a task that exits 0 stays ended. `stop`
sends every task's process group SIGTERM, then SIGKILL after `grace_s`.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from launch.program import cluster as cluster_lib
from launch.simulation import netns

BASE_PORT = 2222  # Vertex AI's replicas listen here; replicas sharing an emulated host count up from it.
JOB_ID = 'emulated-job'
PROJECT = 'emulated-project'
CANCEL_ENV = 'PLASTICITY_VERTEX_CANCEL'  # Read by launch/simulation/vertex_api/sitecustomize.py.
VERTEX_API = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'vertex_api')


@dataclasses.dataclass
class Task:
  """A process the cluster manager keeps running on a host."""
  name: str  # The program's node (`learner-0`, `actor-3`) or the command (`attach_actors-2`).
  host: netns.Host
  argv: Tuple[str, ...]
  cwd: str
  env: Dict[str, str]
  log_path: str
  process: Optional[subprocess.Popen] = None
  starts: int = 0
  died_at: Optional[float] = None  # When its process died, until it is restarted.
  ended: bool = False  # Exited 0 by itself, or stopped: not restarted.


class ClusterManager:
  """Starts tasks on their hosts and restarts those that die; `event(kind, **fields)` hears of each."""

  def __init__(self, cluster: netns.Cluster, tasks: Sequence[Task], restart_delay_s: float,
               event: Callable[..., None]):
    self._cluster = cluster
    self.tasks = list(tasks)
    self._restart_delay_s = restart_delay_s
    self._event = event
    self.stopping = False

  def task(self, name: str) -> Task:
    (found,) = [t for t in self.tasks if t.name == name]
    return found

  def on_host(self, host: netns.Host) -> List[Task]:
    return [t for t in self.tasks if t.host.index == host.index]

  def start(self) -> None:
    for task in self.tasks:
      self._start(task)

  def _start(self, task: Task) -> None:
    os.makedirs(os.path.dirname(task.log_path), exist_ok=True)
    with open(task.log_path, 'a') as log:
      log.write(f'\n=== {time.strftime("%H:%M:%S")} start {task.starts + 1} of {task.name} on {task.host.namespace} '
                f'({task.host.address}): {" ".join(task.argv)}\n')
      log.flush()
      task.process = self._cluster.popen(task.host, task.argv, cwd=task.cwd, env=task.env, stdout=log,
                                         stderr=subprocess.STDOUT)
    task.starts += 1
    task.died_at = None
    self._event('start', task=task.name, host=task.host.index, start=task.starts, pid=task.process.pid)

  def poll(self) -> None:
    """Notes tasks that ended or died, and restarts those whose delay is over (none while stopping)."""
    now = time.time()
    for task in self.tasks:
      if task.ended or task.process is None or task.process.poll() is None:
        continue
      if task.died_at is None:
        code = task.process.returncode
        if code == 0 or self.stopping:
          task.ended = True
          self._event('ended', task=task.name, exit_code=code)
          continue
        task.died_at = now
        self._event('died', task=task.name, exit_code=code)
      elif now - task.died_at >= self._restart_delay_s and not self.stopping:
        self._start(task)

  def all_ended(self, names: Optional[Sequence[str]] = None) -> bool:
    return all(t.ended for t in self.tasks if names is None or t.name in names)

  def stop(self, grace_s: float) -> None:
    """SIGTERM to every task's process group, SIGKILL to the groups left after `grace_s`.

    A group, not its leader alone: the leader may be a shell (Vertex AI's `entrypoint.sh`) that ends at SIGTERM
    while its Python child is still writing its last checkpoint.
    """
    self.stopping = True
    running = [t for t in self.tasks if t.process is not None and _group_alive(t.process)]
    for task in running:
      _signal_group(task.process, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(_group_alive(t.process) for t in running):
      time.sleep(0.2)
    for task in running:
      if _group_alive(task.process):
        _signal_group(task.process, signal.SIGKILL)
      task.process.wait(timeout=30)
      self._event('stopped', task=task.name, exit_code=task.process.returncode)
      task.ended = True


def _group_alive(process: subprocess.Popen) -> bool:
  """Whether any process of the task's process group (its session, started with it) is left."""
  process.poll()  # Reaps the leader, so that a dead one does not count.
  try:
    os.killpg(process.pid, 0)
    return True
  except ProcessLookupError:
    return False


def _signal_group(process: subprocess.Popen, signum: int) -> None:
  try:
    os.killpg(process.pid, signum)
  except ProcessLookupError:
    pass


def vertex_tasks(pools: Sequence[cluster_lib.Pool], placement: Callable[[str], netns.Host], directory: str,
                 env: Dict[str, str]) -> Tuple[List[Task], dict]:
  """Every replica of the job's worker pools as a task on the host `placement` gives its node, and the job's
  CLUSTER_SPEC (without `task`)."""
  next_port: Dict[int, int] = {}
  placed = []  # (pool, replica index, host, port)
  for pool in pools:
    for index in range(pool.replicas):
      host = placement(pool.nodes[index])
      port = next_port.get(host.index, BASE_PORT)
      next_port[host.index] = port + 1
      placed.append((pool, index, host, port))
  spec = {'cluster': {pool.name: [f'{h.address}:{p}' for q, _, h, p in placed if q is pool] for pool in pools},
          'environment': 'cloud'}
  base = {**env, 'PATH': os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', ''),
          'CLOUD_ML_JOB_ID': JOB_ID, 'CLOUD_ML_PROJECT_ID': PROJECT, CANCEL_ENV: cancel_path(directory),
          'PYTHONPATH': VERTEX_API}
  tasks = []
  for pool, index, host, port in placed:
    task_spec = json.dumps({**spec, 'task': {'type': pool.name, 'index': index, 'trial': ''}})
    tasks.append(Task(pool.nodes[index], host, ('bash', os.path.join(pool.context, 'entrypoint.sh'), *pool.args),
                      pool.workdir, {**base, **pool.env, 'CLUSTER_SPEC': task_spec, 'TF_CONFIG': task_spec},
                      os.path.join(directory, 'logs', f'{pool.nodes[index]}.log')))
  return tasks, spec


def cancel_path(directory: str) -> str:
  return os.path.join(directory, 'cancel.json')


def cancel_request(directory: str) -> Optional[dict]:
  """The job cancel a replica asked for (`lp.stop()`), if any."""
  try:
    with open(cancel_path(directory)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
