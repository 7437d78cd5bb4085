"""The paper's experiments as studies: a named grid of runs per scale, and the aggregation drawing its figure.

A study is a `Study` in the `STUDIES` registry: `cells(scale, options)` gives
its grid (each `Cell` a run's command and flags, and the axes the aggregation
groups by), `measure(cell, run_dir)` one finished run's numbers, and
`aggregate(layout, rows)` the tables and the figure. `launch/study.py` runs the
grid (`python -m launch.study`); nothing here launches anything.

Scales: `smoke` (a few hundred learner steps per cell), `cpu` (reduced but
faithful, for a few hours on 2 cores: the CNN at an eighth of its width, fewer
probe steps, fewer cells, no ResNet-18 or ViT), `paper` (the paper's settings).
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from agents import config_flags
from agents.registry import Registry
from environments import atari, atari_scores, datasets
from launch import brownian_study, instability_study, presets
from probes import aggregate, evaluation, study_plots
from probes.loggers import read_jsonl
from probes.diagnostics import DiagnosticsConfig
from probes.run_dir import ExperimentConfig, RunLayout

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

  def __init__(self, root: str):
    self.root = root

  @property
  def state(self) -> str:
    return os.path.join(self.root, self.STATE)

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


STUDIES: Registry[Study] = Registry('study', flag='--study')


def _flag_types(*config_classes, only: Sequence[str] = ()) -> Dict[str, type]:
  return {field.flag: field.kind for config_class in config_classes for field in config_flags.fields(config_class)
          if not only or field.flag in only}


def _train_flags() -> Dict[str, type]:
  return {'preset': str, **_flag_types(ExperimentConfig)}


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


def _arch_args(arch: str, scale: str) -> Dict[str, Any]:
  width = {'cnn': CNN_WIDTH, 'mlp': MLP_WIDTH}.get(arch)
  return {'arch': arch, **({'width_multiplier': width[scale]} if width else {})}


def _datasets(options: StudyOptions) -> Tuple[List[str], Dict[str, str]]:
  """The MDP observation datasets present (MNIST always is: the embedded digits), and why others are not."""
  present, missing = ['mnist'], {}
  try:
    datasets.load('cifar10', data_dir=options.data_dir)
    present.append('cifar10')
  except ValueError as e:
    missing['cifar10'] = str(e)
  return present, missing


def _data_args(options: StudyOptions) -> Dict[str, Any]:
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


# --- interventions (figure 6; with both output encodings, figures 8 and 9) ---

INTERVENTION_COLUMNS = ('none', 'layernorm', 'spectral_norm', 'weight_decay', 'shrink_and_perturb', 'reset_last_layer',
                        'reset_optimizer', 'two_hot')
# The interventions that act at the target update, which a probe step always is: probed as training left the network
# (the default, agents/learner.py) and, in columns of their own, just after they acted (--probe_after_interventions),
# so the table shows whether the moment matters.
PROBED_AFTER = ('shrink_and_perturb', 'reset_last_layer')
PROBED_AFTER_SUFFIX = '_probed_after'
PAPER_ARCHS = ('mlp', 'cnn', 'resnet18', 'vit')
INTERVENTION_ARCHS = {'smoke': ('mlp', 'cnn'), 'cpu': ('mlp', 'cnn'), 'paper': PAPER_ARCHS}
SKIPPED_ARCH_REASONS = {'resnet18': 'ResNet-18 runs at --scale=paper only', 'vit': 'ViT runs at --scale=paper only'}
# Rows of the grid under another optimizer than the MDP preset's (arch -> optimizers): under appendix A.1's Adam,
# which kills units (the optimizer_regime study), whether the interventions' effects depend on unit death; the MLP
# only, whose runs are the cheapest.
INTERVENTION_OPTIMIZERS = {'smoke': {}, 'cpu': {'mlp': ('adam',)}, 'paper': {}}
# Figure 6 is read after 100 iterations of 1,000 steps; figures 8 and 9 after 1 million steps (appendix B.1).
FIGURE6_STEP = 100_000
PAPER_LONG_STEPS = 1_000_000
# A million steps take the easy MDP's values near 1 / (1 - 0.99) = 100, the edge of the default categorical support
# [-100, 100], where the probe's targets (the mean value +- 1) would leave it (plasticity.TargetsOutsideSupport):
# the categorical cells there get bins of the same width on a support 10 wider each side.
PAPER_CATEGORICAL_SUPPORT = {'support_min': -110.0, 'support_max': 110.0, 'num_bins': 111}


def _intervention_args(intervention: str) -> Dict[str, Any]:
  return {} if intervention == 'none' else {'interventions': intervention}


def _intervention_cell(name: str, arch: str, intervention: str, output: str, probed: str, optimizer: str,
                       args: Dict[str, Any]) -> Cell:
  after = {'probe_after_interventions': True} if probed == 'after' else {}
  return Cell(name, {'arch': arch, 'intervention': intervention, 'output': output, 'probed': probed,
                     'optimizer': optimizer},
              {**args, **_intervention_args(intervention), 'output': output, **after})


def interventions_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  base = {**TRAIN_SCALES[scale], 'diagnostics': False, **_data_args(options)}
  cells = []
  archs = INTERVENTION_ARCHS[scale]
  for arch in archs:
    for optimizer in (DEFAULT_OPTIMIZER, *INTERVENTION_OPTIMIZERS[scale].get(arch, ())):
      prefix = arch if optimizer == DEFAULT_OPTIMIZER else f'{arch}-{optimizer}'
      args = {**base, **_arch_args(arch, scale), **OPTIMIZER_ARGS[optimizer]}
      if scale != 'paper':
        for column in INTERVENTION_COLUMNS:
          output = 'two_hot' if column == 'two_hot' else 'regress'
          intervention = 'none' if column == 'two_hot' else column
          cells.append(_intervention_cell(f'{prefix}-{column}', arch, intervention, output, 'before', optimizer, args))
        for intervention in PROBED_AFTER:
          cells.append(_intervention_cell(f'{prefix}-{intervention}{PROBED_AFTER_SUFFIX}', arch, intervention,
                                          'regress', 'after', optimizer, args))
        continue
      long_args = {**args, 'max_learner_steps': PAPER_LONG_STEPS}
      for output in ('regress', 'two_hot'):  # Every intervention crossed with both encodings.
        output_args = {**long_args, **(PAPER_CATEGORICAL_SUPPORT if output == 'two_hot' else {})}
        for intervention in INTERVENTION_COLUMNS[:-1]:
          cells.append(_intervention_cell(f'{prefix}-{intervention}-{output}', arch, intervention, output, 'before',
                                          optimizer, output_args))
        for intervention in PROBED_AFTER:
          cells.append(_intervention_cell(f'{prefix}-{intervention}{PROBED_AFTER_SUFFIX}-{output}', arch,
                                          intervention, output, 'after', optimizer, output_args))
  return cells, {f'{a}-*': SKIPPED_ARCH_REASONS[a] for a in PAPER_ARCHS if a not in archs}


def _column(row: Row) -> str:
  if row.get('probed') == 'after':
    return f'{row["intervention"]}{PROBED_AFTER_SUFFIX}'
  return 'two_hot' if row['output'] == 'two_hot' and row['intervention'] == 'none' else row['intervention']


def _row_label(row: Row) -> str:
  optimizer = row.get('optimizer', DEFAULT_OPTIMIZER)
  return row['arch'] if optimizer == DEFAULT_OPTIMIZER else f'{row["arch"]} ({optimizer})'


def interventions_measure(cell: Cell, run_dir: str) -> Row:
  measures = aggregate.run_measures(run_dir)
  if cell.args.get('max_learner_steps') == PAPER_LONG_STEPS:
    at = aggregate.run_measures(run_dir, at_step=FIGURE6_STEP)
    measures['plasticity_loss_at_100k'] = at.get('plasticity_loss')
  return measures


def interventions_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  for row in rows:
    row['column'], row['row'] = _column(row), _row_label(row)
  measures = ('plasticity_loss', 'plasticity', 'initial_plasticity') + (
      ('plasticity_loss_at_100k',) if scale == 'paper' else ())
  summary = aggregate.summarize(rows, ('row', 'arch', 'optimizer', 'intervention', 'output', 'probed', 'column'),
                                measures)
  written = aggregate.write_table(summary, layout.table('summary'))
  labels = list(dict.fromkeys(s['row'] for s in sorted(summary, key=lambda s: PAPER_ARCHS.index(s['arch']))))
  after_columns = tuple(f'{name}{PROBED_AFTER_SUFFIX}' for name in PROBED_AFTER)
  panels = []
  if scale == 'paper':  # Figure 6 (after 100,000 steps, regression and the two-hot column), then 8 and 9.
    figure6 = [s for s in summary if s['probed'] == 'before' and (s['output'] == 'regress' or s['column'] == 'two_hot')]
    panels.append(('plasticity loss after 100 iterations of 1,000 steps (figure 6)',
                   aggregate.grid(figure6, 'row', 'column', 'plasticity_loss_at_100k', labels, INTERVENTION_COLUMNS)))
    for output in ('regress', 'two_hot'):
      mine = [s for s in summary if s['output'] == output]
      panels.append((f'{output} output, after {PAPER_LONG_STEPS:,} steps (figures 8 and 9)',
                     aggregate.grid(mine, 'row', 'column', 'plasticity_loss', labels,
                                    INTERVENTION_COLUMNS[:-1] + after_columns)))
  else:
    steps = rows[0].get('probe_step') if rows else None
    panels.append((f'plasticity loss at the last probe point (step {steps})',
                   aggregate.grid(summary, 'row', 'column', 'plasticity_loss', labels,
                                  INTERVENTION_COLUMNS + after_columns)))
  written.append(study_plots.save(study_plots.heatmaps(panels, 'Effect of interventions on plasticity loss'),
                                  layout.figure('interventions')))
  return written


# --- falsification (figure 3) ---

DIFFICULTIES = ('easy', 'hard', 'sparse')
# Each set's runs, per setting (observation dataset x task): architectures x (optimizer, intervention) variants.
# At `paper` scale the paper's grid (section 4.2: "128 DQN agents under a range of tasks, observation spaces,
# optimizers, and seeds"): 2 architectures x 2 optimizers x 3 tasks x 2 observation spaces x 5 seeds = 120 runs, our
# nearest full grid; layer norm, ResNet-18 and ViT are a separate set, as the issue of the study asks, correlated
# apart. Below paper scale the MLP only, its three variants one set.
# Optimizers are OPTIMIZER_ARGS's (each with its own learning rate).
FALSIFICATION_SETS = {
    'smoke': {'main': (('mlp',), (('rmsprop', 'none'), ('adam', 'none')))},
    'cpu': {'main': (INTERVENTION_ARCHS['cpu'], (('rmsprop', 'none'), ('rmsprop', 'layernorm'), ('adam', 'none')))},
    'paper': {'main': (('mlp', 'cnn'), (('rmsprop', 'none'), ('adam', 'none'))),
              'extra': ((('mlp', 'cnn'), (('rmsprop', 'layernorm'),)), (('resnet18', 'vit'), (('rmsprop', 'none'),)))},
}
# Figure 3 uses a run's last probe point only (each statistic's value and `plasticity_loss` there), and the first as
# P(theta_0)'s reference: at `cpu` scale none in between, which halves a run's probing.
FALSIFICATION_ARGS = {'smoke': {}, 'cpu': {'probe_every': TRAIN_SCALES['cpu']['max_learner_steps']}, 'paper': {}}
# The factors a run varies in, each an axis of its cell; figure 3 pairs each statistic with the factor across whose
# values the paper finds its correlation's sign flip (section 4.2, figure 3).
FALSIFICATION_FACTORS = ('dataset', 'arch', 'difficulty', 'variant')
FIGURE3_PAIRS = (('parameter_norm', 'dataset'), ('weight_srank_mean', 'dataset'), ('dead_unit_fraction', 'arch'),
                 ('feature_rank', 'difficulty'))


def _set_members(definition) -> List[Tuple[str, str, str]]:
  """(arch, optimizer, intervention) of a set: one (archs, variants) pair, or several."""
  pairs = definition if isinstance(definition[0][0], tuple) else (definition,)
  return [(arch, optimizer, intervention) for archs, variants in pairs for arch in archs
          for optimizer, intervention in variants]


def falsification_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  present, missing = _datasets(options)
  cells, skipped = [], {}
  for set_name, definition in FALSIFICATION_SETS[scale].items():
    prefix = '' if set_name == 'main' else f'{set_name}-'
    for dataset in ('mnist', 'cifar10'):
      for difficulty in DIFFICULTIES:
        env = f'mdp:{dataset}:{difficulty}'
        for arch, optimizer, intervention in _set_members(definition):
          name = f'{prefix}{dataset}-{difficulty}-{arch}-{optimizer}-{intervention}'
          if dataset not in present:
            skipped[name] = missing[dataset]
            continue
          args = {**TRAIN_SCALES[scale], **FALSIFICATION_ARGS[scale], **_arch_args(arch, scale), 'env': env,
                  **OPTIMIZER_ARGS[optimizer], **_intervention_args(intervention), **_data_args(options)}
          variant = optimizer if intervention == 'none' else f'{optimizer}+{intervention}'
          cells.append(Cell(name, {'set': set_name, 'setting': f'{dataset}:{difficulty}', 'dataset': dataset,
                                   'difficulty': difficulty, 'arch': arch, 'optimizer': optimizer,
                                   'intervention': intervention, 'variant': variant}, args))
  return cells, skipped


def falsification_tables(rows: Sequence[Row]) -> Dict[str, List[Row]]:
  """Figure 3's numbers per set: `correlations` (each statistic's value at the end against plasticity loss, within
  each value of each factor; `papers_pairing` marks the paper's four), `sign_flips` (per statistic and factor:
  whether the signs differ across its values: the paper's claim) and `correlations_change` (each statistic's change
  over training, within each setting: the version before the paper's)."""
  tables: Dict[str, List[Row]] = {'correlations': [], 'sign_flips': [], 'correlations_change': []}
  statistics = list(study_plots.STATISTICS)
  for set_name in dict.fromkeys(row.get('set', 'main') for row in rows):
    members = [row for row in rows if row.get('set', 'main') == set_name]
    for statistic in statistics:
      for factor in FALSIFICATION_FACTORS:
        entries = aggregate.correlations(members, factor, [f'final_{statistic}'])
        for entry in entries:
          tables['correlations'].append({'set': set_name, 'statistic': statistic, 'factor': factor,
                                         'value': entry[factor], 'runs': entry['runs'],
                                         'correlation': entry['correlation'], 'sign': entry['sign'],
                                         'papers_pairing': (statistic, factor) in FIGURE3_PAIRS})
        signs = [entry['sign'] for entry in entries if entry['sign'] in ('+', '-')]
        tables['sign_flips'].append({'set': set_name, 'statistic': statistic, 'factor': factor,
                                     'values': len(entries), 'signs': ''.join(signs),
                                     'flips': None if len(signs) < 2 else len(set(signs)) > 1,
                                     'papers_pairing': (statistic, factor) in FIGURE3_PAIRS})
    for entry in aggregate.correlations(members, 'setting', [f'change_{key}' for key in statistics]):
      tables['correlations_change'].append({'set': set_name, **entry})
  return tables


