r"""Rewrites run directories of an earlier version in this version's layout, so that nothing else reads old layouts.

  python -m launch.migrate runs/mnist_easy [more run or study directories]
  python -m launch.migrate --trust_pickled_checkpoints runs/old

Each directory given, and every run directory below it (one holding
config.json: a study's runs), is rewritten in place:
- config.json with its launch fields at the top level: they move under
  `launch` (`probes.records.run_dir.LaunchConfig`).
- single-file record streams `<stream>.jsonl`: an actor's records move to its
  own file in `records/actors/`, every other stream's to
  `records/<stream>/earlier_version.jsonl`, before what the writer wrote since.
- checkpoints of a training state without `initial_params` (written before
  l2_init): theta_0 is filled in from the run's seed, which is what initialised
  the run.
- pickled checkpoints and probe snapshots (`.pkl`): converted only with
  --trust_pickled_checkpoints, since a pickle runs any code it names; without
  it they are named and left.

Every file is written whole (`storage.write_atomically`) before the file it
replaces is removed, and each step skips what is already done, so a migration
cut short is finished by running it again. A run directory in use (its
launcher's lock held) is refused.
"""

import json
import os
import pickle
import sys
from typing import Any, Dict, List

from absl import app
from absl import flags
from flax import serialization
import jax
import numpy as np

from agents import checkpointing, snapshots, storage
from agents.builder import make_agent
from agents.learner import initial_state
from launch.program import graph
from launch.program import run_lock
from probes.records.run_dir import LAUNCH_FIELDS, ExperimentConfig, RunLayout, load_config

TRUST_PICKLED = flags.DEFINE_bool(
    'trust_pickled_checkpoints', False, 'Read the pickled checkpoints and probe snapshots (an earlier version\'s '
    'format) and convert them. A pickle runs any code it names: only if everyone who could write them is trusted.')
EARLIER_WRITER = 'earlier_version'  # The writer file of a stream's records from its single file (not an actor's).


def run_directories(path: str) -> List[str]:
  """`path` if it is a run directory, else every run directory below it (a study's), by name."""
  if storage.path(RunLayout(path).config).exists():
    return [path]
  found = []
  for root, directories, files in os.walk(path):
    if 'config.json' in files:
      found.append(root)
      directories.clear()  # Nothing of interest below a run directory.
    directories.sort()
  return found


def migrate_config(layout: RunLayout) -> List[str]:
  """Moves config.json's launch fields under `launch`; what it did."""
  raw = json.loads(storage.path(layout.config).read_text())
  moved = sorted(set(raw) & LAUNCH_FIELDS)
  if not moved:
    return []
  raw['launch'] = {**{name: raw.pop(name) for name in moved}, **raw.get('launch', {})}
  storage.write_atomically(layout.config, json.dumps(raw, indent=2).encode())
  return [f'config.json: {", ".join(moved)} moved under "launch"']


def _writer(stream: str, line: str) -> str:
  if stream == RunLayout.ACTORS:
    return graph.actor_writer(json.loads(line)['actor_id'])
  return EARLIER_WRITER


def migrate_records(layout: RunLayout) -> List[str]:
  """Moves each single-file stream's records into writer files, before what those writers wrote since."""
  done = []
  for stream in RunLayout.STREAMS:
    single = layout.single_file_records(stream)
    if not storage.path(single).exists():
      continue
    by_writer: Dict[str, List[str]] = {}
    for line in storage.path(single).read_text().splitlines():
      try:
        by_writer.setdefault(_writer(stream, line), []).append(line)
      except (ValueError, KeyError, TypeError):  # A torn line (a crash mid-write), as readers skip it.
        continue
    for writer, lines in by_writer.items():
      path = layout.records_file(stream, writer)
      since = storage.path(path).read_text().splitlines() if storage.path(path).exists() else []
      moved = set(lines)  # A migration cut short left some here already: not twice.
      text = '\n'.join(lines + [line for line in since if line not in moved]) + '\n'
      storage.path(layout.stream(stream)).mkdir(parents=True, exist_ok=True)
      storage.write_atomically(path, text.encode())
    storage.path(single).unlink()
    done.append(f'{os.path.basename(single)}: {sum(map(len, by_writer.values()))} records to '
                f'{os.path.relpath(layout.stream(stream), layout.root)}/ ({", ".join(sorted(by_writer))})')
  return done


