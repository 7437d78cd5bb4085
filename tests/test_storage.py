"""The run directory's storage: a record file per writer, their merge, the old layout, and gs:// through epath."""

import errno
import json
import logging
import os
import stat
import tempfile
import time

import numpy as np
import pytest

from agents import checkpointing, snapshots, storage
from probes.records import loggers
from probes.figures import plots
from probes.measures import probe_set as probe_sets
from probes.records.run_dir import ExperimentConfig, RunLayout, load_config, write_or_check_config
from tests.conftest import partials, tmpfs, wait_for


def _write_lines(path: str, records) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.writelines(json.dumps(record) + '\n' for record in records)


def test_records_merge_the_writers_files_by_time_keeping_each_writers_order(tmp_path):
  layout = RunLayout(str(tmp_path))
  # actor_1's clock stepped back between its records 12 and 13: its own order is kept all the same.
  _write_lines(layout.records_file('actors', 'actor_0'), [{'id': 'a', 'time': 10.0}, {'id': 'b', 'time': 20.0},
                                                          {'id': 'c', 'time': 30.0}])
  _write_lines(layout.records_file('actors', 'actor_1'), [{'id': 'x', 'time': 15.0}, {'id': 'y', 'time': 25.0},
                                                          {'id': 'z', 'time': 5.0}])
  # A segmented writer (numbered objects, as on a bucket), segment 1 holding its later records.
  stem = layout.records_file('actors', 'actor_2')[:-len('.jsonl')]
  _write_lines(f'{stem}.000001.jsonl', [{'id': 'q', 'time': 35.0}])
  _write_lines(f'{stem}.000000.jsonl', [{'id': 'p', 'time': 20.0}])
  # A truncated last line (a crash mid-write) is skipped; a foreign file is not a record file.
  with open(layout.records_file('actors', 'actor_0'), 'a') as f:
    f.write('{"id": "broken", "ti')
  with open(os.path.join(layout.stream('actors'), 'notes.txt'), 'w') as f:
    f.write('not records')
  merged = layout.records('actors')
  # Ties (b and p at 20) go to the writer whose name sorts first.
  assert [r['id'] for r in merged] == ['a', 'x', 'b', 'p', 'y', 'z', 'c', 'q']
  assert merged[0] == {'id': 'a', 'time': 10.0}
  assert loggers.read_jsonl(layout.records_file('actors', 'actor_2')) == [{'id': 'p', 'time': 20.0},
                                                                          {'id': 'q', 'time': 35.0}]
  assert layout.records('learner') == []  # A stream nobody has written yet.


def test_an_old_single_file_directory_is_named_for_migration_then_read_and_resumed_in_the_new_layout(tmp_path):
  from launch import migrate  # pylint: disable=import-outside-toplevel
  layout = RunLayout(str(tmp_path))
  old = [{'learner_step': step, 'attempt': 1, 'plasticity': 0.5 - step / 1e4, 'probe_steps': 10, 'num_targets': 2,
          'final_loss_mean': 0.1, 'final_loss_std': 0.0, 'baseline': 0.6, 'curve': [[0, 0.5], [5, 0.2]],
          'time': 100.0 + step} for step in (0, 1000)]
  _write_lines(os.path.join(str(tmp_path), 'probes.jsonl'), old)  # As written before a file per writer.
  assert layout.single_file_records('probes') == os.path.join(str(tmp_path), 'probes.jsonl')
  with pytest.raises(ValueError, match=rf'earlier version.*`python -m launch\.migrate {tmp_path}`'):
    plots.write_report(str(tmp_path))
  migrate.migrate_records(layout)
  assert layout.records('probes') == old
  assert [os.path.basename(p) for p in plots.write_report(str(tmp_path))] == ['probe_curves.png', 'plasticity.png']
  # A resumed run writes the new layout; readers see the old records, then the new.
  logger = layout.logger('probes', 'evaluator', tensorboard=False, extra={'attempt': 2})
  logger({'learner_step': 2000, 'plasticity': 0.2})
  logger.close()
  assert os.path.exists(os.path.join(str(tmp_path), 'records', 'probes', 'evaluator.jsonl'))
  assert [(r['learner_step'], r['attempt']) for r in layout.records('probes')] == [(0, 1), (1000, 1), (2000, 2)]