def falsification_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  written = []
  for name, table in falsification_tables(rows).items():
    written += aggregate.write_table(table, layout.table(name))
  main = [row for row in rows if row.get('set', 'main') == 'main']
  written.append(study_plots.save(study_plots.falsification(main, FIGURE3_PAIRS), layout.figure('falsification')))
  written.append(study_plots.save(study_plots.falsification_change(main, 'setting'),
                                  layout.figure('falsification_change')))
  return written


# --- the optimizer regime of the MDP runs: dead units against plasticity loss (the abstract's claim) ---

REGIME_DIFFICULTIES = ('easy', 'hard')
# The paper's regime: units alive (a dead-unit fraction below this) with plasticity still lost.
ALIVE_BELOW = 0.1
REGIME_MEASURES = ('final_dead_unit_fraction', 'plasticity_loss', 'td_loss', 'initial_plasticity', 'plasticity')


def regime_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  cells = []
  for difficulty in REGIME_DIFFICULTIES:
    for name, args in OPTIMIZER_ARGS.items():
      cells.append(Cell(f'{difficulty}-{name}', {'env': f'mnist:{difficulty}', 'optimizer': name},
                        {**TRAIN_SCALES[scale], **FALSIFICATION_ARGS[scale], 'env': f'mdp:mnist:{difficulty}',
                         **args, **_data_args(options)}))
  return cells, {}


