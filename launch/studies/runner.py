"""A study's machinery, flag-free: the grid the inputs describe, study.json, running the runs, collecting rows.

`python -m launch.study` (launch/study.py) is its command line; the studies
themselves are in launch/studies/registry.py.
"""

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from agents import storage
from launch.program import run_lock
from launch.studies.grid import (SCALES, Cell, Study, StudyLayout, StudyOptions, differing_flags, grid_differences,
                                 grid_record)
from launch.studies.registry import STUDIES
from probes.records.run_dir import RunLayout

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGTERM  # What a run gets when the study process dies, however it died.
STOP_GRACE_S = 90.0  # A run's own stop: final checkpoints and replay checkpoint.


class StudyError(ValueError):
  """A bad input, said before anything in the study directory is touched."""


def _parse_value(name: str, text: str, kind: type) -> Any:
  """A --set value as its flag's type, so that a grid records 300 whether given or a default."""
  try:
    if kind is bool:
      if text.lower() not in ('true', 'false', '1', '0'):
        raise ValueError('expected true or false')
      return text.lower() in ('true', '1')
    if kind is tuple:
      return tuple(part for part in text.split(',') if part)
    return kind(text)
  except ValueError as e:
    raise StudyError(f'--set={name}={text}: not a {kind.__name__} ({e}).') from e


def _parse_set(values: List[str], accepted: Dict[str, type]) -> Dict[str, Any]:
  overrides = {}
  for value in values:
    name, equals, setting = value.partition('=')
    name = name.lstrip('-')
    if not equals or not name:
      raise StudyError(f'--set={value}: expected FLAG=VALUE, e.g. --set=max_learner_steps=500.')
    if name not in accepted:
      raise StudyError(f'--set={value}: unknown flag {name!r} for this study\'s runs; accepted: '
                       f'{", ".join(sorted(accepted))}.')
    overrides[name] = _parse_value(name, setting, accepted[name])
  return overrides


def plan(study: Study, scale: str, options: StudyOptions, only: Optional[List[str]], overrides: Dict[str, str]):
  """The grid the flags describe: (cells, skipped cells with their reasons)."""
  if scale not in SCALES:
    raise StudyError(f'Unknown scale {scale!r} (--scale); accepted: {", ".join(SCALES)}.')
  cells, skipped = study.cells(scale, options)
  if only:
    names = [cell.name for cell in cells]
    unknown = [name for name in only if name not in names]
    if unknown:
      raise StudyError(f'Unknown cell(s) {", ".join(unknown)} (--cells) of --study={study.name} '
                       f'--scale={scale}; accepted: {", ".join(names)}.')
    cells = [cell for cell in cells if cell.name in only]
    skipped = {}
  return [cell.with_args(**overrides) for cell in cells], skipped


def _argument(name: str, value: Any) -> str:
  if isinstance(value, bool):
    return f'--{name}' if value else f'--no{name}'
  if isinstance(value, (list, tuple)):
    value = ','.join(str(v) for v in value)
  return f'--{name}={value}'


def command(cell: Cell, run_dir: str, seed: int, launch_type: Optional[str]) -> List[str]:
  args = [_argument(name, value) for name, value in cell.args.items()]
  if cell.command == 'launch.train' and launch_type:
    args.append(f'--launch_type={launch_type}')
  return [sys.executable, '-m', cell.command, f'--{cell.dir_flag}={run_dir}', f'--seed={seed}', *args]


def _die_with_parent() -> None:
  """In the child before exec: SIGTERM when the study's process dies (Linux's PR_SET_PDEATHSIG), so that a
  killed study leaves no run behind; a run takes SIGTERM as an interruption, with its final checkpoints. Its own
  session keeps a terminal's Ctrl-C to the study, which asks each run to stop once."""
  os.setsid()
  ctypes.CDLL('libc.so.6', use_errno=True).prctl(PR_SET_PDEATHSIG, DEATH_SIGNAL)


def _write_state(layout: StudyLayout, state: Dict) -> None:
  storage.write_atomically(layout.state, json.dumps(state, indent=1).encode())


