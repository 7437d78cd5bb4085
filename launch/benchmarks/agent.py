r"""Throughput benchmark, measured side by side in one run.

  python -m launch.benchmarks.agent [--env=mdp:mnist:easy] [--seconds=15] [--probe_steps=2000]
      [--sections=batched_actors,actors,learner,evaluator,rate_limiter,probe]
  python -m launch.benchmarks.agent --sections=batched_actors --env=atari:pong --arch=nature_dqn --envs_per_actor=1,4,16
  python -m launch.benchmarks.agent --sections=fused [--updates_per_call_values=1,4,16,64]

Prints (`--sections`, default all of them; every network is `--arch`'s, but `fused`'s):
  * `fused`: the learner's updates/s with each `--updates_per_call_values` K
    (K updates per compiled call, one host sync per call; held batches, no
    replay) for `mlp` and `cnn` on the MDP's observations and `nature_dqn` on Atari's,
    batch 32, each as a share of the float32 matmul rate of a 1024 x 1024
    matmul (the median of one per round), with the FLOPs of one update (XLA's
    cost analysis of the lowered update), the Ks' rounds interleaved;
  * `batched_actors`: environment steps/s of one actor process on one pinned
    core with each of `--envs_per_actor` environments (one batched policy
    call per step: inference included, no replay insertion), and, for Atari,
    raw ALE emulation of the same frames on the same core; the rounds of
    each are interleaved so that machine noise hits all alike, medians
    printed as ratios; each step's time split into raw emulation, the
    jitted forward pass timed alone (its FLOPs as a share of the core's
    float32 matmul rate) and the rest; and the most a float32 actor could
    step on that core: raw ALE's time plus the forward pass's at the
    matmul rate;
  * `actors` (the first measurement always runs, filling the replay): actor
    environment steps/s with 1 and with 2 actor processes (inserting into a
    local Reverb server, no rate limiting);
  * `learner`: updates/s of the learner as the program runs it (Reverb
    batches through the prefetching pipeline, logs, parameter publishing)
    against the bare loop (the jitted update and its finiteness check, nothing
    else) on the same batches held on the device, as `learner / bare = N.NN`;
    and where the process's CPU time went meanwhile, by thread (XLA's pool,
    tf.data's, gRPC's, the main thread), with the share of the time the
    learner waited for a batch: near 0 with a ratio below 1, the input
    threads slow the update by taking its cores rather than by starving it;
  * `evaluator`: learner updates/s sampling from that server: alone, beside an evaluator
    process (probe + diagnostics on fetched snapshots, as an attached
    evaluator does), and beside a process that only burns the same CPU (pure
    numpy). The evaluator's cost to the learner beyond sharing the cores is
    the difference between the last two;
    - the samples-per-insert ratio the rate limiter actually held with 2 actors
    and the learner running together;
    - the plasticity probe's wall time for 10 targets vmapped against the same
    fits done target by target in a Python loop (compilation timed apart).
"""

import collections
import functools
import dataclasses
import multiprocessing
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import psutil

from launch import benchmarks
from agents import config_flags
from probes.records.run_dir import ExperimentConfig

FLAGS = flags.FlagValues()  # This benchmark's own (launch/benchmarks/__init__.py).
SECONDS = flags.DEFINE_float('seconds', 15.0, 'Duration of each throughput measurement.', flag_values=FLAGS)
SECTION_NAMES = ('fused', 'batched_actors', 'actors', 'learner', 'evaluator', 'rate_limiter', 'probe')
SECTIONS = flags.DEFINE_list('sections', list(SECTION_NAMES), f'What to measure, of {", ".join(SECTION_NAMES)}.',
                             flag_values=FLAGS)
HELD_BATCHES = flags.DEFINE_integer('held_batches', 500, 'Batches of the learner\'s measurement the bare loop '
                                    'cycles through (held on the device).', flag_values=FLAGS)
ENVS_PER_ACTOR = flags.DEFINE_list('envs_per_actor', ['1', '4', '16'],
                                   'batched_actors: environments per actor process, each measured.', flag_values=FLAGS)
