"""The interventions study (figure 6; with both output encodings, figures 8 and 9): architecture x intervention."""

from typing import Any, Dict, List, Optional, Tuple

from launch.studies.grid import (Cell, Row, Study, StudyLayout, StudyOptions, DEFAULT_OPTIMIZER, OPTIMIZER_ARGS,
                                 TRAIN_SCALES, arch_args, data_args, train_flags)
from probes.figures import aggregate
from probes.figures import study_plots

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
# The paper's claim for each column against no intervention (appendix B.1, after 1M steps; section 5.2 says the
# same of layer norm and the two-hot output at figure 6's 100,000): a lower plasticity loss, or not a lower one.
# It states none for spectral norm.
PAPER_CLAIMS = {'layernorm': 'lower', 'two_hot': 'lower', 'reset_last_layer': 'lower',
                'shrink_and_perturb': 'not lower', 'weight_decay': 'not lower', 'reset_optimizer': 'not lower'}


def intervention_args(intervention: str) -> Dict[str, Any]:
  return {} if intervention == 'none' else {'interventions': intervention}


def _intervention_cell(name: str, arch: str, intervention: str, output: str, probed: str, optimizer: str,
                       args: Dict[str, Any]) -> Cell:
  after = {'probe_after_interventions': True} if probed == 'after' else {}
  return Cell(name, {'arch': arch, 'intervention': intervention, 'output': output, 'probed': probed,
                     'optimizer': optimizer},
              {**args, **intervention_args(intervention), 'output': output, **after})


def interventions_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  base = {**TRAIN_SCALES[scale], 'diagnostics': False, **data_args(options)}
  cells = []
  archs = INTERVENTION_ARCHS[scale]
  for arch in archs:
    for optimizer in (DEFAULT_OPTIMIZER, *INTERVENTION_OPTIMIZERS[scale].get(arch, ())):
      prefix = arch if optimizer == DEFAULT_OPTIMIZER else f'{arch}-{optimizer}'
      args = {**base, **arch_args(arch, scale), **OPTIMIZER_ARGS[optimizer]}
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


def verdict(claim: Optional[str], direction: Optional[str], floor: Optional[bool] = None) -> Optional[str]:
  """Whether a column's `direction` against no intervention (`aggregate.against_baseline`) agrees with the paper's
  `claim`: a claimed reduction needs a lower loss beyond two standard errors ('unclear' within them); a claimed
  absence of one is contradicted only by such a reduction. A column at the `floor` (its P(theta_0) below what the
  row's none lost: it had less to lose) shows nothing by losing less: 'unclear'."""
  if claim is None or direction is None:
    return None
  if floor and direction == 'lower':
    return 'unclear'
  if claim == 'lower':
    return {'lower': 'agrees', 'higher': 'disagrees', 'within': 'unclear'}[direction]
  return 'disagrees' if direction == 'lower' else 'agrees'


def against_paper(summary: List[Row]) -> List[Row]:
  """Each column of figure 6's table (the regression cells and the two-hot column) against the same row's
  `none`, with the paper's claim and whether the difference agrees with it."""
  figure6 = [s for s in summary if s['output'] == 'regress' or s['column'] == 'two_hot']
  initial = {(s['row'], s['column']): s.get('initial_plasticity_mean') for s in figure6}
  table = aggregate.against_baseline(figure6, 'row', 'column', 'none', 'plasticity_loss')
  for entry in table:
    claim = PAPER_CLAIMS.get(entry['column'].removesuffix(PROBED_AFTER_SUFFIX))
    start, lost = initial.get((entry['row'], entry['column'])), entry['baseline_plasticity_loss_mean']
    floor = None if None in (start, lost) else start < lost
    entry.update(initial_plasticity_mean=start, floor=floor, paper_claim=claim,
                 verdict=verdict(claim, entry['direction'], floor))
  return table


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
  written += aggregate.write_table(against_paper(summary), layout.table('against_paper'))
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


STUDY = Study('interventions', 'figure 6 (figures 8 and 9 at --scale=paper)', interventions_cells,
                                   {'smoke': 1, 'cpu': 2, 'paper': 3}, train_flags, interventions_measure,
                                   interventions_aggregate)