def regime_table(summary: Sequence[Row]) -> List[Row]:
  """Per cell: its means, and whether it is in the paper's regime: units alive (mean dead-unit fraction below
  `ALIVE_BELOW`) and plasticity lost (mean loss more than two standard errors above 0)."""
  table = []
  for s in summary:
    dead, loss, stderr = s['final_dead_unit_fraction_mean'], s['plasticity_loss_mean'], s['plasticity_loss_stderr']
    alive = None if dead is None else dead < ALIVE_BELOW
    lost = None if loss is None or stderr is None else loss - 2 * stderr > 0
    table.append({'env': s['env'], 'optimizer': s['optimizer'], 'runs': s['runs'],
                  **{key: s[key] for key in s if key.endswith(('_mean', '_stderr'))},
                  'units_alive': alive, 'plasticity_lost': lost,
                  'papers_regime': None if alive is None or lost is None else alive and lost})
  return table


def regime_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  table = regime_table(aggregate.summarize(rows, ('env', 'optimizer'), REGIME_MEASURES))
  written = aggregate.write_table(table, layout.table('summary'))
  written.append(study_plots.save(study_plots.regime(rows, ALIVE_BELOW), layout.figure('optimizer_regime')))
  return written


# --- width (figure 5) ---

WIDTH_FACTORS = (1, 2, 4, 8, 12, 16)  # Appendix A.2: a base width of 16 times these.
TARGET_PERIODS = (1, 100, 1000)  # Figure 5's panels.
# Section 5.1 scales the CNN up from the paper's (64 channels, 256 units) "to the limit of a single GPU's memory":
# x4 (207M parameters) is the largest whose evaluator, a vmapped probe of 10 targets each with its own copy,
# gradient and Adam moments (about 40 copies of the parameters, 33 GB), fits beside the learner in the 45% of an
# 80 GB A100 each of them gets (launch/placement.py); x8 (829M) would need 133 GB.
CNN_SCALE_UP = (1, 2, 4)
WIDTH_GRIDS = {  # arch -> factors per scale.
    'smoke': {'mlp': (1, 16)},
    'cpu': {'mlp': WIDTH_FACTORS},  # Wider CNNs than CNN_WIDTH['cpu']'s probe for hours on CPU.
    'paper': {'mlp': WIDTH_FACTORS, 'cnn': CNN_SCALE_UP},
}
WIDTH_PERIODS = {'smoke': (100,), 'cpu': TARGET_PERIODS, 'paper': TARGET_PERIODS}