def read_state(layout: StudyLayout) -> Optional[Dict]:
  if not os.path.exists(layout.state):
    return None
  try:
    with open(layout.state) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise StudyError(f'{layout.state} is unreadable ({e}); move it away to start the study afresh.') from e


@dataclasses.dataclass
class Run:
  key: str
  cell: Cell
  seed: int
  run_dir: str
  log: str
  process: Optional[subprocess.Popen] = None
  started: float = 0.0
  stop_asked: float = 0.0


def open_study(layout: StudyLayout, grid: Dict, runs: List[Run]) -> Dict:
  """study.json's state for this grid: the existing one, grown by the runs of the cells and seeds the grid adds
  (refused if it differs otherwise), or a new one."""
  if os.path.exists(layout.root) and not os.path.isdir(layout.root):
    raise StudyError(f'--out_dir={layout.root} is a file; give a directory.')
  state = read_state(layout)
  if state is None:
    if os.path.isdir(layout.root) and os.listdir(layout.root):
      raise StudyError(f'--out_dir={layout.root} holds files but no {StudyLayout.STATE}: not a study directory; '
                       f'choose a new or empty directory.')
    state = {'grid': grid, 'runs': {}}
  differences = grid_differences(state['grid'], grid, growing=True)
  if differences:
    raise StudyError(f'{layout.state} was made by a different grid: {"; ".join(differences)}. Rerun with the '
                     f'flags that made it (adding cells or seeds grows it), or choose another --out_dir.')
  state['grid'] = grid
  for run in runs:
    state['runs'].setdefault(run.key, {'state': 'pending', 'run_dir': run.run_dir, 'log': run.log})
  return state


def _finish_line(run: Run, entry: Dict) -> str:
  took = f'{entry["elapsed_s"]:.0f} s'
  if entry['state'] == 'finished':
    return f'[green]finished[/green] {run.key} in {took}'
  if entry['state'] == 'interrupted':
    return f'[yellow]interrupted[/yellow] {run.key} after {took}'
  return f'[red]failed[/red] {run.key} (exit {entry["exit_code"]}) after {took}; log: {run.log}'