def _unpickle(path: str) -> Any:
  """(step, state dict) of a pickled checkpoint or snapshot. Runs whatever the pickle names: trusted files only."""
  try:
    payload = pickle.loads(storage.path(path).read_bytes())
    return int(payload['step']), payload['state']
  except Exception as e:  # pylint: disable=broad-except  Unpickling raises anything a damaged file makes it.
    raise checkpointing.Damaged(f'{path} is not a readable pickled checkpoint ({type(e).__name__}: {e}).') from e


def _state_dict(state: Any, fields: List[str]) -> Dict[str, Any]:
  """A checkpoint's state as a dict by field name (an earlier version pickled the training state as a plain tuple)."""
  if isinstance(state, (tuple, list)) and not hasattr(state, '_fields'):
    state = dict(zip(fields, state))
  return serialization.to_state_dict(jax.tree_util.tree_map(np.asarray, state))


def migrate_checkpoints(config: ExperimentConfig, trust_pickled: bool) -> List[str]:
  """Rewrites the learner's checkpoints of an earlier version (fewer fields; pickled, if trusted) and the pickled
  probe snapshots (if trusted) in this version's format, each read back before the file it replaces goes."""
  layout = config.layout
  observation_spec, num_actions = graph.environment_specs(config)
  fresh = initial_state(make_agent(config.agent, num_actions), config.seed,
                        np.zeros(observation_spec.shape, observation_spec.dtype))
  defaults = serialization.to_state_dict(jax.device_get(fresh))
  done, left = [], []
  for step, name in checkpointing.numbered(layout.checkpoints) + checkpointing.numbered(
      layout.checkpoints, suffix=checkpointing.PICKLED_SUFFIX):
    path = os.path.join(layout.checkpoints, name)
    pickled = name.endswith(checkpointing.PICKLED_SUFFIX)
    if pickled and not trust_pickled:
      left.append(path)
      continue
    if pickled:
      state = _state_dict(_unpickle(path)[1], list(defaults))
    else:
      state = checkpointing.decode(storage.path(path).read_bytes(), path)[1]
    missing = [field for field in defaults if field not in state]
    if not pickled and not missing:
      continue
    written = checkpointing.write(layout.checkpoints, step, {**{f: defaults[f] for f in missing}, **state})
    checkpointing.load(written, fresh)  # As the learner will read it.
    if pickled:
      storage.path(path).unlink()
    done.append(f'{name}: {"converted from a pickle" if pickled else "rewritten"}'
                + (f', {", ".join(missing)} from the run\'s seed' if missing else ''))
  for path in snapshots.pickled(layout.probe_snapshots):
    if not trust_pickled:
      left.append(path)
      continue
    step, state = _unpickle(path)
    snapshots.load(snapshots.save(layout.probe_snapshots, step, state['params'], state['target_params']))
    storage.path(path).unlink()
    done.append(f'{os.path.basename(path)}: probe snapshot converted from a pickle')
  if left:
    done.append(f'not converted, pickled (a pickle runs any code it names; --trust_pickled_checkpoints if everyone '
                f'who could write them is trusted, else remove them): {", ".join(left)}')
  return done


def migrate(run_dir: str, trust_pickled: bool = False) -> List[str]:
  """Rewrites one run directory in this version's layout; what it did (empty: it already was)."""
  layout = RunLayout(run_dir)
  lock = run_lock.RunLock(layout)
  try:
    lock.acquire()
  except run_lock.Held as e:
    raise ValueError(f'{run_dir} is in use: {e}') from e
  try:
    done = migrate_config(layout) + migrate_records(layout)
    return done + migrate_checkpoints(load_config(run_dir), trust_pickled)
  finally:
    lock.release()


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Give the run (or study) directories to migrate.')
  missing = [path for path in argv[1:] if not storage.path(path).is_dir()]
  if missing:
    raise app.UsageError(f'Not a directory: {", ".join(missing)}.')
  runs = [run for path in argv[1:] for run in run_directories(path)]
  if not runs:
    raise app.UsageError(f'No run directory (one holding config.json) in {", ".join(argv[1:])}.')
  failed = 0
  for run_dir in runs:
    try:
      done = migrate(run_dir, TRUST_PICKLED.value)
    except (ValueError, OSError) as e:
      failed += 1
      print(f'{run_dir}: not migrated: {e}', file=sys.stderr, flush=True)
      continue
    print(f'{run_dir}: ' + ('; '.join(done) if done else 'already in this version\'s layout'), flush=True)
  if failed:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