def width_multiplier(arch: str, factor: int) -> float:
  """The MLP's hidden layers are 16 x factor units (appendix A.2; its default 512 = factor 32); the CNN's channels
  and units are factor times the paper's CNN's (64 channels, 256 units), scaled up as section 5.1 does."""
  return 16 * factor / 512 if arch == 'mlp' else float(factor)


def width_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  present, missing = _datasets(options)
  cells, skipped = [], {}
  for dataset in ('mnist', 'cifar10'):
    for arch, factors in WIDTH_GRIDS[scale].items():
      for period in WIDTH_PERIODS[scale]:
        for factor in factors:
          name = f'{arch}-{dataset}-period{period}-x{factor}'
          if dataset not in present:
            skipped[name] = missing[dataset]
            continue
          args = {**TRAIN_SCALES[scale], 'diagnostics': False, 'env': f'mdp:{dataset}:easy', 'arch': arch,
                  'width_multiplier': width_multiplier(arch, factor), 'target_update_period': period,
                  **_data_args(options)}
          cells.append(Cell(name, {'arch': arch, 'dataset': dataset, 'target_update_period': period,
                                   'width_factor': factor}, args))
  return cells, skipped


def width_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('arch', 'dataset', 'target_update_period', 'width_factor'),
                                ('plasticity_loss', 'plasticity'))
  written = aggregate.write_table(summary, layout.table('summary'))
  written.append(study_plots.save(study_plots.width(summary), layout.figure('width')))
  return written


