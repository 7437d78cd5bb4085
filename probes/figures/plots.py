"""PNG plots of one run directory, or of several (`python -m probes.report` is the command).

For each run (a run directory, or any directory an evaluator wrote, such as
RUN_DIR/evaluators/NAME), under RUN/plots/:
  probe_curves.png     the probe's learning curves, one per probe point,
                       coloured by learner step (the paper's figure 4);
  plasticity.png       final probe loss, target variance (baseline),
                       plasticity P = baseline - final loss, and the loss of
                       plasticity P(theta_0) - P(theta_t) over learner steps;
and, when the evaluator ran the diagnostics:
  hessian_density.png  the Hessian eigenvalue density at up to 4 points of
                       training (figure 2, top);
  covariance.png       the gradient covariance heatmaps C_k, k-means ordered,
                       at the same points (figure 2, bottom): of the probe
                       loss, and of the TD loss where it was measured;
  statistics.png       each section-4.2 statistic and the top eigenvalue over
                       learner steps.
With several runs, OUT_DIR/statistics_vs_plasticity.png is figure 3: for each
statistic, one point per run, its change over training (last probe point
minus first) against the run's loss of plasticity at its last probe point.

A null (non-finite, a diverged run) value is drawn as a gap.
"""

import io
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from agents import storage
from probes.records.loggers import format_number
from probes.records.run_dir import MIGRATE_COMMAND, RunLayout

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


def _values(records: Sequence[Record], key: str) -> np.ndarray:
  """A record key over records as floats; null (non-finite) or absent values become NaN, drawn as gaps."""
  return np.array([np.nan if r.get(key) is None else r[key] for r in records], np.float64)


def plot_plasticity(records: Sequence[Record], title: str) -> plt.Figure:
  fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(6, 6.5), sharex=True)
  steps = [r['learner_step'] for r in records]
  top.errorbar(steps, _values(records, 'final_loss_mean'), yerr=_values(records, 'final_loss_std'),
               marker='o', capsize=3, label='final probe loss')
  top.plot(steps, _values(records, 'baseline'), 'k--', label='baseline (target variance)')
  top.set_ylabel('loss')
  top.legend(fontsize=8)
  top.set_title(title)
  middle.plot(steps, _values(records, 'plasticity'), marker='o', color='tab:green')
  middle.set_ylabel('plasticity P\n(baseline - final loss)')
  bottom.plot(steps, _values(records, 'plasticity_loss'), marker='o', color='tab:red')
  bottom.axhline(0.0, color='k', lw=0.5)
  bottom.set_ylabel('loss of plasticity\nP(theta_0) - P(theta_t)')
  bottom.set_xlabel('learner step')
  fig.tight_layout()
  return fig