def test_the_segment_writer_never_appends_rolls_over_and_a_relaunch_never_overwrites(tmp_path, monkeypatch):
  path = RunLayout(str(tmp_path)).records_file('learner', 'learner')

  real_os_open, real_open = os.open, open

  def os_open(file, flags, *args, **kwargs):
    assert not flags & os.O_APPEND, f'{file} opened to append'
    return real_os_open(file, flags, *args, **kwargs)

  def builtin_open(file, mode='r', *args, **kwargs):
    assert 'a' not in mode, f'{file} opened to append'
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(os, 'open', os_open)
  monkeypatch.setattr('builtins.open', builtin_open)
  logger = loggers.JsonlLogger(path, append=False, flush_seconds=3600.0, segment_bytes=120)
  for step in range(5):
    logger({'learner_step': step})  # ~45 bytes a line: two lines per 120-byte segment.
  logger.close()
  assert not os.path.exists(path)
  stem = path[:-len('.jsonl')]
  assert loggers.segments(path) == [0, 1, 2]
  for index, steps in ((0, [0, 1]), (1, [2, 3]), (2, [4])):
    assert [r['learner_step'] for r in loggers.read_jsonl(f'{stem}.{index:06d}.jsonl')] == steps
  # The node relaunched: it writes segments past the ones there, and the stream holds both launches.
  again = loggers.JsonlLogger(path, append=False, flush_seconds=3600.0, segment_bytes=120)
  again({'learner_step': 5})
  again.close()
  assert loggers.segments(path) == [0, 1, 2, 3]
  assert [r['learner_step'] for r in RunLayout(str(tmp_path)).records('learner')] == [0, 1, 2, 3, 4, 5]


def test_the_segment_writer_publishes_before_close_and_keeps_records_a_failed_write_missed(tmp_path, monkeypatch):
  path = str(tmp_path / 'probes' / 'evaluator.jsonl')
  real_write = storage.write_atomically
  failures = []

  def fails_once(location, data):
    if not failures:
      failures.append(location)
      raise OSError('503 Service Unavailable')
    real_write(location, data)

  monkeypatch.setattr(storage, 'write_atomically', fails_once)
  logger = loggers.JsonlLogger(path, append=False, flush_seconds=0.01)
  logger({'learner_step': 0})
  wait_for(lambda: len(loggers.read_jsonl(path)) == 1)  # Written by the flusher, retried after the failure.
  assert failures
  logger({'learner_step': 100})
  wait_for(lambda: len(loggers.read_jsonl(path)) == 2)
  logger.close()
  assert [r['learner_step'] for r in loggers.read_jsonl(path)] == [0, 100]


def test_bad_writer_names_and_appending_to_a_bucket_are_refused(tmp_path):
  with pytest.raises(ValueError, match="letters, digits, _ and -, not 'actor.0'"):
    RunLayout(str(tmp_path)).records_file('actors', 'actor.0')
  with pytest.raises(ValueError, match='cannot be appended to'):
    loggers.JsonlLogger('gs://bucket/run/records/learner/learner.jsonl', append=True)


