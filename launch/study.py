r"""A study: the paper's experiment as one command, a grid of runs x seeds aggregated into its figure.

  python -m launch.study --study=interventions --scale=cpu --out_dir=studies/interventions
  python -m launch.study --study=width --scale=smoke --out_dir=/tmp/w --cells=mlp-mnist-period100-x1 \
      --set=max_learner_steps=200

Each run is an ordinary run directory, DIR/runs/<cell>/seed<k>/, made by its
own command (`launch.train`, or the study's own command for the two studies
that are not RL runs), at most `--max_parallel` at once, its output in
DIR/logs/<cell>/seed<k>.log. DIR/study.json records the grid and each run's
state; a rerun of the same command skips finished runs, resumes unfinished
ones (from their checkpoints) and then aggregates: DIR/results.{csv,jsonl}
(one row per run), the study's tables (DIR/summary.{csv,jsonl}: a row per cell
with mean, standard error and seed count) and figure (DIR/<study>.png). The
studies and their scales are in launch/studies/registry.py.

`--combine=DIR,DIR,...` runs nothing: it aggregates the finished runs of
several study directories of one study and scale (say, cells run at different
seeds) into --out_dir, as one study's tables and figure, and records the
directories in --out_dir/combined_from.json.

Exit codes: 0 every run finished; 1 bad input; 2 a run failed (the others ran
and were aggregated); 130 interrupted (rerun to resume).
"""

import json
import os
import sys
from typing import Dict, List

from absl import app
from absl import flags
from rich.console import Console

from agents import config_flags
from agents import storage
from launch.studies import grid
from launch.studies.registry import STUDIES
from launch.studies import runner as study_runner
from probes.figures import aggregate

STUDY = flags.DEFINE_string('study', None, f'The study: {", ".join(STUDIES.names())}.')
SCALE = flags.DEFINE_string('scale', 'smoke', f'The scale: {", ".join(grid.SCALES)} (launch/studies/grid.py says '
                            'what each runs).')
OUT_DIR = flags.DEFINE_string('out_dir', None, 'The study directory; rerunning the same command resumes it.')
SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds per cell (default: the scale\'s, 3 at --scale=paper).',
                             lower_bound=1)
MAX_PARALLEL = flags.DEFINE_integer('max_parallel', max(1, (os.cpu_count() or 2) // 2),
                                    'Runs at once (each run is several processes); default half the cores.',
                                    lower_bound=1)
LAUNCH_TYPE = flags.DEFINE_enum('run_launch_type', None, ['local_mp', 'local_mt'],
                                'Launch type of the training runs (default: launch.train\'s); not part of the grid.')
CELLS = flags.DEFINE_list('cells', None, 'Run only these cells of the grid (default: all).')
SET = flags.DEFINE_multi_string('set', [], 'FLAG=VALUE given to every run of the grid (repeatable), e.g. '
                                '--set=max_learner_steps=500.')
GAMES = flags.DEFINE_list('games', None, 'atari_layernorm: the games (default: the scale\'s, all 57 at '
                          '--scale=paper).')
COMBINE = flags.DEFINE_list('combine', None, 'Study directories (one study and scale) whose finished runs are '
                            'aggregated together into --out_dir; runs nothing.')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'Datasets directory given to every run (see launch.train '
                               '--data_dir); CIFAR-10 cells run only where its data is found.')


# The flags that describe a grid to run: --combine reads its grids from the directories instead.
GRID_FLAGS = ('cells', 'seeds', 'set', 'games', 'data_dir', 'max_parallel', 'run_launch_type')


def write_tables(study: grid.Study, layout: grid.StudyLayout, rows: List[Dict], scale: str, console: Console) -> None:
  written = aggregate.write_table(rows, layout.table('results'))
  written += study.aggregate(layout, rows, scale)
  for path in written:
    console.print(f'  wrote {path}')


def combine(console: Console) -> None:
  given = [f'--{name}' for name in GRID_FLAGS if flags.FLAGS[name].present]
  if given:
    raise app.UsageError(f'--combine reads the grids from its directories; drop {", ".join(given)}.')
  try:
    study, scale, rows = study_runner.combine(COMBINE.value, OUT_DIR.value, console, STUDY.value,
                                              SCALE.value if flags.FLAGS['scale'].present else None)
  except ValueError as e:
    raise app.UsageError(str(e))
  console.print(f'Study {study.name} at scale {scale}: {len(rows)} finished runs of {len(COMBINE.value)} '
                f'directories into {OUT_DIR.value}.')
  if not rows:
    raise app.UsageError(f'No finished run in {", ".join(COMBINE.value)}: nothing to aggregate.')
  layout = grid.StudyLayout(OUT_DIR.value)
  os.makedirs(layout.root, exist_ok=True)
  storage.write_atomically(layout.sources, json.dumps(
      {'study': study.name, 'scale': scale, 'from': [os.path.abspath(d) for d in COMBINE.value]}, indent=1).encode())
  write_tables(study, layout, rows, scale, console)


def main(argv):
  config_flags.check_command_line(argv)
  console = Console(highlight=False)
  if COMBINE.value is not None:
    combine(console)
    return
  try:
    prepared = study_runner.prepare(STUDY.value, SCALE.value, OUT_DIR.value, SEEDS.value, CELLS.value,
                                    SET.value, GAMES.value or (), DATA_DIR.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  study, layout, runs, skipped, state = (prepared.study, prepared.layout, prepared.runs, prepared.skipped,
                                         prepared.state)
  seeds = state['grid']['seeds']
  cells = state['grid']['cells']
  console.print(f'Study {study.name} ({study.figure}) at scale {SCALE.value}: {len(cells)} cells x {seeds} seeds = '
                f'{len(runs)} runs in {layout.root}, {MAX_PARALLEL.value} at once.')
  for name, reason in skipped.items():
    console.print(f'  skipped {name}: {reason}')
  completed = study_runner.execute(layout, state, runs, MAX_PARALLEL.value, LAUNCH_TYPE.value, console)
  if not completed:
    console.print(f'Interrupted: rerun the same command to resume ({layout.state}).')
    sys.exit(130)
  rows = study_runner.collect(study, layout, state, runs, console)
  failed = [run for run in runs if state['runs'][run.key]['state'] != 'finished']
  if rows:
    write_tables(study, layout, rows, SCALE.value, console)
  else:
    console.print('No finished run to aggregate.')
  for run in failed:
    console.print(f'[red]{state["runs"][run.key]["state"]}[/red]: {run.key}; log: {run.log}')
  if failed:
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
