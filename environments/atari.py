"""Atari 2600 games through the Arcade Learning Environment: `atari:<game>`.

`ale_py.ALEInterface` directly, with the ROMs ale-py ships, and DQN Zoo's
preprocessing (Mnih et al. 2015; van Hasselt et al. 2016), each choice an
option of `environments.make('atari:pong', seed, **options)`:
  * `action_repeat=4`: each action is repeated 4 frames; rewards are summed;
  * `pool_frames=True`: the observed frame is the pixel-wise max of the last
    two of those frames (removes sprite flicker);
  * grayscale: ALE's own luminance screen (`getScreenGrayscale`), taken
    before pooling (DQN Zoo pools RGB, then converts; the difference is the
    order of max and a linear map, at most a grey level or two);
  * `resize=(84, 84)`: bilinear (2 taps, half-pixel centres: OpenCV's
    INTER_LINEAR, in 16 us a frame against 75 us for the same taps in numpy
    and 200 us for PIL's antialiased BILINEAR; DQN Zoo resizes bilinearly too);
  * `frame_stack=4`: the observation is the last 4 processed frames, uint8
    [84, 84, 4], oldest first;
  * `noop_max=30`: a uniform number of no-ops in [0, 30] after each reset;
  * `max_episode_frames=108_000`: episodes are truncated there (30 minutes of
    play; discount 1, the agent bootstraps) — a game over terminates them;
  * the minimal action set; losing a life does not end the episode;
  * `sticky_action_probability=0.0`: ALE's repeat_action_probability (0.25 is
    Machado et al. 2018's setting).
Rewards are returned unclipped: the actor clips them for learning
(`--reward_clip`) and reports unclipped episode returns. The same seed gives
the same observations and rewards.
"""

import collections
import functools
from typing import List, Optional, Tuple

import ale_py
from ale_py import roms
import cv2
import dm_env
from dm_env import specs
import numpy as np

from environments import Specs

FRAME_SIZE = (84, 84)  # (height, width) of a processed frame.
FRAME_STACK = 4  # Processed frames per observation.

# The 57 games of the Atari-57 benchmark (the paper's figure 7), as ALE names them.
GAMES = (
    'alien', 'amidar', 'assault', 'asterix', 'asteroids', 'atlantis', 'bank_heist', 'battle_zone', 'beam_rider',
    'berzerk', 'bowling', 'boxing', 'breakout', 'centipede', 'chopper_command', 'crazy_climber', 'defender',
    'demon_attack', 'double_dunk', 'enduro', 'fishing_derby', 'freeway', 'frostbite', 'gopher', 'gravitar', 'hero',
    'ice_hockey', 'jamesbond', 'kangaroo', 'krull', 'kung_fu_master', 'montezuma_revenge', 'ms_pacman',
    'name_this_game', 'phoenix', 'pitfall', 'pong', 'private_eye', 'qbert', 'riverraid', 'road_runner', 'robotank',
    'seaquest', 'skiing', 'solaris', 'space_invaders', 'star_gunner', 'surround', 'tennis', 'time_pilot',
    'tutankham', 'up_n_down', 'venture', 'video_pinball', 'wizard_of_wor', 'yars_revenge', 'zaxxon')


def valid_specs() -> List[str]:
  return [f'atari:{game}' for game in GAMES]


def observation_spec(size: Tuple[int, int] = FRAME_SIZE, frame_stack: int = FRAME_STACK) -> specs.BoundedArray:
  """The preprocessing's observations: `frame_stack` frames of `size`, stacked last."""
  return specs.BoundedArray((*size, frame_stack), np.uint8, 0, 255, name='observation')


def _emulator(game: str, seed: int = 0, sticky_action_probability: float = 0.0) -> ale_py.ALEInterface:
  """ALE with the game's ROM loaded (the ROM shipped with ale-py)."""
  ale = ale_py.ALEInterface()
  ale.setLoggerMode(ale_py.LoggerMode.Error)
  ale.setInt('random_seed', int(seed) % (2**31))
  ale.setFloat('repeat_action_probability', float(sticky_action_probability))
  ale.loadROM(str(roms.get_rom_path(game)))
  return ale


@functools.lru_cache(maxsize=None)
def num_actions(game: str) -> int:
  """The size of the game's minimal action set, which only ALE knows: the ROM loaded in a bare `ALEInterface`
  (0.2 s; the environment also imports OpenCV and sets up its frames), once per game and process."""
  return len(_emulator(game).getMinimalActionSet())


