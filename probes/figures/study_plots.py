"""The figures of a study (several runs), from the rows and summaries of `probes/figures/aggregate.py`."""

import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from probes.figures import aggregate
from probes.figures import plots
from probes.figures.plots import STATISTICS

Row = aggregate.Row
Panel = Tuple[str, Tuple[List[Any], List[Any], np.ndarray, np.ndarray]]  # (title, aggregate.grid(...)).


def save(fig: plt.Figure, path: str) -> str:
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def heatmaps(panels: Sequence[Panel], title: str) -> plt.Figure:
  """Figure 6: plasticity loss per architecture (rows) and intervention (columns), darker = less loss, as the
  paper shades it; each cell says its mean and standard error, a cell without runs is grey and says so (white
  would read as the most loss)."""
  fig, axes = plt.subplots(len(panels), 1, figsize=(1.3 * max(len(p[1][1]) for p in panels) + 2, 1.0 + 0.7 *
                                                   sum(len(p[1][0]) + 1 for p in panels)), squeeze=False)
  for ax, (name, (rows, columns, means, stderrs)) in zip(axes[:, 0], panels):
    finite = means[np.isfinite(means)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    colours = plt.get_cmap('Blues_r').with_extremes(bad='0.85')
    image = ax.imshow(np.ma.masked_invalid(means), cmap=colours, vmin=low, vmax=high if high > low else low + 1e-9,
                      aspect='auto')
    for (i, j), value in np.ndenumerate(means):
      if np.isfinite(value):
        text = f'{value:.3f}' + (f'\n± {stderrs[i, j]:.3f}' if np.isfinite(stderrs[i, j]) else '')
        dark = high > low and (value - low) / (high - low) < 0.5
        ax.text(j, i, text, ha='center', va='center', fontsize=7, color='white' if dark else 'black')
      else:
        ax.text(j, i, 'not run', ha='center', va='center', fontsize=7, color='0.4')
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=30, ha='right', fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=ax, label='loss of plasticity')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


