"""What a study is made of: its cells, its directory's layout, the settings every training run of a scale shares."""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from agents import config_flags
from environments import datasets
from launch import presets
from probes.figures import aggregate
from probes.records.run_dir import ExperimentConfig

SCALES = ('smoke', 'cpu', 'paper')
Row = aggregate.Row


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """What a grid may depend on besides its scale."""
  data_dir: Optional[str] = None
  games: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cell:
  """One configuration of a study's grid, run once per seed."""
  name: str
  axes: Mapping[str, Any]  # What the aggregation groups by (arch, intervention, env, ...).
  args: Mapping[str, Any]  # The command's flags, beside the run's directory and seed.
  command: str = 'launch.train'  # The module run as `python -m`.
  dir_flag: str = 'run_dir'
  resumable: bool = True  # A rerun resumes it (launch.train); else a rerun starts it afresh.

  def with_args(self, **args) -> 'Cell':
    return dataclasses.replace(self, args={**self.args, **args})


class StudyLayout:
  """Every file of a study directory, named once (see WORKSPACE.md)."""

  STATE = 'study.json'
  SOURCES = 'combined_from.json'  # Written instead of study.json by `launch.study --combine`.

  def __init__(self, root: str):
    self.root = root

  @property
  def state(self) -> str:
    return os.path.join(self.root, self.STATE)

  @property
  def sources(self) -> str:
    return os.path.join(self.root, self.SOURCES)

  def run_dir(self, cell: str, seed: int) -> str:
    return os.path.join(self.root, 'runs', cell, f'seed{seed}')

  def log(self, cell: str, seed: int) -> str:
    return os.path.join(self.root, 'logs', cell, f'seed{seed}.log')

  def table(self, name: str) -> str:
    """A table's stem: `<name>.csv` and `<name>.jsonl` (results: one row per run; summary: one per cell)."""
    return os.path.join(self.root, name)

  def figure(self, name: str) -> str:
    return os.path.join(self.root, f'{name}.png')


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  figure: str  # The paper's figure it reproduces.
  cells: Callable[[str, StudyOptions], Tuple[List[Cell], Dict[str, str]]]  # (cells, skipped cell -> reason).
  seeds: Mapping[str, int]  # Default seeds per scale.
  settable: Callable[[], Dict[str, type]]  # Flags `--set` may change in every cell, with their types.
  measure: Callable[[Cell, str], Row]
  aggregate: Callable[[StudyLayout, List[Row], str], List[str]]  # (layout, rows, scale) -> written paths.
  takes_games: bool = False  # Whether --games chooses its cells.



def flag_types(*config_classes, only: Sequence[str] = ()) -> Dict[str, type]:
  return {field.flag: field.kind for config_class in config_classes for field in config_flags.fields(config_class)
          if not only or field.flag in only}


def train_flags() -> Dict[str, type]:
  return {'preset': str, **flag_types(ExperimentConfig)}


# Settings of every training run at each scale (flag -> value); a study's cells add their own.
TRAIN_SCALES: Dict[str, Dict[str, Any]] = {
    # A few hundred learner steps, tiny probes and diagnostics: the whole pipeline in a minute per run.
    'smoke': dict(num_actors=1, max_learner_steps=300, min_replay_size=200, log_every=50, checkpoint_every=150,
                  target_update_period=100, probe_every=150, probe_steps=100, probe_inputs=256, probe_batch_size=64,
                  hessian_batch_size=128, lanczos_steps=10, covariance_samples=32, td_covariance_samples=32),
    # 10 iterations of 1,000 steps (the paper: 100), probes every 2,500 of 1,000 steps (the paper: 5,000 of 2,000),
    # smaller Hessian batch, Lanczos and C_k.
    'cpu': dict(num_actors=1, max_learner_steps=10_000, probe_every=2_500, probe_steps=1_000, hessian_batch_size=512,
                lanczos_steps=30, covariance_samples=128, td_covariance_samples=128),
    # The paper's: 100 iterations of 1,000 steps, probes every 5,000 of 2,000 steps (the field defaults).
    'paper': dict(max_learner_steps=100_000),
}
# CNN widths per scale. At `cpu` an eighth (8 channels, 32 units: width factor 2 of the width study): a probe step of
# its 10 targets takes about 0.5 s on one core, XLA:CPU running narrow convolutions far below its matmul rate.
CNN_WIDTH = {'smoke': 0.25, 'cpu': 0.125, 'paper': 1.0}
MLP_WIDTH = {'smoke': 0.25, 'cpu': 1.0, 'paper': 1.0}


