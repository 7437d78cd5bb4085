r"""A cluster on one machine: a run across hosts in network namespaces, with partitions and host deaths (root).

  .venv/bin/python -m launch.cluster_sim --run_dir=/tmp/sim/run --env=mdp:mnist:easy --num_actors=4 \
      --actor_hosts=2 --scenario=partition_actor_host --partition_s=30
  .venv/bin/python -m launch.cluster_sim --mode=attached --run_dir=/tmp/sim/run ...
  .venv/bin/python -m launch.cluster_sim --cleanup     # what killed harnesses left, by name

A test harness for the cluster programs, not an engine to run experiments
on. Its hosts are `launch.simulation.netns`'s: network namespaces with their own
addresses (198.18.0.0/24) on a bridge of their own, no route out, one file
system. It takes every flag of `launch.train` and, by `--mode`, runs:

  * `vertex_ai`: the program `--launch_type=vertex_ai` submits, packaged by
    the same code (`launch.program.cluster.package`: Launchpad's `xm_docker` path),
    each replica started as Vertex AI starts it (`launch.simulation.vertex_job`): replay
    and learner on host 0, the evaluator (and evaluation node) on host 1, the
    actors in equal blocks on the `--actor_hosts` hosts after. The run ends
    when the program cancels the job (`lp.stop()`).
  * `attached`: `python -m launch.train --launch_type=local_mp
    --bind_host=<host 0's address>` on host 0, then `launch.attach_evaluator`
    on host 1 and `launch.attach_actors --num_actors=<--attached_actors>` on
    each actor host. The run ends when its launcher exits 0.

Every process is restarted in place after `--restart_delay_s` when it dies,
as a cluster manager does (a restarted launcher resumes the run from its
checkpoints, on new ports). `--outsider` adds a host on the same bridge in no
role. `--scenario` (SCENARIOS, comma-separated: in turn) acts on the hosts
while the run goes. Every act, and every process's start, death and end, is a
line of `SIM_DIR/events.jsonl` (`time`, `event`, ...); each process's output
is in `SIM_DIR/logs/`, the packaged job in `SIM_DIR/images/`. Exit codes are
launch.train's: 0 when the run's work is done (the learner's last step, every
probe point, the evaluation) and every scenario ran, 2 when not (or after
`--timeout_s`), 130 on Ctrl-C or SIGTERM; the namespaces and every process on
them are removed in every case (`launch.simulation.netns`).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from absl import app

from agents import checkpointing, config_flags, storage
from agents.config import option
from environments.registry import Registry
from environments import datasets
from launch.program import cluster as cluster_lib
from launch.program import completion
from launch.program import relaunch
from launch import flags as run_flags
from launch.simulation import netns
from launch import train as train_lib
from launch.simulation import vertex_job
from probes.records.run_dir import MAX_ACTORS, EvaluatorState, ExperimentConfig, RunLayout, write_or_check_config

ATTACHED_EVALUATOR = 'cluster'  # The attached evaluator's --name: it writes under RUN_DIR/evaluators/cluster/.
POLL_S = 0.5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class SimConfig:
  """The harness's settings (not the run's: those are launch.train's flags)."""
  mode: str = option('vertex_ai', 'What runs on the hosts: vertex_ai (the program --launch_type=vertex_ai '
                     'submits, its replicas started as Vertex AI does) or attached (a local_mp run on host 0 '
                     'with --bind_host there, an attached evaluator and attached actors on the other hosts).',
                     choices=lambda: ('vertex_ai', 'attached'))
  actor_hosts: int = option(2, 'Hosts the actors run on (after host 0: replay and learner, and host 1: the '
                            'evaluator); --num_actors are spread over them in equal blocks (vertex_ai).',
                            lower_bound=1)
  attached_actors: int = option(2, 'With --mode=attached: actors launch.attach_actors runs on each actor host.',
                                lower_bound=1)
  outsider: bool = option(False, 'Add a host on the same bridge that takes no part in the run.')
  scenario: str = option('none', 'What happens to the hosts while the run goes, comma-separated, in turn: '
                         'none, partition_actor_host, partition_evaluator_host, kill_learner_host, '
                         'reach_from_outsider (see launch/cluster_sim.py).')
  partition_s: float = option(30.0, 'How long a partition lasts.', lower_bound=0.0)
  restart_delay_s: float = option(5.0, 'How long after a process dies it is restarted in place.', lower_bound=0.0)
  latency_ms: float = option(0.0, 'Delay added each way on the actor hosts\' links (launch.simulation.link_delay).',
                             lower_bound=0.0)
  sim_dir: str = option('', 'The harness\'s own files (events.jsonl, logs/, images/); default: a new temporary '
                        'directory.')
  timeout_s: float = option(1800.0, 'Stop the run (exit 2) if it has not finished by then.', lower_bound=1.0)
  grace_s: float = option(40.0, 'How long processes have to stop after SIGTERM before SIGKILL.', lower_bound=0.0)
  cleanup: bool = option(False, 'Only remove the namespaces and processes that killed harnesses left, and exit.')
  reach: str = option('', 'Only try, from this host, the learner and the replay that the live run in this directory '
                      'publishes, print what answered as JSON, and exit (the reach_from_outsider scenario runs it '
                      'on the outsider).')