def resize(frame: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a uint8 [H, W] frame to `size` (height, width)."""
  return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def process_frames(last: np.ndarray, previous: Optional[np.ndarray], size: Tuple[int, int]) -> np.ndarray:
  """Max-pools two grayscale frames (or takes `last` alone), then resizes."""
  return resize(last if previous is None else np.maximum(last, previous), size)


class Atari(dm_env.Environment):

  def __init__(self, game: str, seed: int = 0, action_repeat: int = 4, pool_frames: bool = True,
               resize: Tuple[int, int] = FRAME_SIZE, frame_stack: int = FRAME_STACK, noop_max: int = 30,
               max_episode_frames: int = 108_000, sticky_action_probability: float = 0.0):
    if game not in GAMES:
      raise ValueError(f'Unknown Atari game {game!r} (--env=atari:<game>); valid names: {", ".join(GAMES)}.')
    if action_repeat < 1 or frame_stack < 1 or noop_max < 0:
      raise ValueError(f'action_repeat and frame_stack must be >= 1 and noop_max >= 0; got {action_repeat}, '
                       f'{frame_stack}, {noop_max}.')
    self._ale = _emulator(game, seed, sticky_action_probability)
    self.data_source = f'the {game} ROM shipped with ale-py ({roms.get_rom_path(game)})'  # What runs log as data.
    self._actions = self._ale.getMinimalActionSet()
    self._action_repeat = action_repeat
    self._pool_frames = pool_frames
    self._size = tuple(resize)
    self._frame_stack = frame_stack
    self._noop_max = noop_max
    self._max_episode_frames = max_episode_frames
    self._rng = np.random.default_rng(seed)
    height, width = self._ale.getScreenDims()
    self._screens = (np.empty((height, width), np.uint8), np.empty((height, width), np.uint8))
    self._frames = collections.deque(maxlen=frame_stack)
    self._episode_frames = 0
    self._needs_reset = True
    self.game = game
    self.action_repeat = action_repeat  # ALE frames per step, for whoever counts frames (probes/evaluation.py).

  def _grab(self, index: int) -> np.ndarray:
    self._ale.getScreenGrayscale(self._screens[index])
    return self._screens[index]

  def _observation(self) -> np.ndarray:
    return np.stack(self._frames, axis=-1)

  def _repeat(self, action) -> Tuple[float, bool]:
    """Plays `action` for action_repeat frames; pushes the processed frame; returns (reward, game over)."""
    reward, pooled = 0.0, []
    for i in range(self._action_repeat):
      reward += self._ale.act(action)
      self._episode_frames += 1
      if i >= self._action_repeat - 2:  # The last two frames are the ones pooled.
        pooled.append(self._grab(len(pooled)))
      if self._ale.game_over() or self._episode_frames >= self._max_episode_frames:
        break
    if not pooled:  # The episode ended before the last two frames.
      pooled.append(self._grab(0))
    previous = pooled[0] if self._pool_frames and len(pooled) == 2 else None
    self._frames.append(process_frames(pooled[-1], previous, self._size))
    return reward, self._ale.game_over()

  def reset(self) -> dm_env.TimeStep:
    self._ale.reset_game()
    self._episode_frames = 0
    for _ in range(int(self._rng.integers(self._noop_max + 1))):
      self._ale.act(ale_py.Action.NOOP)
      if self._ale.game_over():
        self._ale.reset_game()
    frame = process_frames(self._grab(0), None, self._size)
    self._frames.extend([frame] * self._frame_stack)
    self._needs_reset = False
    return dm_env.restart(self._observation())

  def step(self, action) -> dm_env.TimeStep:
    if self._needs_reset:
      return self.reset()
    reward, game_over = self._repeat(self._actions[int(action)])
    if game_over:
      self._needs_reset = True
      return dm_env.termination(reward, self._observation())
    if self._episode_frames >= self._max_episode_frames:
      self._needs_reset = True
      return dm_env.truncation(reward, self._observation())
    return dm_env.transition(reward, self._observation())

  def observation_spec(self) -> specs.BoundedArray:
    return observation_spec(self._size, self._frame_stack)

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(len(self._actions), name='action')


def _parse(spec: str, parts: List[str]) -> str:
  """The game of the spec `atari:game` (`parts`: what follows `atari:`); a ValueError naming the valid ones."""
  if len(parts) != 1 or parts[0] not in GAMES:
    raise ValueError(f'Unknown environment --env={spec}; Atari specs are atari:<game> with game one of: '
                     f'{", ".join(GAMES)}.')
  return parts[0]


def make_from_spec(spec: str, parts: List[str], seed: int = 0, **options) -> Atari:
  """`parts` = [game] of the spec `atari:game`."""
  return Atari(_parse(spec, parts), seed=seed, **options)


def specs_from_spec(spec: str, parts: List[str], resize: Tuple[int, int] = FRAME_SIZE,
                    frame_stack: int = FRAME_STACK, **options) -> Specs:
  """The specs of `make_from_spec`'s environment without its preprocessing: the stacked frames' shape, and the
  minimal action set's size from the ROM (the other options, sticky actions among them, change neither)."""
  del options
  return Specs(observation_spec(tuple(resize), frame_stack), num_actions(_parse(spec, parts)))