def execute(layout: StudyLayout, state: Dict, runs: List[Run], max_parallel: int, launch_type: Optional[str],
            console: Console) -> bool:
  """Runs every unfinished run, at most `max_parallel` at once; False when interrupted."""
  interrupted = []

  def on_signal(signum, frame):
    del frame
    interrupted.append(signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  todo = [run for run in runs if state['runs'][run.key]['state'] != 'finished']
  done = len(runs) - len(todo)
  if done:
    console.print(f'{done} of {len(runs)} runs already finished; running {len(todo)}.')
  active: List[Run] = []
  waiting: Set[str] = set()
  columns = (TextColumn('[bold]{task.description}'), BarColumn(), MofNCompleteColumn(), TextColumn('runs'),
             TimeElapsedColumn(), TextColumn('remaining'), TimeRemainingColumn())
  try:
    with Progress(*columns, console=console, transient=False) as progress:
      task = progress.add_task(state['grid']['study'], total=len(runs), completed=done)
      while (todo and not interrupted) or active:
        while todo and len(active) < max_parallel and not interrupted:
          run = _next_free(todo, waiting, progress.console)
          if run is None:
            break
          todo.remove(run)
          _start(run, state, launch_type)
          active.append(run)
          _write_state(layout, state)
        time.sleep(0.5)
        for run in [r for r in active if r.process.poll() is not None]:
          active.remove(run)
          entry = _ended(run, state)
          _write_state(layout, state)
          progress.console.print(_finish_line(run, entry))
          if entry['state'] == 'finished':
            progress.advance(task)
        if interrupted and active:
          _stop(active)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  return not interrupted


def _next_free(todo: List[Run], waiting: Set[str], console: Console) -> Optional[Run]:
  """The first run to do whose directory no live launch holds (a launch of the study's process before, killed,
  may still be stopping: its runs take up to their termination notice); says once which wait, and on whom."""
  for run in todo:
    holder = run_lock.live_holder(RunLayout(run.run_dir))
    if holder is None:
      return run
    if run.key not in waiting:
      waiting.add(run.key)
      console.print(f'{run.key}: its run directory is in use ({holder.describe()}); starting it once that has '
                    f'stopped.')
  return None


def _start(run: Run, state: Dict, launch_type: Optional[str]) -> None:
  entry = state['runs'][run.key]
  if not run.cell.resumable and os.path.exists(run.run_dir):
    # Its command cannot resume: keep the interrupted attempt's files aside and start afresh.
    os.replace(run.run_dir, f'{run.run_dir}.partial-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(run.run_dir), exist_ok=True)
  os.makedirs(os.path.dirname(run.log), exist_ok=True)
  argv = command(run.cell, run.run_dir, run.seed, launch_type)
  with open(run.log, 'a') as log:
    log.write(f'\n=== {time.strftime("%Y-%m-%d %H:%M:%S")}: {" ".join(argv)}\n')
    log.flush()
    run.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=_die_with_parent)
  run.started = time.time()
  entry.update(state='running', pid=run.process.pid, attempts=entry.get('attempts', 0) + 1)


def _ended(run: Run, state: Dict) -> Dict:
  code = run.process.returncode
  entry = state['runs'][run.key]
  outcome = 'finished' if code == 0 else 'interrupted' if code in (130, -signal.SIGINT, -signal.SIGTERM) else 'failed'
  entry.update(state=outcome, exit_code=code, elapsed_s=entry.get('elapsed_s', 0.0) + time.time() - run.started)
  entry.pop('pid', None)
  return entry


def _stop(active: List[Run]) -> None:
  """Asks the runs to stop (SIGTERM: each saves its checkpoints); kills what is left after STOP_GRACE_S."""
  for run in active:
    if run.process.poll() is None and not run.stop_asked:
      run.process.send_signal(signal.SIGTERM)
      run.stop_asked = time.time()
    elif run.process.poll() is None and time.time() - run.stop_asked > STOP_GRACE_S:
      run.process.kill()


def collect(study: Study, layout: StudyLayout, state: Dict, runs: List[Run], console: Console) -> List[Dict]:
  """One row per finished run: its cell, seed, axes, directory and measures."""
  rows = []
  for run in runs:
    if state['runs'][run.key]['state'] != 'finished':
      continue
    try:
      measures = study.measure(run.cell, run.run_dir)
    except (OSError, ValueError, KeyError, IndexError) as e:
      console.print(f'[red]cannot measure[/red] {run.key}: {e!r}; log: {run.log}')
      continue
    rows.append({'cell': run.cell.name, 'seed': run.seed, **run.cell.axes, 'run_dir': run.run_dir, **measures})
  return rows


def reopen(layout: StudyLayout) -> Tuple[Study, Dict, List[Run]]:
  """A study directory as its study.json describes it (its study, state and runs), to read its results without
  the flags that made it."""
  state = read_state(layout)
  if state is None:
    raise StudyError(f'{layout.root} holds no {StudyLayout.STATE}: not a study directory.')
  cells = {name: Cell(name, spec['axes'], spec['args'], spec['command'])
           for name, spec in state['grid']['cells'].items()}
  runs = []
  for key, entry in state['runs'].items():
    name, seed = key.rsplit('/seed', 1)
    runs.append(Run(key, cells[name], int(seed), entry['run_dir'], entry['log']))
  return STUDIES.get(state['grid']['study']), state, runs


def combine(dirs: Sequence[str], out_dir: Optional[str], console: Console, study_name: Optional[str] = None,
            scale: Optional[str] = None) -> Tuple[Study, str, List[Dict]]:
  """The rows of the finished runs of several study directories of one study and scale (rows for one
  aggregation: e.g. cells run at different seeds, or grown apart); refused, naming the directories, where the
  study or scale differ (from each other, or from `study_name` and `scale` when given), a cell's flags differ, or
  one run would count twice: all before any run is read."""
  if not dirs or not out_dir:
    raise StudyError('--combine needs the study directories (comma-separated) and --out_dir for the tables.')
  out = StudyLayout(out_dir)
  if os.path.exists(out.state) or os.path.abspath(out_dir) in {os.path.abspath(d) for d in dirs}:
    raise StudyError(f'--out_dir={out_dir} is a study directory: its own tables would be overwritten; give a new '
                     f'directory for the combined tables.')
  if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (not os.listdir(out_dir)
                                                                  or os.path.exists(out.sources))):
    raise StudyError(f'--out_dir={out_dir} is a file or holds files but no {StudyLayout.SOURCES} (not an earlier '
                     f'--combine\'s tables); choose a new or empty directory.')
  opened = [(d, *reopen(StudyLayout(d))) for d in dirs]
  kinds = {(state['grid']['study'], state['grid']['scale']) for _, _, state, _ in opened}
  if len(kinds) > 1:
    raise StudyError('--combine takes the directories of one study at one scale; got ' + '; '.join(
        f'{d}: {state["grid"]["study"]} at {state["grid"]["scale"]}' for d, _, state, _ in opened))
  found_study, found_scale = next(iter(kinds))
  if study_name and study_name != found_study:
    raise StudyError(f'--study={study_name}, but the --combine directories hold {found_study} runs.')
  if scale and scale != found_scale:
    raise StudyError(f'--scale={scale}, but the --combine directories were run at {found_scale}.')
  cell_args: Dict[str, Tuple[str, Dict]] = {}
  run_dirs: Dict[str, str] = {}
  for d, _, state, runs in opened:
    for name, spec in state['grid']['cells'].items():
      first, args = cell_args.setdefault(name, (d, spec['args']))
      differing = [f'--{flag}={args.get(flag)} in {first}, {spec["args"].get(flag)} in {d}'
                   for flag in differing_flags(args, spec['args'])]
      if differing:
        raise StudyError(f'cell {name} is not one cell: {"; ".join(differing)}.')
    for run in runs:
      if state['runs'][run.key]['state'] == 'finished':
        if run.key in run_dirs:
          raise StudyError(f'run {run.key} is in both {run_dirs[run.key]} and {d}: it would count twice.')
        run_dirs[run.key] = d
  rows = []
  for d, study, state, runs in opened:
    rows += collect(study, StudyLayout(d), state, runs, console)
  return STUDIES.get(found_study), found_scale, rows


