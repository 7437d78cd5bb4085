"""A study's numbers: one row per run, a summary per cell, and the statistics the paper's figures draw.

Pure functions of plain records, so each is checked on hand-made rows whose
answer is known (tests/test_study.py); `launch/studies/registry.py` feeds them the rows
of real runs and `probes/figures/study_plots.py` draws them.
"""

import csv
import io
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from scipy import stats

from agents import storage
from probes.figures import plots
from probes.records.run_dir import RunLayout, load_config

Row = Dict[str, Any]


def _finite(values: Sequence[Any]) -> np.ndarray:
  numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
  return np.asarray(numbers, dtype=np.float64)


def mean_and_stderr(values: Sequence[Any]) -> Tuple[Optional[float], Optional[float], int]:
  """(mean, standard error of the mean, count) of the finite numbers among `values`.

  The standard error is the sample standard deviation (ddof 1) over sqrt(n):
  None with fewer than two values, where it is undefined.
  """
  numbers = _finite(values)
  if not len(numbers):
    return None, None, 0
  stderr = float(np.std(numbers, ddof=1) / math.sqrt(len(numbers))) if len(numbers) > 1 else None
  return float(np.mean(numbers)), stderr, len(numbers)


def summarize(rows: Sequence[Row], by: Sequence[str], measures: Sequence[str]) -> List[Row]:
  """One summary per group of rows sharing the values of `by` (a cell), in first-seen order: for each
  measure its `<measure>_mean`, `<measure>_stderr` and `<measure>_n` (the seeds that measured it)."""
  groups: Dict[Tuple, List[Row]] = {}
  for row in rows:
    groups.setdefault(tuple(row.get(key) for key in by), []).append(row)
  summaries = []
  for key, members in groups.items():
    summary: Row = dict(zip(by, key))
    summary['runs'] = len(members)
    for measure in measures:
      mean, stderr, count = mean_and_stderr([m.get(measure) for m in members])
      summary.update({f'{measure}_mean': mean, f'{measure}_stderr': stderr, f'{measure}_n': count})
    summaries.append(summary)
  return summaries


# How far apart two cells' means (or a correlation and 0) must be, in standard errors of their difference, to count
# as different.
SEPARATION_STDERRS = 2.0


def correlations(rows: Sequence[Row], setting: str, statistics: Sequence[str],
                 target: str = 'plasticity_loss') -> List[Row]:
  """Figure 3's claim in numbers: per setting and statistic, the Pearson correlation of the statistic's value
  with `target` over the setting's runs, its sign, its standard error sqrt((1 - r^2) / (n - 2)) and whether it is
  `separated` from 0 by more than `SEPARATION_STDERRS` of them (all None with fewer than 3 runs or a constant
  variable)."""
  table = []
  for name in dict.fromkeys(row.get(setting) for row in rows):
    members = [row for row in rows if row.get(setting) == name]
    for statistic in statistics:
      pairs = finite_pairs(members, statistic, target)
      r = stderr = None
      if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
        r = float(np.clip(stats.pearsonr(pairs[:, 0], pairs[:, 1])[0], -1.0, 1.0))
        stderr = math.sqrt((1.0 - r * r) / (len(pairs) - 2))
      table.append({setting: name, 'statistic': statistic, 'runs': len(pairs), 'correlation': r,
                    'sign': None if r is None else ('+' if r > 0 else '-' if r < 0 else '0'), 'stderr': stderr,
                    'separated': None if r is None else abs(r) > SEPARATION_STDERRS * stderr})
  return table


def finite_pairs(rows: Sequence[Row], x: str, y: str) -> np.ndarray:
  pairs = [(row[x], row[y]) for row in rows if len(_finite([row.get(x), row.get(y)])) == 2]
  return np.asarray(pairs, dtype=np.float64).reshape(-1, 2)


def grid(summaries: Sequence[Row], row_key: str, column_key: str, measure: str,
         rows: Optional[Sequence[Any]] = None, columns: Optional[Sequence[Any]] = None
         ) -> Tuple[List[Any], List[Any], np.ndarray, np.ndarray]:
  """A measure's summaries as a matrix (rows x columns) of means and standard errors, NaN where a cell has none:
  the heatmap of figures 6, 8 and 9."""
  rows = list(rows) if rows is not None else list(dict.fromkeys(s[row_key] for s in summaries))
  columns = list(columns) if columns is not None else list(dict.fromkeys(s[column_key] for s in summaries))
  means = np.full((len(rows), len(columns)), np.nan)
  stderrs = np.full((len(rows), len(columns)), np.nan)
  for summary in summaries:
    if summary[row_key] in rows and summary[column_key] in columns:
      index = rows.index(summary[row_key]), columns.index(summary[column_key])
      for matrix, key in ((means, f'{measure}_mean'), (stderrs, f'{measure}_stderr')):
        if summary.get(key) is not None:
          matrix[index] = summary[key]
  return rows, columns, means, stderrs


