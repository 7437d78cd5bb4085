r"""Atari preprocessing overhead, measured side by side in one run.

  python -m launch.benchmarks.environments [--game=pong] [--steps=5000]

Prints, on one pinned core: environment steps/s of `atari:<game>` with the
full preprocessing against raw ALE emulation of the same number of frames
(the ratio is the preprocessing overhead; the goal is under 1.3x), the two
measurements interleaved in rounds so that machine noise hits both alike;
then the preprocessed steps/s per actor process with 1 and with 2 processes.
"""

import multiprocessing
import os
import time

from absl import flags
import numpy as np

from launch import benchmarks

FLAGS = flags.FlagValues()  # This benchmark's own (launch/benchmarks/__init__.py).
GAME = flags.DEFINE_string('game', 'pong', 'ALE game name.', flag_values=FLAGS)
STEPS = flags.DEFINE_integer('steps', 5000, 'Environment steps per measurement round.', lower_bound=100,
                             flag_values=FLAGS)
ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds of each measurement.', lower_bound=1, flag_values=FLAGS)


def pin(core: int) -> None:
  """Runs this process on one core (where the OS allows), so that rates measured one after another share it."""
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {core % os.cpu_count()})


def preprocessed_steps_per_second(game: str, steps: int, seed: int = 0, env=None) -> float:
  import environments
  env = env or environments.make(f'atari:{game}', seed=seed)
  actions = np.random.default_rng(seed).integers(env.action_spec().num_values, size=steps)
  env.reset()
  start = time.perf_counter()
  for action in actions:
    if env.step(action).last():
      env.reset()
  return steps / (time.perf_counter() - start)


def raw_frames_per_second(game: str, frames: int, seed: int = 0) -> float:
  import ale_py
  from ale_py import roms
  ale = ale_py.ALEInterface()
  ale.setLoggerMode(ale_py.LoggerMode.Error)
  ale.setInt('random_seed', seed)
  ale.loadROM(str(roms.get_rom_path(game)))
  legal = ale.getMinimalActionSet()
  actions = np.random.default_rng(seed).integers(len(legal), size=frames // 4 + 1)
  start = time.perf_counter()
  for frame in range(frames):
    ale.act(legal[actions[frame // 4]])
    if ale.game_over():
      ale.reset_game()
  return frames / (time.perf_counter() - start)


def _actor(game: str, steps: int, core: int, queue) -> None:
  pin(core)
  queue.put(preprocessed_steps_per_second(game, steps, seed=core))


def per_actor(game: str, steps: int, processes: int) -> list:
  context = multiprocessing.get_context('spawn')
  queue = context.Queue()
  workers = [context.Process(target=_actor, args=(game, steps, core, queue)) for core in range(processes)]
  for worker in workers:
    worker.start()
  rates = [queue.get() for _ in workers]
  for worker in workers:
    worker.join()
  return rates


def main(argv):
  del argv
  import environments
  pin(0)
  env = environments.make(f'atari:{GAME.value}')
  preprocessed_steps_per_second(GAME.value, 200, env=env)  # Warm up.
  steps, frames = [], []
  for _ in range(ROUNDS.value):
    steps.append(preprocessed_steps_per_second(GAME.value, STEPS.value, env=env))
    frames.append(raw_frames_per_second(GAME.value, 4 * STEPS.value))
  step_rate, frame_rate = np.median(steps), np.median(frames)
  print(f'atari:{GAME.value} on one core, median of {ROUNDS.value} interleaved rounds of {STEPS.value} steps:')
  print(f'  preprocessed: {step_rate:8.0f} env steps/s = {4 * step_rate:8.0f} frames/s')
  print(f'  raw ALE:      {frame_rate / 4:8.0f} env steps/s = {frame_rate:8.0f} frames/s')
  print(f'  preprocessing overhead: {frame_rate / (4 * step_rate):.2f}x (goal < 1.3x)')
  for processes in (1, 2):
    rates = per_actor(GAME.value, STEPS.value, processes)
    print(f'  {processes} actor process(es): {np.mean(rates):8.0f} env steps/s per actor, {sum(rates):8.0f} in total')


if __name__ == '__main__':
  benchmarks.run(main, FLAGS)