# --- optimizer instability (figure 1) and the Brownian-motion control (figure 2): not RL runs ---

INSTABILITY_SCALES = {
    'smoke': dict(num_images=500, eval_samples=500, iterations=2, steps_per_iteration=200, eval_every=100),
    'cpu': dict(iterations=5, steps_per_iteration=2000),
    'paper': dict(iterations=5, steps_per_iteration=4000),  # Appendix A.1's.
}


def instability_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  data = _data_args(options)
  return [Cell(name, {'optimizer': name}, {**INSTABILITY_SCALES[scale], 'optimizers': name, **data},
               command='launch.optimizer_instability', dir_flag='out_dir', resumable=False)
          for name in ('adam', 'adam_tuned')], {}


def instability_measure(cell: Cell, run_dir: str) -> Row:
  """Accuracy and dead units at the end of each iteration (the last record of each), and at the end."""
  records = read_jsonl(os.path.join(run_dir, f'{instability_study.METRICS}.jsonl'))
  ends = {r['iteration']: r for r in records}
  return {'final_accuracy': records[-1]['accuracy'], 'final_dead_unit_fraction': records[-1]['dead_unit_fraction'],
          'iteration_accuracy': [ends[i]['accuracy'] for i in sorted(ends)],
          'iteration_dead_unit_fraction': [ends[i]['dead_unit_fraction'] for i in sorted(ends)]}