def against_baseline(summaries: Sequence[Row], row_key: str, column_key: str, baseline: Any,
                     measure: str) -> List[Row]:
  """Per row and column other than `baseline`, the measure's mean against the same row's baseline column:
  `difference` (column minus baseline), its `difference_stderr` (the two standard errors in quadrature) and
  `direction`: 'lower' or 'higher' where they differ by more than `SEPARATION_STDERRS` of it, else 'within';
  None where a cell lacks a mean or a standard error (one seed)."""
  means = {(s[row_key], s[column_key]): (s.get(f'{measure}_mean'), s.get(f'{measure}_stderr')) for s in summaries}
  table = []
  for (row, column), (mean, stderr) in means.items():
    if column == baseline:
      continue
    base_mean, base_stderr = means.get((row, baseline), (None, None))
    entry = {row_key: row, column_key: column, f'{measure}_mean': mean, f'baseline_{measure}_mean': base_mean,
             'difference': None, 'difference_stderr': None, 'direction': None}
    if None not in (mean, base_mean):
      entry['difference'] = mean - base_mean
    if entry['difference'] is not None and None not in (stderr, base_stderr):
      entry['difference_stderr'] = math.hypot(stderr, base_stderr)
      apart = abs(entry['difference']) > SEPARATION_STDERRS * entry['difference_stderr']
      entry['direction'] = ('lower' if entry['difference'] < 0 else 'higher') if apart else 'within'
    table.append(entry)
  return table


def _at_step(records: Sequence[Row], step: Optional[int]) -> Optional[Row]:
  """The record of `step` (the last record when None); None when that step was not recorded."""
  if step is None:
    return records[-1] if records else None
  return next((r for r in records if r['learner_step'] == step), None)


# The TD loss of a run is the mean of its learner records over the last tenth of its steps (one record is one
# batch of 32: too noisy alone).
TD_LOSS_WINDOW = 0.1


def run_measures(run_dir: str, at_step: Optional[int] = None) -> Row:
  """A training run's measures: `plasticity_loss` and `plasticity` at its last probe point (or at `at_step`),
  `initial_plasticity`, `probe_step` (where measured), `probe_fit_loss` (what the probe minimised: None in records
  written before the probe said so), `td_loss` (mean over the last tenth of the steps), and for figure 3's
  statistics `final_<statistic>` (at the last diagnosed point) and `change_<statistic>` (last diagnosed point minus
  first). Missing measures are absent."""
  layout = RunLayout(run_dir)
  probes = plots.read_stream(layout, RunLayout.PROBES)
  diagnostics = plots.read_stream(layout, RunLayout.DIAGNOSTICS)
  learner = plots.read_stream(layout, RunLayout.LEARNER)
  if at_step is not None:
    probes, diagnostics, learner = ([r for r in records if r['learner_step'] <= at_step]
                                    for records in (probes, diagnostics, learner))
  measures: Row = {}
  point = _at_step(probes, at_step)
  if point is not None:
    measures.update(probe_step=point['learner_step'], plasticity=point.get('plasticity'),
                    plasticity_loss=point.get('plasticity_loss'), initial_plasticity=probes[0].get('plasticity'),
                    probe_fit_loss=point.get('probe_fit_loss'))
    _warn_if_logit_probe(run_dir, point)
  if learner:
    last = learner[-1]['learner_step']
    window = [r.get('td_loss') for r in learner if r['learner_step'] >= (1 - TD_LOSS_WINDOW) * last]
    measures['td_loss'] = mean_and_stderr(window)[0]
  if diagnostics:
    measures.update({f'final_{key}': diagnostics[-1][key] for key in plots.STATISTICS
                     if diagnostics[-1].get(key) is not None})
  changes = plots.run_changes(probes, diagnostics)
  measures.update({f'change_{key}': value for key, value in changes.items() if key in plots.STATISTICS})
  return measures


def _warn_if_logit_probe(run_dir: str, point: Row) -> None:
  """A categorical run whose probe records predate `probe_fit_loss` was probed on its logits: say so."""
  if 'probe_fit_loss' in point:
    return
  try:
    output = load_config(run_dir).agent.output
  except ValueError:
    return
  if output != 'regress':
    logging.warning('%s: its probe records were written before categorical networks were probed on their values '
                    '(they lack probe_fit_loss): its plasticity fits its %s logits, not comparable with the '
                    'values of regression runs or of newer runs.', run_dir, output)


def _cell(value: Any) -> Any:
  return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def write_table(rows: Sequence[Row], stem: str) -> List[str]:
  """`<stem>.csv` and `<stem>.jsonl` of the rows (CSV columns: the union of keys in first-seen order; lists as
  JSON). Written whole, through a temporary file, so a reader never sees half a table."""
  columns = list(dict.fromkeys(key for row in rows for key in row))
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows({key: _cell(row.get(key)) for key in columns} for row in rows)
  storage.write_atomically(stem + '.csv', table.getvalue().encode())
  storage.write_atomically(stem + '.jsonl', ''.join(json.dumps(row) + '\n' for row in rows).encode())
  return [stem + '.csv', stem + '.jsonl']
