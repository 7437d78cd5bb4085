"""The optimizer regime of the MDP runs: dead units against plasticity loss (the abstract's claim)."""

from typing import Dict, List, Sequence, Tuple

from launch.studies.grid import (Cell, Row, Study, StudyLayout, StudyOptions, OPTIMIZER_ARGS, TRAIN_SCALES, data_args,
                                 train_flags, train_measure)
from launch.studies.falsification import FALSIFICATION_ARGS
from probes.figures import aggregate
from probes.figures import study_plots

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
                         **args, **data_args(options)}))
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


STUDY = Study('optimizer_regime', 'the abstract: plasticity lost with units alive (section 3.1)',
                                      regime_cells, {'smoke': 1, 'cpu': 2, 'paper': 3}, train_flags, train_measure,
                                      regime_aggregate)