def instability_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('optimizer',), ('final_accuracy', 'final_dead_unit_fraction'))
  written = aggregate.write_table(summary, layout.table('summary'))
  curves = {row['optimizer']: [] for row in rows}
  for row in rows:
    curves[row['optimizer']].append(read_jsonl(os.path.join(row['run_dir'], f'{instability_study.METRICS}.jsonl')))
  written.append(study_plots.save(study_plots.mean_curves(curves, 'step', ('accuracy', 'dead_unit_fraction'),
                                                          'Optimizer instability (figure 1): mean over seeds'),
                                  layout.figure('optimizer_instability')))
  return written


BROWNIAN_SCALES = {
    'smoke': dict(steps=200, measure_every=100, num_transitions=2000, lanczos_steps=10, hessian_batch_size=256,
                  covariance_samples=64, td_covariance_samples=64),
    'cpu': dict(steps=2000, measure_every=1000),
    # Figure 2 measures "after 5 target updates" of 5,000 steps (appendix A.1): 25,000 steps.
    'paper': dict(steps=25_000, measure_every=5000),
}


def brownian_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  data = _data_args(options)
  return [Cell('brownian', {}, {**BROWNIAN_SCALES[scale], **data}, command='launch.brownian', resumable=False)], {}


def brownian_measure(cell: Cell, run_dir: str) -> Row:
  """Each process's top eigenvalue and distance from its start at the last measured step."""
  records = read_jsonl(os.path.join(run_dir, f'{brownian_study.RECORDS}.jsonl'))
  last = max(r['step'] for r in records)
  measures: Row = {'step': last}
  for r in records:
    if r['step'] == last:
      measures[f'{r["process"]}_top_eigenvalue'] = r['top_eigenvalue']
      measures[f'{r["process"]}_distance_from_init'] = r['distance_from_init']
  return measures