def arch_args(arch: str, scale: str) -> Dict[str, Any]:
  width = {'cnn': CNN_WIDTH, 'mlp': MLP_WIDTH}.get(arch)
  return {'arch': arch, **({'width_multiplier': width[scale]} if width else {})}


def dataset_names(options: StudyOptions) -> Tuple[List[str], Dict[str, str]]:
  """The MDP observation datasets present (MNIST always is: the embedded digits), and why others are not."""
  present, missing = ['mnist'], {}
  try:
    datasets.load('cifar10', data_dir=options.data_dir)
    present.append('cifar10')
  except ValueError as e:
    missing['cifar10'] = str(e)
  return present, missing


def data_args(options: StudyOptions) -> Dict[str, Any]:
  """`--data_dir` for the runs of a study over MNIST or CIFAR-10 observations, when the study was given one."""
  return {'data_dir': options.data_dir} if options.data_dir else {}


def train_measure(cell: Cell, run_dir: str) -> Row:
  return aggregate.run_measures(run_dir)


# Optimizers as the works they come from run them: name -> flags (the preset and its learning rate). The paper finds
# plasticity lost "in the absence of saturated units"; section 3.1 shows appendix A.1's Adam killing units.
OPTIMIZER_ARGS = {
    'adam': {'optimizer': 'adam', 'learning_rate': 1e-3},  # Appendix A.1's (the mdp_adam preset's).
    'adam_tuned': {'optimizer': 'adam_tuned', 'learning_rate': 1e-3},  # Section 3.1's robust Adam.
    'adam_rainbow': {'optimizer': 'adam_rainbow', 'learning_rate': 6.25e-5},  # Hessel et al. 2018.
    # Rainbow's epsilon alone, at the paper's learning rate: whether a larger eps keeps units alive while the probe
    # (which uses the agent's optimizer, section 2.2) still fits as fast as appendix A.1's Adam.
    'adam_rainbow_eps': {'optimizer': 'adam_rainbow', 'learning_rate': 1e-3},
    'rmsprop': {'optimizer': 'rmsprop', 'learning_rate': 2.5e-4},  # DQN Zoo's double DQN (the mdp preset's).
}
DEFAULT_OPTIMIZER = presets.MDP_OPTIMIZER['optimizer']
assert OPTIMIZER_ARGS[DEFAULT_OPTIMIZER] == presets.MDP_OPTIMIZER


def grid_record(study: Study, scale: str, seeds: int, cells: Sequence[Cell], skipped: Mapping[str, str]) -> Dict:
  """What study.json records of the grid; a rerun must describe the same, or grow it (`grid_differences`)."""
  return {'study': study.name, 'scale': scale, 'seeds': seeds,
          'cells': {c.name: {'command': c.command, 'axes': dict(c.axes), 'args': dict(c.args)} for c in cells},
          'skipped': dict(skipped)}


def grid_differences(old: Mapping, new: Mapping, growing: bool = False) -> List[str]:
  """How two grid records differ, in words (empty: the same grid). `growing`: only what growing the old one (more
  seeds, more cells, the cells it has unchanged) does not explain."""
  differences = [f'{key}: {old.get(key)!r} there, {new.get(key)!r} now' for key in ('study', 'scale', 'seeds')
                 if old.get(key) != new.get(key)
                 and not (growing and key == 'seeds' and (new.get(key) or 0) > (old.get(key) or 0))]
  old_cells, new_cells = old.get('cells', {}), new.get('cells', {})
  for name in sorted(set(old_cells) - set(new_cells)):
    differences.append(f'cell {name} only there')
  if not growing:
    for name in sorted(set(new_cells) - set(old_cells)):
      differences.append(f'cell {name} only now')
  for name in sorted(set(old_cells) & set(new_cells)):
    before, after = old_cells[name]['args'], new_cells[name]['args']
    for flag in differing_flags(before, after):
      differences.append(f'cell {name}: --{flag}={before.get(flag)} there, {after.get(flag)} now')
  return differences


def differing_flags(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[str]:
  """The flags two cells' args set to different values (or one sets and the other not)."""
  return [flag for flag in sorted(set(before) | set(after))
          if json.dumps(before.get(flag)) != json.dumps(after.get(flag))]