def test_a_run_directory_on_a_bucket_goes_through_epath(bucket, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))  # Where the node logs' private directory is made.
  layout = RunLayout('gs://bucket/run')
  assert not storage.is_local(layout.root) and storage.is_local('/tmp/run')
  # Two nodes write their own objects (no append); every reader gets the merged stream.
  for actor_id in (0, 1):
    logger = layout.logger('actors', f'actor_{actor_id}', tensorboard=False, extra={'actor_id': actor_id},
                           flush_seconds=3600.0)
    logger({'episode': 0})
    logger({'episode': 1})
    logger.close()
  assert sorted(key for key in bucket.store if '/records/' in key) == [
      'gs://bucket/run/records/actors/actor_0.000000.jsonl', 'gs://bucket/run/records/actors/actor_1.000000.jsonl']
  assert sorted((r['actor_id'], r['episode']) for r in layout.records('actors')) == [(0, 0), (0, 1), (1, 0), (1, 1)]
  # config.json, checkpoints, the probe set (first writer wins), a covariance matrix.
  config = ExperimentConfig(run_dir=layout.root, max_learner_steps=10)
  assert write_or_check_config(config) is False and write_or_check_config(config) is True
  assert load_config(layout.root).max_learner_steps == 10
  for step in (100, 200, 300, 400):
    checkpointing.save(layout.checkpoints, step, {'w': np.full(3, step, np.float32)})
  path, (step, state), problems = checkpointing.latest_loadable(layout.checkpoints)
  assert (path, step, problems) == (checkpointing.path_for(layout.checkpoints, 400), 400, [])
  np.testing.assert_array_equal(state['w'], [400.0, 400.0, 400.0])
  assert len(list(storage.path(layout.checkpoints).iterdir())) == 3  # The oldest removed.
  # The learner's probe snapshots: written whole, listed by step, read back, removed once probed.
  for step in (150, 0):
    snapshots.save(layout.probe_snapshots, step, {'w': np.full(2, step, np.float32)}, {'w': np.zeros(2, np.float32)})
  assert snapshots.saved(layout.probe_snapshots) == [(0, snapshots.path_for(layout.probe_snapshots, 0)),
                                                     (150, snapshots.path_for(layout.probe_snapshots, 150))]
  step, params, target_params = snapshots.load(snapshots.path_for(layout.probe_snapshots, 150))
  assert step == 150 and params['w'].tolist() == [150.0, 150.0] and target_params['w'].tolist() == [0.0, 0.0]
  for _ in range(2):  # Removing one already gone is no error.
    snapshots.remove(snapshots.path_for(layout.probe_snapshots, 0))
  assert [step for step, _ in snapshots.saved(layout.probe_snapshots)] == [150]
  first = probe_sets.ProbeSet(np.zeros((2, 3), np.float32), np.array([1, 2], np.uint32), None, 7)
  second = probe_sets.ProbeSet(np.ones((2, 3), np.float32), np.array([3, 4], np.uint32), None, 9)
  assert probe_sets.save(layout.probe_set, first).learner_step == 7
  assert probe_sets.save(layout.probe_set, second).learner_step == 7  # The first writer's set stays.
  assert storage.write_if_absent(layout.probe_set, b'x') is False
  storage.write_atomically(layout.evaluator_status, b'{"state": "idle"}')
  storage.write_atomically(layout.evaluator_status, b'{"state": "finished"}')
  assert json.loads(storage.path(layout.evaluator_status).read_text()) == {'state': 'finished'}
  # Launches are counted on the bucket; Launchpad's logs (local files) go to this host's temporary directory.
  for attempt in (1, 2):
    storage.path(layout.attempt_logs(attempt)).mkdir(parents=True, exist_ok=True)
  assert layout.attempts() == 2
  assert layout.local_logs(2) == os.path.join(tempfile.gettempdir(), f'plasticity-rl-logs-{os.getuid()}',
                                              'gs/bucket/run/logs/2')
  assert RunLayout('/runs/a').local_logs(2) == '/runs/a/logs/2'


