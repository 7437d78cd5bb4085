r"""What placement costs a cluster run: actors on 1, 2 and 3 hosts, and 1 ms / 10 ms more latency on their links.

  .venv/bin/python -m launch.benchmarks.cluster --actor_host_counts=1,2,3 --latencies_ms=0,1,10 --seconds=20

Root only (`launch.simulation.netns`). For each count of actor hosts, the Vertex AI
program (`launch.cluster_sim`'s vertex_ai mode: replay and learner on host 0,
`--actors_per_host` actors on each actor host; no evaluator) runs until the
learner learns; then for each latency, added each way on every actor host's
link (`launch.simulation.link_delay`: this kernel has no netem), after `--settle_s` the
run's records over `--seconds` give: env steps/s (all actors), learner
updates/s, the learner's input-bound fraction (time waiting for a batch) and
parameter pulls/s (parameters sent to actors). Rows are printed with their
ratio to the first row, all measured side by side in one command. Every host
shares this machine's cores: on a 2-core machine more actor hosts add
processes, not cores, so the figures show the network's cost and the
cores' contention, not a cluster's scaling. The relay's own CPU (a Python
process forwarding every frame) is printed beside each delayed row.
"""

import dataclasses
import os
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

from absl import app
from absl import flags

from agents import config_flags
from launch import benchmarks
from launch import cluster_sim
from launch import flags as run_flags
from launch.simulation import netns
from probes.records.run_dir import ExperimentConfig, RunLayout

FLAGS = flags.FlagValues()  # This benchmark's own (launch/benchmarks/__init__.py).
ACTOR_HOST_COUNTS = flags.DEFINE_list('actor_host_counts', ['1', '2', '3'], 'Counts of actor hosts, one run each.',
                                      flag_values=FLAGS)
LATENCIES_MS = flags.DEFINE_list('latencies_ms', ['0', '1', '10'], 'Delays added each way on the actor hosts\' '
                                 'links, measured in turn within each run.', flag_values=FLAGS)
ACTORS_PER_HOST = flags.DEFINE_integer('actors_per_host', 1, 'Actors on each actor host.', lower_bound=1,
                                       flag_values=FLAGS)
SECONDS = flags.DEFINE_float('seconds', 20.0, 'Measurement window of each row.', lower_bound=1.0, flag_values=FLAGS)
SETTLE_S = flags.DEFINE_float('settle_s', 5.0, 'Wait after a latency change before measuring.', lower_bound=0.0,
                              flag_values=FLAGS)
OUT_DIR = flags.DEFINE_string('out_dir', '', 'Where the runs and harness files go (default: a temporary directory).',
                              flag_values=FLAGS)


@dataclasses.dataclass
class Row:
  actor_hosts: int
  latency_ms: float
  env_steps_per_s: float
  updates_per_s: float
  input_wait_fraction: float
  param_pulls_per_s: float
  relay_cpu: Optional[float]  # Cores the delay relay kept busy; None without one.


def _rate(records: Sequence[dict], key: str) -> float:
  """(last - first) of `key` over their time apart: 0 with fewer than two records."""
  if len(records) < 2 or records[-1]['time'] <= records[0]['time']:
    return 0.0
  return (records[-1][key] - records[0][key]) / (records[-1]['time'] - records[0]['time'])


def measure(layout: RunLayout, start: float, end: float) -> Dict[str, float]:
  """The rates of the run's records written between `start` and `end`."""
  actors = [r for r in layout.records(RunLayout.ACTORS) if start <= r['time'] <= end]
  by_actor: Dict[int, List[dict]] = {}
  for record in actors:
    by_actor.setdefault(record['actor_id'], []).append(record)
  learner = [r for r in layout.records(RunLayout.LEARNER) if start <= r['time'] <= end]
  mean = lambda key: sum(r.get(key, 0.0) for r in learner) / max(len(learner), 1)
  return {'env_steps_per_s': sum(_rate(records, 'env_steps') for records in by_actor.values()),
          'updates_per_s': _rate(learner, 'learner_step'), 'input_wait_fraction': mean('input_wait_fraction'),
          'param_pulls_per_s': mean('param_pulls_per_s')}