@dataclasses.dataclass
class Prepared:
  study: Study
  layout: StudyLayout
  runs: List[Run]
  skipped: Dict[str, str]
  state: Dict


def prepare(name: Optional[str], scale: str, out_dir: Optional[str], seeds: Optional[int] = None,
            cells: Optional[List[str]] = None, sets: Sequence[str] = (), games: Sequence[str] = (),
            data_dir: Optional[str] = None) -> Prepared:
  """Checks every input and opens (or creates) the study directory; a `StudyError` (a ValueError) before
  anything in it is touched."""
  if not name or not out_dir:
    raise StudyError('--study and --out_dir are required.')
  study = STUDIES.get(name)
  if games and not study.takes_games:
    raise StudyError(f'--games applies to {", ".join(n for n in STUDIES if STUDIES[n].takes_games)} '
                     f'only, not --study={study.name}.')
  overrides = _parse_set(list(sets), study.settable())
  chosen, skipped = plan(study, scale, StudyOptions(data_dir=data_dir, games=tuple(games)), cells, overrides)
  seeds = seeds or study.seeds[scale]
  layout = StudyLayout(out_dir)
  runs = [Run(f'{cell.name}/seed{seed}', cell, seed, layout.run_dir(cell.name, seed), layout.log(cell.name, seed))
          for cell in chosen for seed in range(seeds)]
  state = open_study(layout, grid_record(study, scale, seeds, chosen, skipped), runs)
  os.makedirs(layout.root, exist_ok=True)
  _write_state(layout, state)
  return Prepared(study, layout, runs, skipped, state)
