r"""Throughput benchmark, measured side by side in one run.

  python -m launch.benchmark

Prints: actor environment steps/s with 1 and with 2 actor processes (inserting
into a local Reverb server, no rate limiting), learner updates/s (sampling
from that server), the samples-per-insert ratio actually held by the rate
limiter with actors and learner running together, and the plasticity probe's
wall time vmapped over 10 targets against the same fits done target by target.
"""

import multiprocessing
import time

from absl import app
from absl import flags
import dataclasses
import numpy as np

FLAGS = flags.FLAGS
ENV = flags.DEFINE_string('env', 'mdp:mnist:easy', 'Environment spec.')
SECONDS = flags.DEFINE_float('seconds', 15.0, 'Duration of each throughput measurement.')
LEARNER_STEPS = flags.DEFINE_integer('learner_steps', 1000, 'Learner updates timed.')
SAMPLES_PER_INSERT = flags.DEFINE_float('samples_per_insert', 8.0, 'Ratio for the rate-limited measurement.')
PROBE_STEPS = flags.DEFINE_integer('probe_steps', 2000, 'Steps of each probe fit.')
PROBE_TARGETS = flags.DEFINE_integer('probe_targets', 10, 'Targets of the probe.')


def _actor_process(env_spec: str, actor_id: int, address: str, seconds: float, result_queue) -> None:
  import environments
  from agents.actor import Actor
  from agents.builder import make_agent
  from agents.config import AgentConfig
  from launch import replay
  import jax
  import reverb

  env = environments.make(env_spec, seed=actor_id)
  agent = make_agent(AgentConfig(), env.action_spec().num_values)
  params = agent.network.init(jax.random.PRNGKey(0), np.zeros((1, *env.observation_spec().shape), np.uint8))
  actor = Actor(agent, env, epsilon=0.1, params_source=lambda: (0, params),
                add=replay.ReverbSink(reverb.Client(address)), seed=actor_id)
  actor.run(num_steps=200)  # Compile and warm up.
  start_steps, start = actor.env_steps, time.time()
  actor.run(should_stop=lambda: time.time() - start > seconds)
  result_queue.put((actor.env_steps - start_steps) / (time.time() - start))


def actor_steps_per_second(env_spec: str, num_actors: int, address: str, seconds: float) -> list:
  context = multiprocessing.get_context('spawn')
  queue = context.Queue()
  processes = [context.Process(target=_actor_process, args=(env_spec, i, address, seconds, queue))
               for i in range(num_actors)]
  for process in processes:
    process.start()
  rates = [queue.get() for _ in processes]
  for process in processes:
    process.join()
  return rates


def main(argv):
  del argv
  import environments
  import jax
  import reverb
  from agents.builder import make_agent
  from agents.config import AgentConfig
  from agents.learner import Learner
  from launch import replay
  from probes import plasticity

  env = environments.make(ENV.value)
  observation_spec = env.observation_spec()
  dummy = np.zeros(observation_spec.shape, observation_spec.dtype)
  unlimited = replay.ReplayConfig(capacity=100_000, min_size=1_000, samples_per_insert=1e9,
                                  samples_per_insert_tolerance=1e9)
  server = reverb.Server(replay.make_tables(unlimited, observation_spec))
  address = f'localhost:{server.port}'
  print(f'Benchmark on {ENV.value}, {multiprocessing.cpu_count()} CPU cores, JAX devices {jax.devices()}')

  for num_actors in (1, 2):
    rates = actor_steps_per_second(ENV.value, num_actors, address, SECONDS.value)
    print(f'actors={num_actors}: {sum(rates):8.0f} env steps/s in total, '
          f'{np.mean(rates):8.0f} per actor (inserting into Reverb, no rate limit)')

  config = AgentConfig()
  agent = make_agent(config, env.action_spec().num_values)
  learner = Learner(agent, config, replay.batch_iterator(address, config.batch_size), dummy)
  for _ in range(50):
    learner.step()
  start = time.time()
  for _ in range(LEARNER_STEPS.value):
    learner.step()
  print(f'learner: {LEARNER_STEPS.value / (time.time() - start):8.0f} updates/s '
        f'(batch {config.batch_size}, {config.arch}, sampling from Reverb)')
  del server

  limited = dataclasses.replace(unlimited, samples_per_insert=SAMPLES_PER_INSERT.value, samples_per_insert_tolerance=0.1)
  server = reverb.Server(replay.make_tables(limited, observation_spec))
  address = f'localhost:{server.port}'
  client = reverb.Client(address)
  context = multiprocessing.get_context('spawn')
  queue = context.Queue()
  actors = [context.Process(target=_actor_process, args=(ENV.value, i, address, 3 * SECONDS.value, queue))
            for i in range(2)]
  for process in actors:
    process.start()
  learner = Learner(agent, config, replay.batch_iterator(address, config.batch_size), dummy)
  start = time.time()
  while time.time() - start < 2 * SECONDS.value:
    learner.step()
  info = client.server_info()[replay.REPLAY_TABLE].rate_limiter_info
  inserts, samples = info.insert_stats.completed, info.sample_stats.completed
  for process in actors:
    process.terminate()
  print(f'rate limiter: samples_per_insert set {SAMPLES_PER_INSERT.value}, held {samples / max(inserts, 1):.2f} '
        f'({samples} samples / {inserts} inserts; {learner.step_count} learner steps with 2 actors)')

  probe_config = dataclasses.replace(plasticity.ProbeConfig(), steps=PROBE_STEPS.value,
                                     num_targets=PROBE_TARGETS.value)
  inputs = replay.sample_observations(address, probe_config.num_inputs)
  del server
  apply_fn = lambda params, obs: agent.network.apply(params, obs).outputs
  params = learner.get_params()[1]
  timings = {}
  for name, run in (('vmapped', plasticity.make_probe), ('python loop', plasticity.make_sequential_probe)):
    probe = run(apply_fn=apply_fn, init_fn=agent.network.init, optimizer=agent.optimizer, config=probe_config)
    start = time.time()
    result = probe(params, inputs, jax.random.PRNGKey(0))
    timings[name] = time.time() - start
    print(f'probe ({name}): {timings[name]:7.1f} s for {probe_config.num_targets} targets x '
          f'{probe_config.steps} steps (compile included), plasticity {result.as_record()["plasticity"]:.4f}')
  print(f'probe: python loop / vmapped = {timings["python loop"] / timings["vmapped"]:.2f}x')


if __name__ == '__main__':
  app.run(main)