FIELDS = config_flags.define(SimConfig)
_OWN_FLAGS = tuple(field.flag for field in FIELDS)


class Sim:
  """A run on the hosts of a cluster: its processes (a `ClusterManager`), the hosts' roles, the event log."""

  def __init__(self, config: ExperimentConfig, settings: SimConfig, net: netns.Cluster, directory: str):
    self.config = config
    self.settings = settings
    self.net = net
    self.directory = directory
    self.layout = config.layout
    self.learner_host, self.evaluator_host = net.hosts[0], net.hosts[1]
    self.actor_hosts = net.hosts[2:2 + settings.actor_hosts]
    self.outsider = net.hosts[2 + settings.actor_hosts] if settings.outsider else None
    self.manager: Optional[vertex_job.ClusterManager] = None
    self._events = os.path.join(directory, 'events.jsonl')

  def event(self, kind: str, **fields) -> None:
    record = {'time': time.time(), 'event': kind, **fields}
    with open(self._events, 'a') as f:
      f.write(json.dumps(record) + '\n')
    print(f'[{time.strftime("%H:%M:%S")}] {kind}: {json.dumps(fields)}', flush=True)

  # What the run has done, from its files.
  def learner_step(self) -> int:
    records = self.layout.records(RunLayout.LEARNER)
    return records[-1]['learner_step'] if records else -1

  def actors_acting(self) -> bool:
    """Whether every actor of the program, and every attached actor, has logged an episode."""
    acting = {r['actor_id'] for r in self.layout.records(RunLayout.ACTORS)}
    attached = self.settings.attached_actors * len(self.actor_hosts) if self.settings.mode == 'attached' else 0
    return (acting >= set(range(self.config.launch.num_actors))
            and len([i for i in acting if i >= MAX_ACTORS]) >= attached)

  def evaluator_status(self) -> dict:
    layout = self.layout if self.settings.mode == 'vertex_ai' else self.layout.evaluator(ATTACHED_EVALUATOR)
    return relaunch.read_json(layout.evaluator_status)

  def checkpoint_step(self) -> int:
    _, loaded, _ = checkpointing.latest_loadable(self.layout.checkpoints)
    return loaded[0] if loaded else -1

  def addresses(self) -> Dict[str, str]:
    """addresses.json: where the live run's learner and replay answer."""
    return relaunch.read_json(self.layout.addresses)

  # Acts on the hosts.
  def partition(self, host: netns.Host, seconds: float) -> Iterator[None]:
    self.net.partition(host)
    self.event('partition', host=host.index, learner_step=self.learner_step())
    yield from _for(seconds)
    self.net.heal(host)
    self.event('heal', host=host.index, learner_step=self.learner_step())

  def kill_host(self, host: netns.Host) -> None:
    pids = self.net.kill_host(host)
    self.event('kill_host', host=host.index, pids=pids, learner_step=self.learner_step(),
               checkpoint_step=self.checkpoint_step())


def _until(condition: Callable[[], bool]) -> Iterator[None]:
  while not condition():
    yield


def _for(seconds: float) -> Iterator[None]:
  end = time.time() + seconds
  while time.time() < end:
    yield


