"""The width study (figure 5): plasticity loss against width, per target-update period."""

from typing import Dict, List, Tuple

from launch.studies.grid import (Cell, Row, Study, StudyLayout, StudyOptions, TRAIN_SCALES, data_args, dataset_names,
                                 train_flags, train_measure)
from probes.figures import aggregate
from probes.figures import study_plots

WIDTH_FACTORS = (1, 2, 4, 8, 12, 16)  # Appendix A.2: a base width of 16 times these.
TARGET_PERIODS = (1, 100, 1000)  # Figure 5's panels.
# Section 5.1 scales the CNN up from the paper's (64 channels, 256 units) "to the limit of a single GPU's memory":
# x4 (207M parameters) is the largest whose evaluator, a vmapped probe of 10 targets each with its own copy,
# gradient and Adam moments (about 40 copies of the parameters, 33 GB), fits beside the learner in the 45% of an
# 80 GB A100 each of them gets (launch/program/placement.py); x8 (829M) would need 133 GB.
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
  present, missing = dataset_names(options)
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
                  **data_args(options)}
          cells.append(Cell(name, {'arch': arch, 'dataset': dataset, 'target_update_period': period,
                                   'width_factor': factor}, args))
  return cells, skipped


def width_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('arch', 'dataset', 'target_update_period', 'width_factor'),
                                ('plasticity_loss', 'plasticity'))
  written = aggregate.write_table(summary, layout.table('summary'))
  written.append(study_plots.save(study_plots.width(summary), layout.figure('width')))
  return written


STUDY = Study('width', 'figure 5', width_cells, {'smoke': 1, 'cpu': 1, 'paper': 3}, train_flags,
                           train_measure, width_aggregate)
