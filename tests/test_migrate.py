"""`launch.migrate`: run directories of an earlier version, rewritten in this version's layout (and refused until)."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

from agents import checkpointing, snapshots
from agents.builder import make_agent
from agents.config import AgentConfig
from agents.learner import Learner
from launch import migrate
from launch.program import graph, run_lock
from probes.records import loggers
from probes.records.run_dir import (LAUNCH_FIELDS, ExperimentConfig, LaunchConfig, RunLayout, earlier_layout,
                                    load_config, write_config)
from tests.conftest import RunsCode, random_batches, run_module

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


def _write_earlier_config(config: ExperimentConfig) -> dict:
  """config.json as an earlier version wrote it: the launch fields at the top level; the dict written."""
  raw = config.to_dict()
  raw.update(raw.pop('launch'))
  raw.pop('run_dir')
  os.makedirs(config.run_dir, exist_ok=True)
  with open(config.layout.config, 'w') as f:
    json.dump(raw, f)
  return raw


def _lines(path: str, records) -> None:
  with open(path, 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)


def test_an_earlier_config_is_refused_by_name_then_migrated_to_the_same_configuration(tmp_path):
  config = ExperimentConfig(run_dir=str(tmp_path / 'run'), seed=7, launch=LaunchConfig(num_actors=5, bind_host='::'))
  raw = _write_earlier_config(config)
  assert set(raw) >= LAUNCH_FIELDS
  with pytest.raises(ValueError, match=r'earlier version.*python -m launch\.migrate'):
    load_config(config.run_dir)
  assert earlier_layout(config.layout) == [config.layout.config]
  assert migrate.migrate_config(config.layout) == [f'config.json: {", ".join(sorted(LAUNCH_FIELDS))} moved under '
                                                   '"launch"']
  assert load_config(config.run_dir) == config and earlier_layout(config.layout) == []
  assert migrate.migrate_config(config.layout) == []  # Done: nothing to do again.


def test_single_file_streams_move_to_their_writers_files_before_what_they_wrote_since_and_only_once(tmp_path):
  layout = RunLayout(str(tmp_path))
  probes = [{'learner_step': step, 'plasticity': 0.5, 'time': 100.0 + step} for step in (0, 1000)]
  actors = [{'actor_id': i % 2, 'episode': 1 + i // 2, 'env_steps': 100 * (1 + i // 2), 'time': i} for i in range(4)]
  _lines(layout.single_file_records(RunLayout.PROBES), probes)
  _lines(layout.single_file_records(RunLayout.ACTORS), actors)
  with open(layout.single_file_records(RunLayout.ACTORS), 'a') as f:
    f.write('{"actor_id": 1, "epis')  # Torn by a kill: skipped, as readers skip it.
  assert layout.records(RunLayout.PROBES) == []  # Not read where it is.
  assert sorted(earlier_layout(layout)) == sorted([layout.single_file_records(RunLayout.ACTORS),
                                                   layout.single_file_records(RunLayout.PROBES)])
  # The run went on in the new layout for actor 0 before it was migrated.
  logger = layout.logger(RunLayout.ACTORS, graph.actor_writer(0), tensorboard=False, extra={'actor_id': 0})
  logger({'episode': 3, 'env_steps': 300})
  logger.close()
  # A migration cut short: actor 1's file was written, the single file not yet removed.
  os.makedirs(layout.stream(RunLayout.ACTORS), exist_ok=True)
  _lines(layout.records_file(RunLayout.ACTORS, graph.actor_writer(1)), actors[1::2])
  done = migrate.migrate_records(layout)
  assert done == ['actors.jsonl: 4 records to records/actors/ (actor_0, actor_1)',
                  'probes.jsonl: 2 records to records/probes/ (earlier_version)']
  assert not os.path.exists(layout.single_file_records(RunLayout.ACTORS)) and earlier_layout(layout) == []
  assert layout.records(RunLayout.PROBES) == probes
  mine = loggers.read_jsonl(layout.records_file(RunLayout.ACTORS, graph.actor_writer(0)))
  assert [r['episode'] for r in mine] == [1, 2, 3]
  assert loggers.read_jsonl(layout.records_file(RunLayout.ACTORS, graph.actor_writer(1))) == actors[1::2]
  assert [graph.actor_progress(layout, i) for i in (0, 1)] == [([3], 300), ([2], 200)]
  assert migrate.migrate_records(layout) == []


def _small_run(tmp_path, name: str) -> ExperimentConfig:
  agent = AgentConfig(width_multiplier=0.05, batch_size=4, interventions=('l2_init',), l2_init=0.1)
  return ExperimentConfig(run_dir=str(tmp_path / name), agent=agent, seed=3)


def _learner(config: ExperimentConfig) -> Learner:
  spec, num_actions = graph.environment_specs(config)
  return Learner(make_agent(config.agent, num_actions), config.agent, random_batches(4, spec.shape, num_actions),
                 np.zeros(spec.shape, spec.dtype), seed=config.seed, checkpoint_dir=config.layout.checkpoints)


def test_checkpoints_without_theta_0_get_the_runs_seeds_and_pickles_are_converted_only_when_trusted(tmp_path):
  config = _small_run(tmp_path, 'run')
  learner = _learner(config)
  theta_0 = jax.device_get(learner.state.initial_params)
  learner.run(max_steps=5)
  state = jax.device_get(learner.state)
  write_config(config)
  # Step 5 written before TrainingState had initial_params (5 fields): a msgpack map without it; step 4 pickled as a
  # plain tuple, as checkpoints were before msgpack; a snapshot pickled too.
  layout = config.layout
  os.remove(checkpointing.path_for(layout.checkpoints, 5))
  checkpointing.write(layout.checkpoints, 5, {field: getattr(state, field) for field in state._fields[:5]})
  with pytest.raises(checkpointing.CheckpointError, match=r'another shape.*python -m launch\.migrate'):
    checkpointing.load(checkpointing.path_for(layout.checkpoints, 5), state)
  pickled = checkpointing.path_for(layout.checkpoints, 4, suffix=checkpointing.PICKLED_SUFFIX)
  with open(pickled, 'wb') as f:
    pickle.dump({'step': 4, 'state': tuple(state)[:5]}, f)
  snapshot = os.path.join(layout.probe_snapshots, f'{4:09d}{checkpointing.PICKLED_SUFFIX}')
  os.makedirs(layout.probe_snapshots)
  with open(snapshot, 'wb') as f:
    pickle.dump({'step': 4, 'state': {'params': state.params, 'target_params': state.target_params}}, f)
  untrusted = migrate.migrate(config.run_dir)
  assert untrusted[0] == 'learner_000000005.msgpack: rewritten, initial_params from the run\'s seed'
  assert pickled in untrusted[-1] and snapshot in untrusted[-1] and 'not converted' in untrusted[-1]
  assert os.path.exists(pickled) and os.path.exists(snapshot)
  assert migrate.migrate(config.run_dir, trust_pickled=True) == [
      'learner_000000004.pkl: converted from a pickle, initial_params from the run\'s seed',
      f'{4:09d}.pkl: probe snapshot converted from a pickle']
  assert not os.path.exists(pickled) and not os.path.exists(snapshot)
  assert migrate.migrate(config.run_dir, trust_pickled=True) == []  # Done: nothing again.
  step, params, _ = snapshots.load(snapshots.path_for(layout.probe_snapshots, 4))
  assert step == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, state.params)
  resumed = _learner(config)
  assert resumed.step_count == 5
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.initial_params, theta_0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.params, state.params)
  _, four = checkpointing.load(checkpointing.path_for(layout.checkpoints, 4), resumed.state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, four.initial_params, theta_0)


def test_a_run_directory_in_use_is_not_migrated(tmp_path):
  config = _small_run(tmp_path, 'run')
  _write_earlier_config(config)
  lock = run_lock.RunLock(config.layout)
  lock.acquire()
  try:
    with pytest.raises(ValueError, match='is in use'):
      migrate.migrate(config.run_dir)
  finally:
    lock.release()
  assert earlier_layout(config.layout) == [config.layout.config]  # Untouched.


@pytest.mark.slow
def test_the_command_migrates_a_studys_runs_and_launch_train_refuses_them_until_then(tmp_path):
  study = tmp_path / 'study'
  runs = [_small_run(study / 'runs' / cell, 'seed0') for cell in ('mlp-none', 'mlp-layer_norm')]
  for config in runs:
    _write_earlier_config(config)
  _lines(runs[0].layout.single_file_records(RunLayout.LEARNER), [{'learner_step': 100, 'time': 1.0}])
  planted = checkpointing.path_for(runs[1].layout.checkpoints, 9, suffix=checkpointing.PICKLED_SUFFIX)
  marker = str(tmp_path / 'code_ran')
  os.makedirs(os.path.dirname(planted))
  with open(planted, 'wb') as f:
    pickle.dump({'step': 9, 'state': RunsCode(marker)}, f)
  refused = run_module('launch.train', f'--run_dir={runs[0].run_dir}', '--width_multiplier=0.05', '--batch_size=4',
                       '--interventions=l2_init', '--l2_init=0.1', '--seed=3', timeout=120)
  assert refused.returncode == 1 and f'python -m launch.migrate {runs[0].run_dir}' in refused.stderr, refused.stderr
  result = run_module('launch.migrate', str(study), timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{runs[0].run_dir}: config.json:' in result.stdout and 'learner.jsonl: 1 records' in result.stdout
  assert 'not converted, pickled' in result.stdout and planted in result.stdout and not os.path.exists(marker)
  for config in runs:
    assert load_config(config.run_dir) == config and earlier_layout(config.layout) == []
  assert RunLayout(runs[0].run_dir).records(RunLayout.LEARNER) == [{'learner_step': 100, 'time': 1.0}]
  again = run_module('launch.migrate', str(study), timeout=120)
  assert again.returncode == 0 and again.stdout.count('already in this version\'s layout') == 1, again.stdout
  missing = run_module('launch.migrate', str(tmp_path / 'nothing'), timeout=60)
  assert missing.returncode == 1 and f'Not a directory: {tmp_path / "nothing"}' in missing.stderr