def brownian_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  keys = [f'{p}_{k}' for p in brownian_study.PROCESSES for k in ('top_eigenvalue', 'distance_from_init')]
  written = aggregate.write_table(aggregate.summarize(rows, ('cell',), keys), layout.table('summary'))
  curves = {process: [] for process in brownian_study.PROCESSES}
  for row in rows:
    records = read_jsonl(os.path.join(row['run_dir'], f'{brownian_study.RECORDS}.jsonl'))
    for process in curves:
      curves[process].append([r for r in records if r['process'] == process])
  written.append(study_plots.save(study_plots.mean_curves(curves, 'step', ('top_eigenvalue', 'distance_from_init'),
                                                          'Gradient descent against a random walk (figure 2)'),
                                  layout.figure('brownian')))
  return written


# --- layer norm on Atari (figure 7) ---

ATARI_GAMES = {'smoke': ('pong',), 'cpu': ('pong', 'breakout', 'boxing'), 'paper': atari.GAMES}
# No plasticity probes (figure 7 is about scores; attach an evaluator to a run for its probes). Training frames:
# (min_replay_size + learner steps x batch / samples_per_insert) x 4, as probes.evaluation.FrameSchedule counts them.
ATARI_SCALES = {
    'smoke': dict(num_actors=1, max_learner_steps=100, min_replay_size=500, replay_capacity=2_000, log_every=50,
                  checkpoint_every=100, target_update_period=100, eval_every_frames=2_000, eval_frames=500),
    # 25,000 updates after 10,000 random transitions: 440,000 frames (the paper: 200 million).
    'cpu': dict(num_actors=1, max_learner_steps=25_000, min_replay_size=10_000, eval_every_frames=100_000,
                eval_frames=25_000),
    # Appendix A.3: 200 million frames = 50 million agent steps = 12.5 million updates of the atari preset,
    # evaluated as DQN Zoo does (every million frames, 500,000 frames at epsilon 0.01).
    'paper': dict(max_learner_steps=12_500_000, eval_every_frames=1_000_000, eval_frames=500_000),
}
ATARI_VARIANTS = {'baseline': {}, 'layernorm': {'interventions': 'layernorm'}}


def atari_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  games = options.games or ATARI_GAMES[scale]
  unknown = [game for game in games if game not in atari.GAMES]
  if unknown:
    raise ValueError(f'Unknown game(s) {", ".join(unknown)} (--games); accepted: {", ".join(atari.GAMES)}.')
  return [Cell(f'{game}-{variant}', {'game': game, 'variant': variant},
               {**ATARI_SCALES[scale], 'env': f'atari:{game}', 'probe_every': 0, **args})
          for game in games for variant, args in ATARI_VARIANTS.items()], {}


def atari_measure(cell: Cell, run_dir: str) -> Row:
  """The run's score: the mean return of its last evaluation."""
  final = evaluation.final_evaluation(RunLayout(run_dir).records(RunLayout.EVALUATION))
  return {'score': final['mean_return'], 'human_normalised': final.get('human_normalised'),
          'evaluated_frames': final['frames'], 'learner_step': final['learner_step']}


def improvements(summary: Sequence[Row]) -> List[Row]:
  """Per game, layer norm's human-normalised improvement over the baseline (Wang et al. 2016), from the mean
  scores over seeds."""
  table = []
  for game in dict.fromkeys(s['game'] for s in summary):
    means = {s['variant']: s['score_mean'] for s in summary if s['game'] == game}
    if means.get('baseline') is None or means.get('layernorm') is None:
      continue
    scores = atari_scores.reference(game)
    table.append({'game': game, 'baseline': means['baseline'], 'layernorm': means['layernorm'],
                  'random': scores.random, 'human': scores.human,
                  'improvement': atari_scores.human_normalised_improvement(game, means['layernorm'],
                                                                           means['baseline'])})
  return sorted(table, key=lambda row: row['improvement'])