# Statistics shown over training and against plasticity: record key -> axis label.
STATISTICS = {
    'parameter_norm': 'parameter norm',
    'weight_srank_mean': 'mean weight srank',  # The numerical rank stays at its initial value: in the records.
    'dead_unit_fraction': 'dead unit fraction',
    'dormant_fraction': 'dormant unit fraction',
    'feature_rank': 'feature rank',
    'top_eigenvalue': 'top Hessian eigenvalue',
    'covariance_mean_offdiag': 'mean off-diagonal of C_k',
    'td_covariance_mean_offdiag': 'mean off-diagonal of TD C_k',
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
  peak = 0.0
  for i, record in enumerate(chosen):
    density = np.asarray(record['density'], np.float64)  # Nulls (a diverged run) become NaN gaps.
    peak = max(peak, float(np.nanmax(density, initial=0.0)))
    ax.plot(np.asarray(record['density_grid'], np.float64), density, color=cmap(i / max(len(chosen) - 1, 1)),
            label=f'step {record["learner_step"]} (top {format_number(record.get("top_eigenvalue"), ".3g")})')
  ax.set_yscale('log')
  ax.set_ylim(1e-7, 3 * max(peak, 1e-6))  # Outliers weigh ~1/num_params.
  ax.set_xlabel('eigenvalue')
  ax.set_ylabel('density')
  ax.set_title(f'{title}: Hessian eigenvalue density')
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


COVARIANCE_KINDS = {'covariance': 'probe loss', 'td_covariance': 'TD loss'}


def plot_covariance(layout: RunLayout, records: Sequence[Record], title: str) -> Optional[plt.Figure]:
  """One row per kind of C_k saved (probe loss, TD loss), at up to 4 points of training."""
  chosen = _spread(records)
  rows = [(kind, [r for r in chosen if storage.path(layout.covariance(kind, r['learner_step'])).exists()])
          for kind in COVARIANCE_KINDS]
  rows = [(kind, found) for kind, found in rows if found]
  if not rows:
    return None
  columns = max(len(found) for _, found in rows)
  fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 3.4 * len(rows)), squeeze=False)
  for row, (kind, found) in enumerate(rows):
    for ax in axes[row, len(found):]:
      ax.axis('off')
    for ax, record in zip(axes[row], found):
      matrix = np.load(io.BytesIO(storage.path(layout.covariance(kind, record['learner_step'])).read_bytes()))
      image = ax.imshow(matrix, cmap='RdBu_r', vmin=-1, vmax=1)
      ax.set_title(f'{COVARIANCE_KINDS[kind]}, step {record["learner_step"]}\n'
                   f'mean off-diag {format_number(record.get(f"{kind}_mean_offdiag"))}', fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.colorbar(image, ax=list(axes.flat), shrink=0.8)
  fig.suptitle(f'{title}: gradient covariance C_k (k-means ordered)', fontsize=9)
  return fig


def plot_statistics(records: Sequence[Record], title: str) -> plt.Figure:
  keys = [k for k in STATISTICS if k in records[0]]
  fig, axes = plt.subplots(len(keys), 1, figsize=(6, 1.6 * len(keys)), sharex=True, squeeze=False)
  steps = [r['learner_step'] for r in records]
  for ax, key in zip(axes[:, 0], keys):
    ax.plot(steps, _values(records, key), marker='o', ms=3)
    ax.set_ylabel(STATISTICS[key], fontsize=7)
  axes[-1, 0].set_xlabel('learner step')
  axes[0, 0].set_title(title)
  fig.tight_layout()
  return fig


def run_changes(probes: Sequence[Record], diagnostics: Sequence[Record]) -> Dict[str, float]:
  """One run's point of figure 3: each statistic's change from its first to its last probe point, and the
  loss of plasticity at the last probe point (`plasticity_loss`). Empty without two diagnosed points."""
  if len(diagnostics) < 2 or not probes:
    return {}
  first, last = diagnostics[0], diagnostics[-1]
  point = {key: last[key] - first[key] for key in STATISTICS
           if first.get(key) is not None and last.get(key) is not None}
  loss = probes[-1].get('plasticity_loss')
  return {**point, 'plasticity_loss': loss} if loss is not None else {}


def _save(fig: plt.Figure, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  storage.write_atomically(path, buffer.getvalue())
  return path


def read_stream(layout: RunLayout, name: str) -> List[Record]:
  """A stream's records by learner step; a step recorded by several launches (a relaunch repeats the steps
  after its checkpoint) counts once, as the last launch recorded it."""
  records = layout.records(name)
  latest = {r['learner_step']: r for r in sorted(records, key=lambda r: r.get('attempt', 1))}
  return [latest[step] for step in sorted(latest)]


def write_report(run_dir: str) -> List[str]:
  """Writes the plots of one run directory; returns their paths."""
  layout = RunLayout(run_dir)
  records = read_stream(layout, RunLayout.PROBES)
  if not records:
    if storage.path(layout.single_file_records(RunLayout.PROBES)).exists():
      raise ValueError(f'{run_dir} holds its probe records in an earlier version\'s layout '
                       f'({layout.single_file_records(RunLayout.PROBES)}): `{MIGRATE_COMMAND} {run_dir}` rewrites it.')
    raise ValueError(f'{run_dir} holds no probe record (in {layout.stream(RunLayout.PROBES)}/): is it a run '
                     f'directory with an evaluator (--probe_every > 0), past its first probe point?')
  title = os.path.basename(os.path.normpath(run_dir))
  written = [_save(plot_probe_curves(records, title), layout.plot('probe_curves')),
             _save(plot_plasticity(records, title), layout.plot('plasticity'))]
  diagnostics = read_stream(layout, RunLayout.DIAGNOSTICS)
  if diagnostics:
    written.append(_save(plot_hessian_density(diagnostics, title), layout.plot('hessian_density')))
    covariance = plot_covariance(layout, diagnostics, title)
    if covariance is not None:
      written.append(_save(covariance, layout.plot('covariance')))
    written.append(_save(plot_statistics(diagnostics, title), layout.plot('statistics')))
  return written