def test_a_torn_line_is_ended_before_the_next_record_and_readers_warn_about_it(tmp_path, monkeypatch, caplog):
  path = RunLayout(str(tmp_path)).records_file('probes', 'evaluator')
  os.makedirs(os.path.dirname(path))
  with open(path, 'w') as f:
    f.write('{"learner_step": 0, "plasticity": 0.5, "ti')  # A kill -9 mid-write, before a resume.
  logger = loggers.JsonlLogger(path)
  logger({'learner_step': 0, 'plasticity': 0.25})
  # A write that fails part-way (the disk full): the next record starts a line of its own all the same.
  real_write, calls = os.write, []

  def half_then_full(fd, data):
    calls.append(len(data))
    if len(calls) == 1:
      real_write(fd, bytes(data[:len(data) // 2]))
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_write(fd, data)

  monkeypatch.setattr(os, 'write', half_then_full)
  with pytest.raises(storage.WriteError, match=f'No space left on device: .{path}'):
    logger({'learner_step': 100, 'plasticity': 0.125})
  logger({'learner_step': 200, 'plasticity': 0.0625})
  logger.close()
  with caplog.at_level(logging.WARNING):
    assert [r['learner_step'] for r in loggers.read_jsonl(path)] == [0, 200]
    loggers.read_jsonl(path)
  warnings = [r.getMessage() for r in caplog.records if 'not a whole record' in r.getMessage()]
  assert warnings == [f'{path}: line 1 is not a whole record (a write cut short: a kill or a full disk); skipped.',
                      f'{path}: line 3 is not a whole record (a write cut short: a kill or a full disk); skipped.']


def test_a_write_that_finds_the_disk_full_names_the_file_and_leaves_the_old_content_and_nothing_else(tmp_path):
  with tmpfs(str(tmp_path / 'disk'), '1m') as disk:
    checkpoint = os.path.join(disk, 'run', 'checkpoints', 'learner_000000100.msgpack')
    storage.write_atomically(checkpoint, b'a' * 300_000)
    with open(os.path.join(disk, 'filler'), 'wb') as f:  # Leaves about 100 KB.
      f.write(b'x' * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - 100_000))
    with pytest.raises(storage.WriteError) as error:
      storage.write_atomically(checkpoint, b'b' * 400_000)
    assert storage.is_full(error.value) and checkpoint in str(error.value)
    with pytest.raises(storage.WriteError, match='No space left on device'):
      storage.write_if_absent(os.path.join(disk, 'run', 'probe_set.npz'), b'c' * 400_000)
    with open(checkpoint, 'rb') as f:
      assert f.read() == b'a' * 300_000  # The last good one, intact.
    assert not partials(disk) and not os.path.exists(os.path.join(disk, 'run', 'probe_set.npz'))


def test_renames_are_made_durable_and_temporaries_of_unfinished_writes_are_swept(tmp_path, monkeypatch):
  synced, real_fsync = [], os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.fstat(fd).st_mode), real_fsync(fd)))
  storage.write_atomically(str(tmp_path / 'run' / 'config.json'), b'{}')
  storage.write_if_absent(str(tmp_path / 'run' / 'probe_set.npz'), b'set')
  assert [stat.S_ISDIR(mode) for mode in synced] == [False, True, False, True]  # The file, then its directory.
  # A writer killed mid-write leaves its temporary file; the next launch removes those older than itself, ours only.
  old = tmp_path / 'run' / 'checkpoints' / '.learner_000000100.msgpack.partial-abcd1234'
  new = tmp_path / 'run' / 'records' / '.config.json.partial-x1y2z3w4'
  foreign = tmp_path / 'run' / '.learner.msgpack.partial-mine'
  for path in (old, new, foreign):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'partial')
  launched = time.time()
  os.utime(old, (launched - 3600, launched - 3600))
  os.utime(foreign, (launched - 3600, launched - 3600))
  assert storage.sweep_temporaries(str(tmp_path / 'run'), before=launched - 1) == [str(old)]
  assert not old.exists() and new.exists() and foreign.exists()
  assert storage.sweep_temporaries('gs://bucket/run', before=launched) == []


def test_gcsfuse_paths_are_buckets_and_a_bucket_runs_node_logs_go_to_a_directory_of_this_users(tmp_path, monkeypatch):
  assert not storage.is_local('/gcs/bucket/run') and not storage.is_local('gs://bucket/run')
  assert storage.is_local('/gcsx/run') and storage.is_local('runs/a')
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  private = str(tmp_path / f'plasticity-rl-logs-{os.getuid()}')
  assert RunLayout('/gcs/bucket/run').local_logs(2) == os.path.join(private, 'gcs/bucket/run/logs/2')
  assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
  for made_by_someone_else in (lambda: os.chmod(private, 0o777),
                               lambda: os.chown(private, 65534, 65534),
                               lambda: (os.rmdir(private), os.symlink(str(tmp_path), private))):
    made_by_someone_else()
    with pytest.raises(ValueError, match=f'{private} is not a directory of this user\'s alone'):
      RunLayout('gs://bucket/run').local_logs(1)
    os.unlink(private) if os.path.islink(private) else os.rmdir(private)
    os.mkdir(private, 0o700)