SCENARIOS: Registry[Callable[[Sim], Iterator[None]]] = Registry('scenario', '--scenario')


@SCENARIOS.register('none')
def _nothing(sim: Sim) -> Iterator[None]:
  del sim
  yield from ()


@SCENARIOS.register('partition_actor_host')
def _partition_actor_host(sim: Sim) -> Iterator[None]:
  """Once the learner learns and every actor acts, the last actor host is cut off for --partition_s, then its link
  comes back."""
  yield from _until(lambda: sim.learner_step() > 0 and sim.actors_acting())
  yield from sim.partition(sim.actor_hosts[-1], sim.settings.partition_s)


@SCENARIOS.register('partition_evaluator_host')
def _partition_evaluator_host(sim: Sim) -> Iterator[None]:
  """While the evaluator probes a point after the first (its fit or its diagnostics), its host is cut off for
  --partition_s."""

  def probing_after_the_first() -> bool:
    status = sim.evaluator_status()
    return (status.get('state') in (EvaluatorState.PROBING, EvaluatorState.DIAGNOSING)
            and (status.get('learner_step') or 0) > 0)

  yield from _until(probing_after_the_first)
  yield from sim.partition(sim.evaluator_host, sim.settings.partition_s)


@SCENARIOS.register('kill_learner_host')
def _kill_learner_host(sim: Sim) -> Iterator[None]:
  """Once the learner has logged past a checkpoint after step 0 (and the replay has one, when it checkpoints) and
  every actor and evaluator is at work, every process of host 0 (learner and replay; in attached mode the launcher
  and all its nodes) is killed."""
  replay_checkpoints = sim.config.replay.checkpoint_every_minutes > 0

  def ready() -> bool:
    checkpoint = sim.checkpoint_step()
    replay = storage.path(sim.layout.replay_checkpoint)
    has_replay = replay.exists() and any((child / 'DONE').exists() for child in replay.iterdir())
    return (0 < checkpoint < sim.learner_step() and (has_replay or not replay_checkpoints) and sim.actors_acting()
            and (bool(sim.evaluator_status()) or (sim.settings.mode == 'vertex_ai' and sim.config.probe_every <= 0)))

  yield from _until(ready)
  sim.kill_host(sim.learner_host)