UPDATES_PER_CALL = flags.DEFINE_list('updates_per_call_values', ['1', '4', '16', '64'],
                                     'fused: the learner\'s --updates_per_call values measured.', flag_values=FLAGS)
# Not --steps, --rounds: launch.benchmarks.environments, imported by the measuring process, defines those.
STEPS = flags.DEFINE_integer('actor_steps', 2000, 'batched_actors: environment steps per measurement round.',
                             lower_bound=16, flag_values=FLAGS)
ROUNDS = flags.DEFINE_integer('actor_rounds', 3, 'batched_actors: interleaved rounds of each measurement.',
                              lower_bound=1, flag_values=FLAGS)
# The run's own flags, as a run would take them (the rate-limited measurement uses --samples_per_insert; every
# network is --arch's).
FIELDS = config_flags.define(ExperimentConfig, only=['env', 'arch', 'samples_per_insert', 'probe_steps',
                                                     'probe_targets'], flag_values=FLAGS)


def _spawn(target, *args) -> multiprocessing.Process:
  process = multiprocessing.get_context('spawn').Process(target=target, args=args, daemon=True)
  process.start()
  return process


def _actor_process(run: ExperimentConfig, actor_id: int, address: str, seconds: float, result_queue) -> None:
  import jax
  import reverb
  import environments
  from agents.actor import Actor
  from agents.builder import make_agent
  from launch.program import replay

  env = environments.make(run.env, seed=actor_id)
  agent = make_agent(run.agent, env.action_spec().num_values)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, *env.observation_spec().shape), np.uint8))
  actor = Actor(agent, run.agent, env, params_source=lambda: (0, params),
                add=replay.ReverbSink(reverb.Client(address)), seed=actor_id)
  actor.run(num_steps=200)  # Compile and warm up.
  start_steps, start = actor.env_steps, time.time()
  actor.run(should_stop=lambda: time.time() - start > seconds)
  result_queue.put((actor.env_steps - start_steps) / (time.time() - start))