def atari_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('game', 'variant'), ('score', 'human_normalised'))
  table = improvements(summary)
  written = aggregate.write_table(summary, layout.table('summary')) + aggregate.write_table(
      table, layout.table('improvement'))
  if table:
    written.append(study_plots.save(study_plots.improvement_bars(table), layout.figure('atari_layernorm')))
  return written


STUDIES.add('interventions', Study('interventions', 'figure 6 (figures 8 and 9 at --scale=paper)', interventions_cells,
                                   {'smoke': 1, 'cpu': 2, 'paper': 3}, _train_flags, interventions_measure,
                                   interventions_aggregate))
STUDIES.add('falsification', Study('falsification', 'figure 3', falsification_cells, {'smoke': 1, 'cpu': 2, 'paper': 5},
                                   _train_flags, train_measure, falsification_aggregate))
STUDIES.add('width', Study('width', 'figure 5', width_cells, {'smoke': 1, 'cpu': 1, 'paper': 3}, _train_flags,
                           train_measure, width_aggregate))
STUDIES.add('optimizer_instability', Study('optimizer_instability', 'figure 1', instability_cells,
                                           {'smoke': 1, 'cpu': 3, 'paper': 3},
                                           lambda: _flag_types(instability_study.InstabilityConfig), instability_measure,
                                           instability_aggregate))
STUDIES.add('optimizer_regime', Study('optimizer_regime', 'the abstract: plasticity lost with units alive (section 3.1)',
                                      regime_cells, {'smoke': 1, 'cpu': 2, 'paper': 3}, _train_flags, train_measure,
                                      regime_aggregate))
STUDIES.add('atari_layernorm', Study('atari_layernorm', 'figure 7', atari_cells, {'smoke': 1, 'cpu': 1, 'paper': 3},
                                     _train_flags, atari_measure, atari_aggregate, takes_games=True))
STUDIES.add('brownian', Study('brownian', 'figure 2', brownian_cells, {'smoke': 1, 'cpu': 2, 'paper': 3},
                              lambda: {**_flag_types(brownian_study.StudyConfig),
                                       **_flag_types(DiagnosticsConfig, only=brownian_study.DIAGNOSTIC_FLAGS)},
                              brownian_measure, brownian_aggregate))


def grid_record(study: Study, scale: str, seeds: int, cells: Sequence[Cell], skipped: Mapping[str, str]) -> Dict:
  """What study.json records of the grid; a rerun must describe the same (`grid_differences`)."""
  return {'study': study.name, 'scale': scale, 'seeds': seeds,
          'cells': {c.name: {'command': c.command, 'axes': dict(c.axes), 'args': dict(c.args)} for c in cells},
          'skipped': dict(skipped)}


def grid_differences(old: Mapping, new: Mapping) -> List[str]:
  """How two grid records differ, in words (empty: the same grid)."""
  differences = [f'{key}: {old.get(key)!r} there, {new.get(key)!r} now' for key in ('study', 'scale', 'seeds')
                 if old.get(key) != new.get(key)]
  old_cells, new_cells = old.get('cells', {}), new.get('cells', {})
  for name in sorted(set(old_cells) - set(new_cells)):
    differences.append(f'cell {name} only there')
  for name in sorted(set(new_cells) - set(old_cells)):
    differences.append(f'cell {name} only now')
  for name in sorted(set(old_cells) & set(new_cells)):
    before, after = old_cells[name]['args'], new_cells[name]['args']
    for flag in sorted(set(before) | set(after)):
      if json.dumps(before.get(flag)) != json.dumps(after.get(flag)):
        differences.append(f'cell {name}: --{flag}={before.get(flag)} there, {after.get(flag)} now')
  return differences