def falsification(rows: Sequence[Row], pairs: Sequence[Tuple[str, str]]) -> plt.Figure:
  """Figure 3 as the paper draws it: per (statistic, factor) pair a panel of each run's value of the statistic at
  the end of training against its plasticity loss, coloured by the factor's value, each value's correlation in the
  legend."""
  fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.3), squeeze=False)
  for ax, (statistic, factor) in zip(axes[0], pairs):
    key = f'final_{statistic}'
    table = {entry[factor]: entry['correlation'] for entry in aggregate.correlations(rows, factor, [key])}
    for index, value in enumerate(table):
      points = aggregate.finite_pairs([row for row in rows if row.get(factor) == value], key, 'plasticity_loss')
      r = table[value]
      ax.scatter(points[:, 0], points[:, 1], s=16, color=f'C{index}',
                 label=f'{value} (r={r:+.2f})' if r is not None else f'{value}')
    ax.axhline(0.0, color='k', lw=0.5)
    ax.set_xlabel(STATISTICS[statistic], fontsize=8)
    ax.set_ylabel('loss of plasticity', fontsize=8)
    ax.set_title(f'varying {factor}', fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
  fig.suptitle('Falsification of explanations of plasticity: value at the end against loss of plasticity, one point '
               'per run (figure 3)', fontsize=9)
  fig.tight_layout()
  return fig


def falsification_change(rows: Sequence[Row], setting: str) -> plt.Figure:
  """Per statistic, each run's change over training against its plasticity loss, coloured by setting, with each
  setting's correlation in the legend (the companion of figure 3 on changes instead of values)."""
  keys = [key for key in STATISTICS if any(row.get(f'change_{key}') is not None for row in rows)] or list(STATISTICS)
  table = aggregate.correlations(rows, setting, [f'change_{key}' for key in keys])
  r_of = {(entry[setting], entry['statistic']): entry['correlation'] for entry in table}
  columns = 4
  count = (len(keys) + columns - 1) // columns
  fig, axes = plt.subplots(count, columns, figsize=(3.4 * columns, 3.1 * count), squeeze=False)
  names = list(dict.fromkeys(row.get(setting) for row in rows))
  for ax, key in zip(axes.flat, keys):
    for index, name in enumerate(names):
      pairs = aggregate.finite_pairs([r for r in rows if r.get(setting) == name], f"change_{key}",
                                      'plasticity_loss')
      r = r_of.get((name, f'change_{key}'))
      label = f'{name} (r={r:+.2f})' if r is not None else f'{name}'
      ax.scatter(pairs[:, 0], pairs[:, 1], s=16, color=f'C{index}', label=label)
    ax.axhline(0.0, color='k', lw=0.5)
    ax.set_xlabel(f'change in {STATISTICS[key]}', fontsize=8)
    ax.set_ylabel('loss of plasticity', fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=5)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis('off')
  fig.suptitle('Change in each statistic against loss of plasticity, one point per run', fontsize=10)
  fig.tight_layout()
  return fig


def regime(rows: Sequence[Row], alive_below: float) -> plt.Figure:
  """Each run's dead-unit fraction against its plasticity loss, one marker per optimizer, one colour per env: the
  paper's regime (units alive, plasticity lost) is the shaded corner."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  envs = list(dict.fromkeys(row['env'] for row in rows))
  optimizers = list(dict.fromkeys(row['optimizer'] for row in rows))
  for row in rows:
    if row.get('final_dead_unit_fraction') is None or row.get('plasticity_loss') is None:
      continue
    ax.scatter(row['final_dead_unit_fraction'], row['plasticity_loss'], color=f'C{envs.index(row["env"])}',
               marker='osD^vP*X'[optimizers.index(row['optimizer']) % 8], s=36)
  ax.axvspan(0.0, alive_below, ymin=0.0, ymax=1.0, color='0.9', zorder=-1)
  ax.axhline(0.0, color='k', lw=0.5)
  handles = ([plt.Line2D([], [], color=f'C{i}', marker='o', ls='', label=env) for i, env in enumerate(envs)] +
             [plt.Line2D([], [], color='k', marker='osD^vP*X'[i % 8], ls='', label=name)
              for i, name in enumerate(optimizers)])
  ax.legend(handles=handles, fontsize=7)
  ax.set_xlabel('dead unit fraction at the end')
  ax.set_ylabel('loss of plasticity at the end')
  ax.set_title(f'Optimizer regime: units alive (shaded, dead < {alive_below}) with plasticity lost?', fontsize=9)
  fig.tight_layout()
  return fig


def width(summaries: Sequence[Row]) -> plt.Figure:
  """Figure 5: plasticity loss against the width factor, one panel per target-update period, one line per
  architecture and dataset (mean and standard error over seeds)."""
  periods = sorted(dict.fromkeys(s['target_update_period'] for s in summaries))
  fig, axes = plt.subplots(1, len(periods), figsize=(4 * len(periods), 3.4), squeeze=False)
  for ax, period in zip(axes[0], periods):
    mine = [s for s in summaries if s['target_update_period'] == period]
    for index, line in enumerate(dict.fromkeys((s['arch'], s['dataset']) for s in mine)):
      points = sorted((s['width_factor'], s['plasticity_loss_mean'], s['plasticity_loss_stderr']) for s in mine
                      if (s['arch'], s['dataset']) == line and s['plasticity_loss_mean'] is not None)
      if points:
        x, y, err = zip(*points)
        ax.errorbar(x, y, yerr=[e or 0.0 for e in err], marker='o', color=f'C{index}', label=f'{line[0]} on {line[1]}')
    ax.set_yscale('symlog', linthresh=1e-2)  # The paper's log scale; losses at or below 0 stay on the axis.
    ax.axhline(0.0, color='k', lw=0.5)
    ax.set_title(f'target update period: {period}', fontsize=9)
    ax.set_xlabel('width factor (MLP: x16 units; CNN: x the paper\'s)')
    ax.legend(fontsize=7)
  axes[0, 0].set_ylabel('loss of plasticity (log scale)')
  fig.suptitle('Effect of network width on plasticity loss (figure 5)', fontsize=10)
  fig.tight_layout()
  return fig


def mean_curves(curves: Mapping[str, Sequence[Sequence[Row]]], x: str, keys: Sequence[str], title: str) -> plt.Figure:
  """Per key a panel; per name the mean over its runs (each a list of records) of the key at each `x`, with a
  band of one standard error."""
  fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
  for ax, key in zip(axes[:, 0], keys):
    for index, (name, runs) in enumerate(curves.items()):
      by_x: Dict[Any, List[Any]] = {}
      for records in runs:
        for record in records:
          by_x.setdefault(record[x], []).append(record.get(key))
      xs = sorted(by_x)
      stats = [aggregate.mean_and_stderr(by_x[value]) for value in xs]
      mean = np.array([s[0] if s[0] is not None else np.nan for s in stats])
      err = np.array([s[1] if s[1] is not None else 0.0 for s in stats])
      ax.plot(xs, mean, color=f'C{index}', label=f'{name} ({len(runs)} runs)')
      ax.fill_between(xs, mean - err, mean + err, color=f'C{index}', alpha=0.2)
    ax.set_ylabel(key.replace('_', ' '), fontsize=8)
    ax.legend(fontsize=7)
  axes[-1, 0].set_xlabel(x)
  axes[0, 0].set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def improvement_bars(table: Sequence[Row]) -> plt.Figure:
  """Figure 7: per game, layer norm's human-normalised improvement over the baseline, sorted."""
  fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * len(table) + 2), 3.6))
  values = [row['improvement'] for row in table]
  ax.bar(range(len(table)), values, color=['C2' if v > 0 else 'C3' for v in values])
  ax.set_xticks(range(len(table)), [row['game'] for row in table], rotation=60, ha='right', fontsize=7)
  ax.axhline(0.0, color='k', lw=0.5)
  ax.set_yscale('symlog', linthresh=0.1)
  ax.set_ylabel('human-normalised improvement')
  ax.set_title('Layer norm over double DQN (figure 7)', fontsize=10)
  fig.tight_layout()
  return fig


def write_comparison(run_dirs: Sequence[str], out_dir: str) -> List[str]:
  """Each run's own plots, then in `out_dir` the cross-run figure 3 of `falsification_change`: each statistic's
  change over training against the plasticity loss, one point per run (`aggregate.run_measures`)."""
  written = [path for run_dir in run_dirs for path in plots.write_report(run_dir)]
  rows = [{'run': os.path.basename(os.path.normpath(run_dir)), **aggregate.run_measures(run_dir)}
          for run_dir in run_dirs]
  if any(key.startswith('change_') for row in rows for key in row):
    written.append(save(falsification_change(rows, 'run'), os.path.join(out_dir, 'statistics_vs_plasticity.png')))
  return written