@SCENARIOS.register('reach_from_outsider')
def _reach_from_outsider(sim: Sim) -> Iterator[None]:
  """The outsider host (--outsider) tries the live run's learner and replay, at the addresses it publishes."""
  if sim.outsider is None:
    raise ValueError('--scenario=reach_from_outsider needs --outsider (the host that tries).')
  process = sim.net.popen(sim.outsider, [sys.executable, '-m', 'launch.cluster_sim', f'--reach={sim.config.run_dir}'],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  yield from _until(lambda: process.poll() is not None)
  lines = process.stdout.read().strip().splitlines()
  sim.event('outsider_reached', host=sim.outsider.index, **json.loads(lines[-1] if lines else '{}'))


def reach(run_dir: str, timeout_s: float = 600.0, call_timeout_s: float = 10.0) -> dict:
  """What answers, from this host, at the learner (Courier `get_step`) and the replay (Reverb `server_info`) that
  the live run in `run_dir` publishes: waits for its addresses, then tries until both answer or `timeout_s`."""
  import courier  # pylint: disable=import-outside-toplevel
  import reverb  # pylint: disable=import-outside-toplevel
  layout, deadline = RunLayout(run_dir), time.time() + timeout_s
  out: Dict[str, object] = {}
  while time.time() < deadline:
    try:
      addresses = json.loads(storage.path(layout.addresses).read_text())
    except (OSError, ValueError):
      time.sleep(1.0)
      continue
    out = {'learner': addresses['learner'], 'replay': addresses['replay']}
    try:
      client = courier.Client(addresses['learner'], call_timeout=call_timeout_s, wait_for_ready=False)
      out['learner_step'] = client.get_step()
      info = reverb.Client(addresses['replay']).server_info(timeout=int(call_timeout_s))
      out['replay_items'] = {name: table.current_size for name, table in info.items()}
      out.pop('error', None)
      return out
    except Exception as e:  # pylint: disable=broad-except  Courier's StatusNotOk has no importable home.
      out['error'] = str(e)[:300]
      time.sleep(1.0)
  return out


def _placement(sim: Sim) -> Callable[[str], netns.Host]:
  """Host 0: replay and learner; host 1: evaluator and evaluation; actors in equal blocks on the actor hosts."""
  per_host = -(-sim.config.launch.num_actors // len(sim.actor_hosts))

  def host_of(node: str) -> netns.Host:
    group, index = node.rsplit('-', 1)
    if group in ('replay', 'learner'):
      return sim.learner_host
    if group in ('evaluator', 'evaluation'):
      return sim.evaluator_host
    return sim.actor_hosts[int(index) // per_host]

  return host_of


def _environment() -> Dict[str, str]:
  return {**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu'), datasets.DOWNLOAD_ENV: '0'}


def _train_args(argv: Sequence[str]) -> List[str]:
  """The command line's launch.train flags (every flag but the harness's own)."""
  own = tuple(f'--{name}' for name in _OWN_FLAGS) + tuple(f'--no{name}' for name in _OWN_FLAGS)
  return [arg for arg in argv if arg.split('=', 1)[0] not in own]


class Mode:
  """How a mode puts the run on the hosts, and when its run is over."""

  def start(self, sim: Sim) -> None:
    raise NotImplementedError

  def step(self, sim: Sim) -> None:
    """Called at every poll: what the mode starts late."""

  def over(self, sim: Sim) -> bool:
    raise NotImplementedError


class VertexAi(Mode):
  """The packaged Vertex AI job; over when a replica cancels it (`lp.stop()`)."""

  def start(self, sim: Sim) -> None:
    config = sim.config
    write_or_check_config(config)  # As launch.train does before it submits.
    cluster = config_flags.build(cluster_lib.ClusterConfig, cluster_lib.FIELDS)
    pools = cluster_lib.package(config, cluster, os.path.join(sim.directory, 'images'))
    tasks, spec = vertex_job.vertex_tasks(pools, _placement(sim), sim.directory, _environment())
    sim.event('job', cluster_spec=spec['cluster'], nodes={t.name: t.host.index for t in tasks})
    sim.manager = vertex_job.ClusterManager(sim.net, tasks, sim.settings.restart_delay_s, sim.event)
    sim.manager.start()

  def over(self, sim: Sim) -> bool:
    request = vertex_job.cancel_request(sim.directory)
    if request:
      sim.event('cancel', **request)
    return bool(request)


class Attached(Mode):
  """The run's launcher on host 0, then (once it publishes its addresses) the attached evaluator and actors; over
  when the launcher exits 0 and the attached processes have ended."""

  def __init__(self, train_args: Sequence[str]):
    self._train_args = list(train_args)
    self._attached: List[str] = []

  def _task(self, sim: Sim, name: str, host: netns.Host, argv: Sequence[str]) -> vertex_job.Task:
    return vertex_job.Task(name, host, (sys.executable, '-m', *argv), ROOT, _environment(),
                           os.path.join(sim.directory, 'logs', f'{name}.log'))

  def start(self, sim: Sim) -> None:
    launcher = self._task(sim, 'launcher', sim.learner_host, [
        'launch.train', *self._train_args, '--launch_type=local_mp', f'--bind_host={sim.learner_host.address}'])
    sim.manager = vertex_job.ClusterManager(sim.net, [launcher], sim.settings.restart_delay_s, sim.event)
    sim.manager.start()

  def step(self, sim: Sim) -> None:
    if self._attached or not sim.addresses().get('learner') or 'stopped_at' in sim.addresses():
      return
    run_dir = f'--run_dir={sim.config.run_dir}'
    tasks = [self._task(sim, 'attach_evaluator', sim.evaluator_host,
                        ['launch.attach_evaluator', run_dir, f'--name={ATTACHED_EVALUATOR}'])]
    tasks += [self._task(sim, f'attach_actors-{host.index}', host,
                         ['launch.attach_actors', run_dir, f'--num_actors={sim.settings.attached_actors}'])
              for host in sim.actor_hosts]
    self._attached = [task.name for task in tasks]
    sim.manager.tasks.extend(tasks)
    for task in tasks:
      sim.manager._start(task)  # pylint: disable=protected-access

  def over(self, sim: Sim) -> bool:
    return sim.manager.all_ended(['launcher', *self._attached]) and bool(self._attached)


def run(config: ExperimentConfig, settings: SimConfig, mode: Mode) -> int:
  """Runs `config` on a new cluster as `mode` says, acting the scenarios; the exit code."""
  directory = settings.sim_dir or tempfile.mkdtemp(prefix='cluster-sim-')
  os.makedirs(directory, exist_ok=True)
  scenarios = [name.strip() for name in settings.scenario.split(',') if name.strip()]
  num_hosts = 2 + settings.actor_hosts + int(settings.outsider)
  print(f'Harness files in {directory}; run in {config.run_dir}.', flush=True)
  with netns.Cluster(num_hosts) as net:
    sim = Sim(config, settings, net, directory)
    sim.event('cluster', mode=settings.mode, hosts={h.index: h.address for h in net.hosts},
              namespaces=[h.namespace for h in net.hosts] + [net.switch])
    if settings.latency_ms:
      net.set_latency(settings.latency_ms, sim.actor_hosts)
      sim.event('latency', ms=settings.latency_ms, hosts=[h.index for h in sim.actor_hosts])
    acts = _acts(scenarios, sim)
    pending = True
    deadline = time.time() + settings.timeout_s
    mode.start(sim)
    last_progress = 0.0
    code = relaunch.ExitCode.NODE_FAILED
    try:
      while True:
        sim.manager.poll()
        mode.step(sim)
        if pending:
          try:
            next(acts)
          except StopIteration:
            pending = False
        if mode.over(sim):
          break
        if time.time() > deadline:
          sim.event('timeout', seconds=settings.timeout_s)
          break
        if time.time() - last_progress >= 10:
          last_progress = time.time()
          print(f'[{time.strftime("%H:%M:%S")}] {relaunch.progress_line(config)}', flush=True)
        time.sleep(POLL_S)
      sim.manager.stop(settings.grace_s)
      completed = completion.program_completed(config)
      code = relaunch.ExitCode.FINISHED if completed and not pending else relaunch.ExitCode.NODE_FAILED
      sim.event('over', completed=completed, scenarios_done=not pending, exit_code=int(code))
    except KeyboardInterrupt:
      sim.event('interrupted')
      sim.manager.stop(settings.grace_s)
      code = relaunch.ExitCode.INTERRUPTED
  print(f'{"Finished" if code == 0 else "Not finished"}: {relaunch.progress_line(config)}. Events in '
        f'{os.path.join(directory, "events.jsonl")}, logs in {os.path.join(directory, "logs")}.', flush=True)
  return int(code)


def _acts(scenarios: Sequence[str], sim: Sim) -> Iterator[None]:
  for name in scenarios:
    sim.event('scenario', name=name)
    yield from SCENARIOS[name](sim)


def _interrupt(*_) -> None:
  raise KeyboardInterrupt


def main(argv):
  settings: SimConfig = config_flags.build(SimConfig, FIELDS)
  if settings.cleanup:
    removed = netns.cleanup()
    print(f'Removed {len(removed)} namespaces (with their processes and links): {", ".join(removed) or "none"}.')
    return
  if settings.reach:
    print(json.dumps(reach(settings.reach)), flush=True)
    return
  config_flags.check_command_line(argv)
  try:
    netns.check_available()
    config = run_flags.experiment_config()
    for name in settings.scenario.split(','):
      SCENARIOS.get(name.strip())
    if settings.mode == 'vertex_ai':
      launch = dataclasses.replace(config.launch, launch_type=cluster_lib.LAUNCH_TYPE)
      config = dataclasses.replace(config, launch=launch)
      train_lib.validate(config)
      mode = VertexAi()
    else:
      mode = Attached(_train_args(sys.argv[1:]))
  except (ValueError, netns.Unavailable) as e:
    raise app.UsageError(str(e))
  signal.signal(signal.SIGTERM, _interrupt)
  sys.exit(run(config, settings, mode))


if __name__ == '__main__':
  app.run(main)
