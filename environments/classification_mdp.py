"""The classification MDPs of section 4.1: `mdp:<dataset>:<variant>`.

Ten latent states s and ten actions a. Each step emits an image "of" state s
and the agent is rewarded for naming it:
  * easy: state s emits images of class s; r = 1[a == s]; s' ~ U{0..9}.
  * hard: every image gets one fixed random label (drawn with `label_seed`,
    independent of the environment's seed, so all actors and every resume see
    the same labelling); state s emits the images labelled s; dynamics as easy.
  * sparse: observations as easy; r = 1[a == s == 9]; s' = s + 1 when a == s,
    else s' ~ U{0..9}. The paper is silent on what follows state 9: here a
    correct action in state 9 (the rewarded one) wraps to state 0, so the chain
    0 -> 1 -> ... -> 9 can be walked again and reward stays reachable.
The MDPs never terminate (the paper is silent on episodes): every
`episode_length` steps (100 by default) an episode is truncated with discount
1, so learning bootstraps through it, and a new one starts in a uniformly
random state. Episode returns are thus "correct answers per 100 steps" (easy,
hard) and "completed chains per 100 steps" (sparse).
"""

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import dm_env
from dm_env import specs
import numpy as np

from environments import Specs, datasets

NUM_STATES = 10


@dataclasses.dataclass(frozen=True)
class Variant:
  relabel: bool  # Emit images by a fixed random labelling instead of their class.
  reward: Callable[[int, int], float]  # (s, a) -> r
  next_state: Callable[[int, int, np.random.Generator], int]  # (s, a, rng) -> s'


def _uniform_next_state(state: int, action: int, rng: np.random.Generator) -> int:
  del state, action
  return int(rng.integers(NUM_STATES))


def _sparse_next_state(state: int, action: int, rng: np.random.Generator) -> int:
  if action == state:
    return (state + 1) % NUM_STATES
  return int(rng.integers(NUM_STATES))


VARIANTS: Dict[str, Variant] = {
    'easy': Variant(relabel=False, reward=lambda s, a: float(a == s), next_state=_uniform_next_state),
    'hard': Variant(relabel=True, reward=lambda s, a: float(a == s), next_state=_uniform_next_state),
    'sparse': Variant(relabel=False, reward=lambda s, a: float(a == s == NUM_STATES - 1),
                      next_state=_sparse_next_state),
}


def valid_specs() -> List[str]:
  return [f'mdp:{name}:{variant}' for name in sorted(datasets.SOURCES) for variant in VARIANTS]


def observation_spec(image_shape: Sequence[int]) -> specs.BoundedArray:
  """An MDP's observations: its dataset's images, [H, W, C] uint8."""
  return specs.BoundedArray(tuple(image_shape), np.uint8, 0, 255, name='observation')


def action_spec() -> specs.DiscreteArray:
  """An action names a latent state, whatever the dataset."""
  return specs.DiscreteArray(NUM_STATES, name='action')


class ClassificationMDP(dm_env.Environment):

  def __init__(self, images: np.ndarray, labels: np.ndarray, variant: Variant, seed: int = 0,
               episode_length: int = 100, label_seed: int = 0, data_source: str = ''):
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f'images must be uint8 [N, H, W, C]; got {images.dtype} {images.shape}.')
    if episode_length < 1:
      raise ValueError(f'episode_length must be at least 1; got {episode_length}.')
    self._images = images
    self._variant = variant
    self._episode_length = episode_length
    self.data_source = data_source
    emitted_by = labels
    if variant.relabel:
      emitted_by = np.random.default_rng(label_seed).integers(NUM_STATES, size=len(labels))
    self.emission_labels = np.asarray(emitted_by, dtype=np.int64)
    self._pools = [np.flatnonzero(self.emission_labels == s) for s in range(NUM_STATES)]
    empty = [s for s, pool in enumerate(self._pools) if len(pool) == 0]
    if empty:
      raise ValueError(f'No image is emitted by state(s) {empty}: the dataset lacks those labels.')
    self._rng = np.random.default_rng(seed)
    self._state: Optional[int] = None
    self._steps = 0
    self.last_image_index = -1

  @property
  def latent_state(self) -> Optional[int]:
    return self._state

  def _observe(self) -> np.ndarray:
    pool = self._pools[self._state]
    self.last_image_index = int(pool[self._rng.integers(len(pool))])
    return self._images[self.last_image_index]

  def reset(self) -> dm_env.TimeStep:
    self._state = int(self._rng.integers(NUM_STATES))
    self._steps = 0
    return dm_env.restart(self._observe())

  def step(self, action) -> dm_env.TimeStep:
    if self._state is None:
      return self.reset()
    action = int(action)
    if not 0 <= action < NUM_STATES:
      raise ValueError(f'action must be in [0, {NUM_STATES}); got {action}.')
    reward = self._variant.reward(self._state, action)
    self._state = self._variant.next_state(self._state, action, self._rng)
    self._steps += 1
    observation = self._observe()
    if self._steps >= self._episode_length:
      timestep = dm_env.truncation(reward, observation)
      self._state = None  # The next step() starts a new episode.
      return timestep
    return dm_env.transition(reward, observation)

  def observation_spec(self) -> specs.BoundedArray:
    return observation_spec(self._images.shape[1:])

  def action_spec(self) -> specs.DiscreteArray:
    return action_spec()


def make(dataset: str, variant: str, seed: int = 0, data_dir: Optional[str] = None,
         download: Optional[bool] = None, episode_length: int = 100, label_seed: int = 0) -> ClassificationMDP:
  data = datasets.load(dataset, data_dir=data_dir, download=download)
  return ClassificationMDP(data.images, data.labels, VARIANTS[variant], seed=seed, episode_length=episode_length,
                           label_seed=label_seed, data_source=data.source)


def _parse(spec: str, parts: List[str]) -> Tuple[str, str]:
  """(dataset, variant) of the spec `mdp:dataset:variant` (`parts`: what follows `mdp:`); a ValueError naming the
  valid specs."""
  if len(parts) != 2 or parts[0] not in datasets.SOURCES or parts[1] not in VARIANTS:
    raise ValueError(f'Unknown environment --env={spec}; the classification MDPs are mdp:<dataset>:<variant> '
                     f'with dataset in {{{", ".join(sorted(datasets.SOURCES))}}} and variant in '
                     f'{{{", ".join(VARIANTS)}}}; valid specs: {", ".join(valid_specs())}.')
  return parts[0], parts[1]


def make_from_spec(spec: str, parts: List[str], seed: int = 0, **options) -> ClassificationMDP:
  """`parts` = [dataset, variant] of the spec `mdp:dataset:variant`."""
  return make(*_parse(spec, parts), seed=seed, **options)


def specs_from_spec(spec: str, parts: List[str], **options) -> Specs:
  """The specs of `make_from_spec`'s MDP from its dataset's declared image shape: no data is read, so where the
  data comes from (`data_dir`, the other options) changes nothing."""
  del options
  dataset, _ = _parse(spec, parts)
  return Specs(observation_spec(datasets.SOURCES[dataset].image_shape), action_spec().num_values)