def _batched_actor_process(run: ExperimentConfig, counts: list, steps: int, rounds: int, result_queue) -> None:
  """On core 0, the measurements interleaved round by round, medians: env steps/s of an actor of each count of
  environments (inference included, transitions dropped); the seconds of its jitted forward pass alone per env
  step, with its FLOPs (XLA's cost analysis); the core's float32 matmul rate; for Atari, raw ALE emulation."""
  import jax
  import environments
  from agents.actor import Actor, actor_seed, environment_seeds
  from agents.builder import make_agent
  from launch.benchmarks import environments as environments_benchmark
  from launch.benchmarks import timing

  environments_benchmark.pin(0)
  actors, forwards, flops = {}, {}, {}
  for count in counts:
    envs = [environments.make(run.env, seed=seed, **run.env_options())
            for seed in environment_seeds(actor_seed(run.seed, 0), count)]
    agent = make_agent(run.agent, envs[0].action_spec().num_values)
    spec = envs[0].observation_spec()
    params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, *spec.shape), spec.dtype))
    actors[count] = Actor(agent, run.agent, envs, params_source=lambda params=params: (0, params),
                          add=lambda transition: None, params_update_period=10**9)
    actors[count].run(num_steps=4 * count)  # Compile and warm up.
    apply = lambda p, x, agent=agent: agent.network.apply(p, x).outputs
    observations = jax.device_put(timing.random_observations(spec.shape, count).astype(spec.dtype))
    forwards[count] = functools.partial(jax.jit(apply), params, observations)
    jax.block_until_ready(forwards[count]())
    forward_flops = timing.hlo_flops(apply, params, observations)
    flops[count] = forward_flops / count if forward_flops else None
  family, _, game = run.env.partition(':')
  game = game if family == 'atari' else None  # Raw emulation is ALE's alone.
  rates, forward_s = {count: [] for count in counts}, {count: [] for count in counts}
  raw, matmul = [], []
  for _ in range(rounds):
    matmul.append(timing.matmul_flops_per_s())
    for count, actor in actors.items():
      start_steps, start = actor.env_steps, time.perf_counter()
      actor.run(num_steps=steps)
      rates[count].append((actor.env_steps - start_steps) / (time.perf_counter() - start))
      calls, start = max(1, steps // count), time.perf_counter()
      jax.block_until_ready([forwards[count]() for _ in range(calls)])
      forward_s[count].append((time.perf_counter() - start) / (calls * count))
    if game:  # Frames per second / 4 = env steps per second at action repeat 4.
      raw.append(environments_benchmark.raw_frames_per_second(game, 4 * steps) / 4)
  median = lambda values: {count: float(np.median(v)) for count, v in values.items()}
  result_queue.put((median(rates), median(forward_s), flops, float(np.median(raw)) if raw else None,
                    float(np.median(matmul))))


def batched_actors(run: ExperimentConfig) -> None:
  counts = [int(count) for count in ENVS_PER_ACTOR.value]
  if min(counts) < 1:
    raise app.UsageError(f'--envs_per_actor={",".join(ENVS_PER_ACTOR.value)}: each count must be >= 1.')
  queue = multiprocessing.get_context('spawn').Queue()
  process = _spawn(_batched_actor_process, run, counts, STEPS.value, ROUNDS.value, queue)
  rates, forward_s, flops, raw, matmul = queue.get()
  process.join()
  print(f'batched actors: {run.env}, --arch={run.agent.arch}, one actor process on one core, median of '
        f'{ROUNDS.value} interleaved rounds of {STEPS.value} env steps (inference included, no replay insertion); '
        f'the core\'s float32 matmul rate {matmul / 1e9:.0f} GFLOP/s:')
  for count, rate in rates.items():
    against_raw = f', raw ALE / this = {raw / rate:5.2f}x' if raw else ''
    print(f'  envs_per_actor={count:3d}: {rate:8.0f} env steps/s, {rate / rates[counts[0]]:5.2f}x '
          f'envs_per_actor={counts[0]}{against_raw}')
    step_ms, forward_ms, emulation_ms = 1e3 / rate, 1e3 * forward_s[count], 1e3 / raw if raw else 0.0
    share = f' ({flops[count] / 1e6:.1f} MFLOP: {flops[count] / forward_s[count] / matmul:.0%} of the matmul ' \
            f'rate)' if flops[count] else ''
    print(f'    per env step {step_ms:.3f} ms: raw emulation {emulation_ms:.3f}, the forward pass alone '
          f'{forward_ms:.3f}{share}, the rest {step_ms - emulation_ms - forward_ms:.3f}')
  if raw:
    print(f'  raw ALE:            {raw:8.0f} env steps/s (= {4 * raw:.0f} frames/s, no preprocessing or inference)')
    flop = flops[counts[-1]]
    if flop:  # Emulation plus a forward pass at the matmul rate and nothing else: the most a float32 actor does.
      bound = 1 / (1 / raw + flop / matmul)
      print(f'  bound: raw ALE plus the forward pass at the matmul rate: {bound:8.0f} env steps/s = '
            f'{bound / raw:.2f}x raw ALE')


def _evaluator_process(run: ExperimentConfig, address: str, params, stop_event) -> None:
  """Probes and diagnoses the given snapshot over and over, as an attached evaluator would."""
  import tempfile
  import environments
  from agents.builder import make_agent
  from launch.program import replay
  from probes.measures.diagnostics import DiagnosticsConfig
  from probes.evaluator import Evaluator
  from probes.records.run_dir import RunLayout
  from probes.measures.plasticity import ProbeConfig

  env = environments.make(run.env)
  evaluator = Evaluator(make_agent(run.agent, env.action_spec().num_values), ProbeConfig(steps=200),
                        params_source=lambda: (0, params, params), replay_source=replay.ReverbSource(address),
                        out=RunLayout(tempfile.mkdtemp()), diagnostics_config=DiagnosticsConfig())
  while not stop_event.is_set():
    evaluator.evaluate()


def _cpu_burner_process(stop_event) -> None:
  """Keeps cores as busy as the evaluator does, touching nothing the learner uses."""
  a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
  while not stop_event.is_set():
    a = np.tanh(a @ a.T / 512)


def actor_steps_per_second(run: ExperimentConfig, num_actors: int, address: str, seconds: float) -> list:
  queue = multiprocessing.get_context('spawn').Queue()
  processes = [_spawn(_actor_process, run, i, address, seconds, queue) for i in range(num_actors)]
  rates = [queue.get() for _ in processes]
  for process in processes:
    process.join()
  return rates


def learner_updates_per_second(learner, seconds: float) -> float:
  start_step, start = learner.step_count, time.time()
  while time.time() - start < seconds:
    learner.step()
  return (learner.step_count - start_step) / (time.time() - start)


def _thread_cpu_seconds(prefetch_thread: int) -> collections.Counter:
  """CPU seconds of this process's threads: the main one (the learner: Python, XLA dispatch and much of XLA:CPU's
  compute), the prefetching one (Reverb's Python side, conversions, the device transfer), and all others (XLA's
  and tf.data's pools, Reverb's gRPC); a thread that has ended is left out."""
  names = {os.getpid(): 'main', prefetch_thread: 'prefetch'}
  totals = collections.Counter()
  for thread in psutil.Process().threads():
    totals[names.get(thread.id, 'others')] += thread.user_time + thread.system_time
  return totals


def learner_against_bare_loop(agent, config, address: str, dummy: np.ndarray, seconds: float,
                              rounds: int = 3) -> None:
  """The learner as the program runs it (Reverb batches through `replay.batch_iterator`, logging, publishing)
  against the bare loop (the jitted update and its finiteness check) on the same batches, held on the device.

  The two alternate in `rounds` rounds, so that a change in the machine's load weighs on both.
  """
  from agents.learner import Learner
  from agents.update import UPDATE_KEEPS, jit_keeping, make_update
  from launch.program import replay
  from probes.records.loggers import JsonlLogger

  batches = replay.batch_iterator(address, config.batch_size)
  held = []

  def recorded():
    for batch in batches:
      if len(held) < HELD_BATCHES.value:
        held.append(batch)
      yield batch

  logs = tempfile.mkdtemp()
  learner = Learner(agent, config, recorded(), dummy, log_every=100,
                    logger=JsonlLogger(os.path.join(logs, 'learner.jsonl'), os.path.join(logs, 'tensorboard')))
  update = jit_keeping(make_update(agent.network, agent.encoding, agent.optimizer, config.discount, agent.loss_terms),
                       UPDATE_KEEPS)
  state = learner.state

  def learner_loop(duration: float) -> int:
    start_step, start = learner.step_count, time.time()
    while time.time() - start < duration:
      learner.step()
    return learner.step_count - start_step

  def bare_loop(duration: float) -> int:
    nonlocal state
    done, start = 0, time.time()
    while time.time() - start < duration:
      state, metrics = update(state, held[done % len(held)])
      bool(metrics['finite'])  # The learner's one sync per update.
      done += 1
    return done

  learner_loop(2.0)  # Compile and warm up both.
  bare_loop(2.0)
  totals = collections.Counter()
  cpu = collections.Counter()
  waited = 0.0
  for _ in range(rounds):
    cpu_before, waited_before = _thread_cpu_seconds(batches.thread_id), batches.wait_seconds
    start = time.time()
    totals['learner'] += learner_loop(seconds / rounds)
    totals['learner_s'] += time.time() - start
    cpu += _thread_cpu_seconds(batches.thread_id) - cpu_before
    waited += batches.wait_seconds - waited_before
    start = time.time()
    totals['bare'] += bare_loop(seconds / rounds)
    totals['bare_s'] += time.time() - start
  batches.close()
  rate, bare = totals['learner'] / totals['learner_s'], totals['bare'] / totals['bare_s']
  shares = ', '.join(f'{name} {value / totals["learner_s"]:.2f}' for name, value in sorted(cpu.items()))
  print(f'learner profile: cores busy {sum(cpu.values()) / totals["learner_s"]:.2f} of {multiprocessing.cpu_count()} '
        f'({shares}); waiting for a batch {100 * waited / totals["learner_s"]:.0f}% of the time', flush=True)
  print(f'learner: {rate:8.0f} updates/s in the program\'s pipeline, {bare:8.0f} on the bare loop ({len(held)} of the '
        f'same batches on the device, {rounds} alternating rounds): learner / bare = {rate / bare:.2f}', flush=True)


# (arch, observation shape, actions) of the fused learner's measurement: the MDP's digits, Atari's frames.
FUSED_ARCHS = (('mlp', (28, 28, 1), 10), ('cnn', (28, 28, 1), 10), ('nature_dqn', (84, 84, 4), 18))


def fused(seconds: float) -> None:
  import jax
  from agents.builder import make_agent
  from agents.config import AgentConfig
  from agents.learner import resolve_updates_per_call
  from agents.loops import avoid_compiled_loops
  from launch.benchmarks import timing

  ks = [int(k) for k in UPDATES_PER_CALL.value]
  if min(ks) < 1:
    raise app.UsageError(f'--updates_per_call_values={",".join(UPDATES_PER_CALL.value)}: each must be >= 1.')
  print(f'fused learner: {jax.default_backend()}, {multiprocessing.cpu_count()} cores; updates/s of the Learner with '
        f'K updates per call (held batches), 3 alternating rounds:', flush=True)
  for arch, shape, num_actions in FUSED_ARCHS:
    config = AgentConfig(arch=arch)
    network = make_agent(config, num_actions).network
    dummy = np.zeros(shape, np.uint8)
    dispatched = avoid_compiled_loops(jax.eval_shape(network.init, jax.random.PRNGKey(0), dummy[None]))
    flops = timing.update_flops(config, shape, num_actions)
    rates, matmul = timing.fused_updates_per_s(config, shape, num_actions, ks, seconds)
    print(f'  {arch} {shape}, batch {config.batch_size}: {flops / 1e6:.0f} MFLOP per update; float32 matmul '
          f'{matmul / 1e9:.0f} GFLOP/s; default K here {resolve_updates_per_call(None, network, dummy)}'
          + ('; a call\'s updates dispatched one by one (convolutions on XLA:CPU)' if dispatched else ''))
    for k in ks:
      print(f'    K={k:3d}: {rates[k]:8.1f} updates/s = {rates[k] * flops / matmul:6.1%} of the matmul rate, '
            f'{rates[k] / rates[ks[0]]:5.2f}x K={ks[0]}', flush=True)


def main(argv):
  del argv
  unknown = set(SECTIONS.value) - set(SECTION_NAMES)
  if unknown:
    raise app.UsageError(f'--sections: unknown {", ".join(sorted(unknown))}; accepted: {", ".join(SECTION_NAMES)}.')
  sections = set(SECTIONS.value)
  run = config_flags.build(ExperimentConfig, FIELDS)
  if 'fused' in sections:
    fused(SECONDS.value)
  if 'batched_actors' in sections:
    batched_actors(run)
  if sections - {'batched_actors', 'fused'}:
    distributed(run, sections)


def distributed(run: ExperimentConfig, sections: set) -> None:
  import jax
  import reverb
  import environments
  from agents.builder import make_agent
  from agents.learner import Learner
  from launch.program import replay
  from launch.benchmarks import timing

  env = environments.make(run.env)
  observation_spec = env.observation_spec()
  dummy = np.zeros(observation_spec.shape, observation_spec.dtype)
  unlimited = replay.ReplayConfig(capacity=100_000, min_size=1_000, samples_per_insert=1e9,
                                  samples_per_insert_tolerance=1e9)
  server = reverb.Server(replay.make_tables(unlimited, observation_spec))
  address = f'localhost:{server.port}'
  print(f'Benchmark on {run.env}, {multiprocessing.cpu_count()} CPU cores, JAX devices {jax.devices()}', flush=True)

  for num_actors in (1, 2):
    rates = actor_steps_per_second(run, num_actors, address, SECONDS.value)
    print(f'actors={num_actors}: {sum(rates):8.0f} env steps/s in total, {np.mean(rates):8.0f} per actor '
          f'(inserting into Reverb, no rate limit)', flush=True)
    if 'actors' not in sections:
      break

  config = run.agent
  agent = make_agent(config, env.action_spec().num_values)
  if 'learner' in sections:
    learner_against_bare_loop(agent, config, address, dummy, SECONDS.value)

  if 'evaluator' in sections:
    batches = replay.batch_iterator(address, config.batch_size)
    learner = Learner(agent, config, batches, dummy)
    learner_updates_per_second(learner, 2.0)  # Compile and warm up.
    alone = learner_updates_per_second(learner, SECONDS.value)
    params = learner.get_params()[1]
    side_by_side = {}
    for name, target, args in (('an evaluator', _evaluator_process, (run, address, params)),
                               ('a CPU burner', _cpu_burner_process, ())):
      stop = multiprocessing.get_context('spawn').Event()
      process = _spawn(target, *args, stop)
      time.sleep(20.0)  # Let it compile and reach its steady state.
      side_by_side[name] = learner_updates_per_second(learner, SECONDS.value)
      stop.set()
      process.join(timeout=300)
    batches.close()
    print(f'learner: {alone:8.0f} updates/s alone (batch {config.batch_size}, {config.arch}, sampling from Reverb)')
    for name, rate in side_by_side.items():
      print(f'learner: {rate:8.0f} updates/s beside {name} ({rate / alone:.2f} of alone)')
    print(f'learner: beside an evaluator / beside a CPU burner = '
          f'{side_by_side["an evaluator"] / side_by_side["a CPU burner"]:.2f} (1.00: the evaluator costs the learner '
          f'only the cores it shares)', flush=True)
  del server
  if not sections & {'rate_limiter', 'probe'}:
    return

  limited = dataclasses.replace(unlimited, samples_per_insert=run.replay.samples_per_insert,
                                samples_per_insert_tolerance=0.1)
  server = reverb.Server(replay.make_tables(limited, observation_spec))
  address = f'localhost:{server.port}'
  queue = multiprocessing.get_context('spawn').Queue()
  actors = [_spawn(_actor_process, run, i, address, 3 * SECONDS.value, queue) for i in range(2)]
  batches = replay.batch_iterator(address, config.batch_size)
  learner = Learner(agent, config, batches, dummy)
  client = reverb.Client(address)

  def counts():
    info = client.server_info()[replay.REPLAY_TABLE].rate_limiter_info
    return info.insert_stats.completed, info.sample_stats.completed

  learner_updates_per_second(learner, SECONDS.value)  # Past min_size, where the ratio starts to bind.
  (inserts_0, samples_0), steps_0 = counts(), learner.step_count
  learner_updates_per_second(learner, SECONDS.value)
  (inserts_1, samples_1), steps_1 = counts(), learner.step_count
  for process in actors:
    process.terminate()
  batches.close()
  inserts, samples = inserts_1 - inserts_0, samples_1 - samples_0
  if 'rate_limiter' in sections:
    print(f'rate limiter: samples_per_insert set {run.replay.samples_per_insert}, held '
          f'{samples / max(inserts, 1):.2f} ({samples} samples / {inserts} inserts over {steps_1 - steps_0} learner '
          f'steps with 2 actors, after the first {steps_0})', flush=True)
  if 'probe' not in sections:
    return

  probe_config = run.probe
  inputs = replay.ReverbSource(address).distinct_observations(probe_config.num_inputs, give_up=lambda: False)
  del server
  results = timing.vmapped_and_loop(agent, learner.get_params()[1], inputs, probe_config)
  for name, result in results.items():
    print(f'probe ({name}): {result.wall_time_s:7.1f} s for {probe_config.num_targets} targets x '
          f'{probe_config.steps} steps (+{result.compile_time_s:.1f} s compiling), '
          f'plasticity {result.plasticity:.4f}', flush=True)
  print(f'probe: python loop / vmapped = {results["loop"].wall_time_s / results["vmapped"].wall_time_s:.2f}x')


if __name__ == '__main__':
  benchmarks.run(main, FLAGS)
