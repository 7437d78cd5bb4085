r"""PNG plots of one run directory, or of several.

  python -m probes.report --run_dir=runs/mnist_easy
  python -m probes.report --run_dir=runs/a,runs/b,runs/c --out_dir=plots/abc

For each run (a run directory, or any directory an evaluator wrote, such as
RUN_DIR/evaluators/NAME), under RUN/plots/:
  probe_curves.png     the probe's learning curves, one per probe point,
                       coloured by learner step (the paper's figure 4);
  plasticity.png       final probe loss, target variance (baseline) and
                       plasticity = baseline - final loss over learner steps;
and, when the evaluator ran the diagnostics:
  hessian_density.png  the Hessian eigenvalue density at up to 4 points of
                       training (figure 2, top);
  covariance.png       the gradient covariance heatmaps C_k, k-means ordered,
                       at the same points (figure 2, bottom);
  statistics.png       each section-4.2 statistic and the top eigenvalue over
                       learner steps.
With several runs, OUT_DIR/statistics_vs_plasticity.png scatters each
statistic against the final probe loss (plasticity loss), one colour per run,
one point per probe point (figure 3).
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from launch.loggers import read_jsonl

PROBES_FILE = 'probes.jsonl'
PLOTS_DIR = 'plots'

Record = Dict[str, object]


def plot_probe_curves(records: Sequence[Record], title: str) -> plt.Figure:
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = [r['learner_step'] for r in records]
  cmap = plt.get_cmap('viridis')
  span = max(max(steps) - min(steps), 1)
  for record in records:
    x, y = zip(*record['curve'])
    ax.plot(x, y, color=cmap((record['learner_step'] - min(steps)) / span), lw=1.5,
            label=f'step {record["learner_step"]}')
  ax.set_yscale('log')
  ax.set_xlabel('probe optimizer step')
  ax.set_ylabel(f'mean loss over {records[0]["num_targets"]} targets')
  ax.set_title(title)
  if len(records) <= 12:
    ax.legend(title='learner step', fontsize=7, title_fontsize=8)
  else:
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(steps), max(steps)))
    fig.colorbar(mappable, ax=ax, label='learner step')
  fig.tight_layout()
  return fig


def plot_plasticity(records: Sequence[Record], title: str) -> plt.Figure:
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
  steps = [r['learner_step'] for r in records]
  top.errorbar(steps, [r['final_loss_mean'] for r in records], yerr=[r['final_loss_std'] for r in records],
               marker='o', capsize=3, label='final probe loss')
  top.plot(steps, [r['baseline'] for r in records], 'k--', label='baseline (target variance)')
  top.set_ylabel('loss')
  top.legend(fontsize=8)
  top.set_title(title)
  bottom.plot(steps, [r['plasticity'] for r in records], marker='o', color='tab:green')
  bottom.set_ylabel('plasticity\n(baseline - final loss)')
  bottom.set_xlabel('learner step')
  fig.tight_layout()
  return fig


DIAGNOSTICS_FILE = 'diagnostics.jsonl'
# Statistics shown over training and against plasticity: record key -> axis label.
STATISTICS = {
    'parameter_norm': 'parameter norm',
    'weight_rank_mean': 'mean weight rank',
    'dead_unit_fraction': 'dead unit fraction',
    'dormant_fraction': 'dormant unit fraction',
    'feature_rank': 'feature rank',
    'top_eigenvalue': 'top Hessian eigenvalue',
    'covariance_mean_offdiag': 'mean off-diagonal of C_k',
}


def _spread(records: Sequence[Record], count: int = 4) -> List[Record]:
  """Up to `count` records evenly spread over training, first and last included."""
  if len(records) <= count:
    return list(records)
  indices = sorted({round(i * (len(records) - 1) / (count - 1)) for i in range(count)})
  return [records[i] for i in indices]


def plot_hessian_density(records: Sequence[Record], title: str) -> plt.Figure:
  fig, ax = plt.subplots(figsize=(6, 4))
  cmap = plt.get_cmap('viridis')
  chosen = _spread(records)
  for i, record in enumerate(chosen):
    ax.plot(record['density_grid'], record['density'], color=cmap(i / max(len(chosen) - 1, 1)),
            label=f'step {record["learner_step"]} (top {record["top_eigenvalue"]:.3g})')
  ax.set_yscale('log')
  ax.set_ylim(1e-7, 3 * max(max(r['density']) for r in chosen))  # Outliers weigh ~1/num_params.
  ax.set_xlabel('eigenvalue')
  ax.set_ylabel('density')
  ax.set_title(f'{title}: Hessian eigenvalue density')
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_covariance(run_dir: str, records: Sequence[Record], title: str) -> Optional[plt.Figure]:
  chosen = [r for r in _spread(records) if os.path.exists(_covariance_path(run_dir, r['learner_step']))]
  if not chosen:
    return None
  fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.4), squeeze=False)
  for ax, record in zip(axes[0], chosen):
    image = ax.imshow(np.load(_covariance_path(run_dir, record['learner_step'])), cmap='RdBu_r', vmin=-1, vmax=1)
    ax.set_title(f'step {record["learner_step"]}\nmean off-diag {record["covariance_mean_offdiag"]:.2f}', fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
  fig.suptitle(f'{title}: gradient covariance C_k (k-means ordered)', fontsize=9)
  return fig


def _covariance_path(run_dir: str, step: int) -> str:
  return os.path.join(run_dir, 'diagnostics', f'covariance_{int(step):09d}.npy')


def plot_statistics(records: Sequence[Record], title: str) -> plt.Figure:
  keys = [k for k in STATISTICS if k in records[0]]
  fig, axes = plt.subplots(len(keys), 1, figsize=(6, 1.6 * len(keys)), sharex=True, squeeze=False)
  steps = [r['learner_step'] for r in records]
  for ax, key in zip(axes[:, 0], keys):
    ax.plot(steps, [r[key] for r in records], marker='o', ms=3)
    ax.set_ylabel(STATISTICS[key], fontsize=7)
  axes[-1, 0].set_xlabel('learner step')
  axes[0, 0].set_title(title)
  fig.tight_layout()
  return fig


def plot_statistics_vs_plasticity(runs: Dict[str, Tuple[List[Record], List[Record]]]) -> plt.Figure:
  """One panel per statistic: x the statistic, y the final probe loss at the same learner step."""
  keys = list(STATISTICS)
  columns = 4
  rows = (len(keys) + columns - 1) // columns
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for name, (probes, diagnostics) in runs.items():
      loss = {p['learner_step']: p['final_loss_mean'] for p in probes}
      points = [(d[key], loss[d['learner_step']]) for d in diagnostics if d['learner_step'] in loss and key in d]
      if points:
        ax.scatter(*zip(*points), s=14, label=name)
    ax.set_xlabel(STATISTICS[key], fontsize=8)
    ax.set_ylabel('final probe loss', fontsize=8)
    ax.ticklabel_format(axis='x', style='sci', scilimits=(-3, 4))
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  axes[0, 0].legend(fontsize=6)
  fig.suptitle('Statistics against plasticity loss (one point per probe point)', fontsize=10)
  fig.tight_layout()
  return fig


def _save(fig: plt.Figure, path: str) -> str:
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _read(run_dir: str, name: str) -> List[Record]:
  path = os.path.join(run_dir, name)
  return sorted(read_jsonl(path), key=lambda r: r['learner_step']) if os.path.exists(path) else []


def write_report(run_dir: str) -> List[str]:
  """Writes the plots of one run directory; returns their paths."""
  path = os.path.join(run_dir, PROBES_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} holds no {PROBES_FILE}: is it a run directory with an evaluator (--probe_every > 0)?')
  records = _read(run_dir, PROBES_FILE)
  if not records:
    raise ValueError(f'{path} holds no probe record yet.')
  plots = os.path.join(run_dir, PLOTS_DIR)
  os.makedirs(plots, exist_ok=True)
  title = os.path.basename(os.path.normpath(run_dir))
  written = [_save(plot_probe_curves(records, title), os.path.join(plots, 'probe_curves.png')),
             _save(plot_plasticity(records, title), os.path.join(plots, 'plasticity.png'))]
  diagnostics = _read(run_dir, DIAGNOSTICS_FILE)
  if diagnostics:
    written.append(_save(plot_hessian_density(diagnostics, title), os.path.join(plots, 'hessian_density.png')))
    covariance = plot_covariance(run_dir, diagnostics, title)
    if covariance is not None:
      written.append(_save(covariance, os.path.join(plots, 'covariance.png')))
    written.append(_save(plot_statistics(diagnostics, title), os.path.join(plots, 'statistics.png')))
  return written


def write_comparison(run_dirs: Sequence[str], out_dir: str) -> List[str]:
  """Each run's own plots, then the cross-run scatter of statistics against plasticity loss."""
  written = [path for run_dir in run_dirs for path in write_report(run_dir)]
  runs = {os.path.basename(os.path.normpath(d)): (_read(d, PROBES_FILE), _read(d, DIAGNOSTICS_FILE))
          for d in run_dirs}
  if any(diagnostics for _, diagnostics in runs.values()):
    os.makedirs(out_dir, exist_ok=True)
    written.append(_save(plot_statistics_vs_plasticity(runs), os.path.join(out_dir, 'statistics_vs_plasticity.png')))
  return written


def main(argv):
  del argv
  run_dirs = [d for d in (flags.FLAGS.run_dir or []) if d]
  if not run_dirs:
    raise app.UsageError('--run_dir is required: one run directory, or several separated by commas.')
  try:
    if len(run_dirs) == 1:
      paths = write_report(run_dirs[0])
    else:
      paths = write_comparison(run_dirs, flags.FLAGS.out_dir or os.path.join(run_dirs[0], PLOTS_DIR, 'comparison'))
  except ValueError as e:
    raise app.UsageError(str(e))
  for path in paths:
    print(path)


if __name__ == '__main__':
  # Defined here, not at import: launch.train imports this module and has its own --run_dir.
  flags.DEFINE_list('run_dir', None, 'Run directory (or directories, comma-separated) holding probes.jsonl.')
  flags.DEFINE_string('out_dir', None, 'Where the cross-run plots go (default: FIRST_RUN/plots/comparison).')
  app.run(main)
