"""The falsification study (figure 3): each statistic against plasticity loss across the factors runs vary in."""

from typing import Dict, List, Optional, Sequence, Tuple

from launch.studies.grid import (Cell, Row, Study, StudyLayout, StudyOptions, OPTIMIZER_ARGS, TRAIN_SCALES, arch_args,
                                 data_args, dataset_names, train_flags, train_measure)
from launch.studies.interventions import INTERVENTION_ARCHS, intervention_args
from probes.figures import aggregate
from probes.figures import study_plots

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
  present, missing = dataset_names(options)
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
          args = {**TRAIN_SCALES[scale], **FALSIFICATION_ARGS[scale], **arch_args(arch, scale), 'env': env,
                  **OPTIMIZER_ARGS[optimizer], **intervention_args(intervention), **data_args(options)}
          variant = optimizer if intervention == 'none' else f'{optimizer}+{intervention}'
          cells.append(Cell(name, {'set': set_name, 'setting': f'{dataset}:{difficulty}', 'dataset': dataset,
                                   'difficulty': difficulty, 'arch': arch, 'optimizer': optimizer,
                                   'intervention': intervention, 'variant': variant}, args))
  return cells, skipped


def flip_verdict(entries: Sequence[Row]) -> Optional[str]:
  """The paper's claim for a statistic and its factor (figure 3): its correlation with plasticity loss changes sign
  across the factor's values. 'agrees' where two values' correlations are each `separated` from 0 and of opposite
  signs; 'disagrees' where every value's is separated and all of one sign; else 'unclear'; None with fewer than
  two values correlated (no flip can be seen)."""
  correlated = [entry for entry in entries if entry['correlation'] is not None]
  if len(correlated) < 2:
    return None
  separated = {entry['sign'] for entry in correlated if entry['separated']} - {'0'}
  if len(separated) > 1:
    return 'agrees'
  return 'disagrees' if len(separated) == 1 and all(entry['separated'] for entry in correlated) else 'unclear'


def falsification_tables(rows: Sequence[Row]) -> Dict[str, List[Row]]:
  """Figure 3's numbers per set: `correlations` (each statistic's value at the end against plasticity loss, within
  each value of each factor; `papers_pairing` marks the paper's four), `sign_flips` (per statistic and factor:
  whether the signs differ across its values, and for the paper's four its claim's `verdict`) and
  `correlations_change` (each statistic's change over training, within each setting: the version before the
  paper's)."""
  tables: Dict[str, List[Row]] = {'correlations': [], 'sign_flips': [], 'correlations_change': []}
  statistics = list(study_plots.STATISTICS)
  for set_name in dict.fromkeys(row.get('set', 'main') for row in rows):
    members = [row for row in rows if row.get('set', 'main') == set_name]
    for statistic in statistics:
      for factor in FALSIFICATION_FACTORS:
        entries = aggregate.correlations(members, factor, [f'final_{statistic}'])
        papers = (statistic, factor) in FIGURE3_PAIRS
        for entry in entries:
          tables['correlations'].append({'set': set_name, 'statistic': statistic, 'factor': factor,
                                         'value': entry[factor], 'runs': entry['runs'],
                                         'correlation': entry['correlation'], 'sign': entry['sign'],
                                         'stderr': entry['stderr'], 'separated': entry['separated'],
                                         'papers_pairing': papers})
        signs = [entry['sign'] for entry in entries if entry['sign'] in ('+', '-')]
        separated = [entry['sign'] for entry in entries if entry['separated'] and entry['sign'] in ('+', '-')]
        tables['sign_flips'].append({'set': set_name, 'statistic': statistic, 'factor': factor,
                                     'values': len(entries), 'signs': ''.join(signs),
                                     'flips': None if len(signs) < 2 else len(set(signs)) > 1,
                                     'separated_signs': ''.join(separated), 'papers_pairing': papers,
                                     'verdict': flip_verdict(entries) if papers else None})
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


STUDY = Study('falsification', 'figure 3', falsification_cells, {'smoke': 1, 'cpu': 2, 'paper': 5},
                                   train_flags, train_measure, falsification_aggregate)