def _cpu_seconds(pid: int) -> float:
  with open(f'/proc/{pid}/stat') as f:
    fields = f.read().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _wait(sim: cluster_sim.Sim, seconds: float) -> None:
  end = time.time() + seconds
  while time.time() < end:
    sim.manager.poll()
    time.sleep(cluster_sim.POLL_S)


def run_actor_hosts(base: ExperimentConfig, count: int, latencies: Sequence[float], directory: str,
                    report: Callable[[Row], None]) -> None:
  """One run with `count` actor hosts; a row per latency, to `report`."""
  launch = dataclasses.replace(base.launch, num_actors=count * ACTORS_PER_HOST.value, launch_type='vertex_ai')
  config = dataclasses.replace(base, run_dir=os.path.join(directory, f'run-{count}-hosts'), launch=launch,
                               probe_every=0, max_learner_steps=10**9)
  settings = cluster_sim.SimConfig(actor_hosts=count, sim_dir=os.path.join(directory, f'sim-{count}-hosts'))
  os.makedirs(settings.sim_dir, exist_ok=True)
  with netns.Cluster(2 + count) as net:
    sim = cluster_sim.Sim(config, settings, net, settings.sim_dir)
    cluster_sim.VertexAi().start(sim)
    try:
      while sim.learner_step() <= 0:
        _wait(sim, 1.0)
      for ms in latencies:
        net.set_latency(ms, sim.actor_hosts)
        _wait(sim, SETTLE_S.value)
        relay = net.delay_process
        cpu = _cpu_seconds(relay.pid) if relay else None
        start = time.time()
        _wait(sim, SECONDS.value)
        end = time.time()
        relay_cpu = (_cpu_seconds(relay.pid) - cpu) / (end - start) if relay else None
        report(Row(count, ms, relay_cpu=relay_cpu, **measure(config.layout, start, end)))
    finally:
      sim.manager.stop(settings.grace_s)


def _format(rows: Sequence[Row], first: Row) -> str:
  ratio = lambda value, base: f'{value / base:.2f}' if base else '-'
  return '\n'.join(
      f'{r.actor_hosts:>11} {r.latency_ms:>10g} {r.env_steps_per_s:>12.0f} '
      f'({ratio(r.env_steps_per_s, first.env_steps_per_s)}) {r.updates_per_s:>10.1f} '
      f'({ratio(r.updates_per_s, first.updates_per_s)}) {r.input_wait_fraction:>10.2f} '
      f'{r.param_pulls_per_s:>11.1f} {"" if r.relay_cpu is None else f"{r.relay_cpu:.2f}":>9}' for r in rows)


HEADER = (f'{"actor hosts":>11} {"latency ms":>10} {"env steps/s":>12} (ratio) {"updates/s":>10} (ratio) '
          f'{"input-bound":>10} {"pulls/s":>11} {"relay cpu":>9}')


def main(argv):
  config_flags.check_command_line(argv)
  directory = OUT_DIR.value or tempfile.mkdtemp(prefix='cluster-benchmark-')
  flags.FLAGS.set_default('run_dir', directory)  # Each count's run gets a directory of its own in it.
  try:
    netns.check_available()
    base = run_flags.experiment_config()
    counts = [int(count) for count in ACTOR_HOST_COUNTS.value]
    latencies = [float(ms) for ms in LATENCIES_MS.value]
  except (ValueError, netns.Unavailable) as e:
    raise app.UsageError(str(e))
  print(f'Runs in {directory}; {ACTORS_PER_HOST.value} actor(s) per actor host, {SECONDS.value:g} s per row, on '
        f'{os.cpu_count()} cores that every host shares.', flush=True)
  print(HEADER, flush=True)
  rows: List[Row] = []

  def report(row: Row) -> None:
    rows.append(row)
    print(_format([row], rows[0]), flush=True)

  for count in counts:
    run_actor_hosts(base, count, latencies, directory, report)
  print('\n' + HEADER + '\n' + _format(rows, rows[0]))
  print('Ratios are to the first row. input-bound: the learner\'s share of time waiting for a batch; pulls/s: '
        'parameter sets the learner sent to actors; relay cpu: cores the link-delay relay kept busy.')


if __name__ == '__main__':
  benchmarks.run(main, FLAGS)
