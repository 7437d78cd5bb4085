"""End to end: `python -m launch.train` as a user runs it, under local_mp and local_mt."""

import ast
import json
import os
import pickle
import re
import signal
import subprocess
import time

import psutil
import pytest

from agents import checkpointing, snapshots
from launch.program import network
from probes.records.run_dir import RunLayout
from tests.conftest import (SMALL_RUN, RunsCode, leftover_processes, node_processes, partials, python_module, tmpfs,
                            train, wait_for, zero_the_middle)


def _launched(launcher: subprocess.Popen, recursive: bool) -> list:
  """A launcher's process and its children (every descendant with `recursive`); none once it is gone."""
  try:
    process = psutil.Process(launcher.pid)
    return [process, *process.children(recursive=recursive)]
  except psutil.Error:
    return []


def listening(launcher: subprocess.Popen) -> set:
  """(ip, port) of every TCP socket a launcher and its descendants (a run's processes) listen on."""
  found = set()
  for process in _launched(launcher, recursive=True):
    try:
      found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind='tcp')
                if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
      pass
  return found


@pytest.mark.slow
def test_local_mp_run_finishes_writes_every_file_and_leaves_no_process(tmp_path):
  run_dir = str(tmp_path / 'run')
  start = time.time()
  # One sample per insert: the learner needs ~10,000 transitions, so that both actors have time to act (at 8, one
  # fast actor can fill the replay before the other has compiled its policy).
  result = train(run_dir, '--launch_type=local_mp', *SMALL_RUN, '--samples_per_insert=1')
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  time.sleep(1.0)
  assert not node_processes(run_dir), 'processes left behind'
  assert not leftover_processes(start, run_dir)

  layout = RunLayout(run_dir)
  streams = [RunLayout.LEARNER, RunLayout.ACTORS, RunLayout.PROBES, RunLayout.DIAGNOSTICS]
  writers = [(RunLayout.LEARNER, 'learner'), (RunLayout.ACTORS, 'actor_0'), (RunLayout.ACTORS, 'actor_1'),
             (RunLayout.PROBES, 'evaluator'), (RunLayout.DIAGNOSTICS, 'evaluator')]  # A file each.
  for path in [layout.config, layout.addresses, layout.probe_set, layout.evaluator_status,
               *(layout.records_file(*writer) for writer in writers),
               layout.covariance('covariance', 0), layout.covariance('td_covariance', 0),
               *map(layout.plot, ['hessian_density', 'covariance', 'statistics', 'probe_curves', 'plasticity']),
               *(os.path.join(layout.attempt_logs(1), node)
                 for node in ['learner/0', 'actor/0', 'actor/1', 'replay/0', 'evaluator/0'])]:
    assert os.path.getsize(path) > 0, path
  assert any(f.startswith('learner_') for f in os.listdir(layout.checkpoints))
  for name in streams:
    assert os.listdir(layout.tensorboard(name)), name

  learner = RunLayout(run_dir).records('learner')
  assert [r['learner_step'] for r in learner] == list(range(50, 301, 50))
  assert all(set(r) >= {'td_loss', 'mean_q', 'updates_per_s'} for r in learner)
  actors = RunLayout(run_dir).records('actors')
  assert {r['actor_id'] for r in actors} == {0, 1}
  assert all(0 <= r['episode_return'] <= r['episode_length'] for r in actors)
  probes = RunLayout(run_dir).records('probes')
  assert [r['learner_step'] for r in probes] == [0, 150, 300]  # The learner's probe snapshots, each probed.
  assert not os.listdir(layout.probe_snapshots)
  for record in probes:
    assert record['num_targets'] == 10 and record['probe_steps'] == 40
    assert abs(record['plasticity'] - (record['baseline'] - record['final_loss_mean'])) < 1e-6
    assert record['num_unique_inputs'] == 256 and record['probe_set_step'] == 0  # One set for the run.
    assert record['plasticity_loss'] == pytest.approx(probes[0]['plasticity'] - record['plasticity'], abs=1e-6)
  assert probes[0]['plasticity_loss'] == 0.0
  diagnostics = RunLayout(run_dir).records('diagnostics')
  assert [r['learner_step'] for r in diagnostics] == [r['learner_step'] for r in probes]
  assert all(r['lanczos_steps'] == 5 and r['covariance_samples'] == 32 for r in diagnostics)
  assert all(r['td_covariance_samples'] == 32 for r in diagnostics)
  assert 'plot:' in result.stdout and run_dir in result.stdout


@pytest.mark.slow
def test_local_mt_run_resumes_from_its_checkpoint(tmp_path):
  run_dir = str(tmp_path / 'run')
  flags = ['--launch_type=local_mt', *SMALL_RUN, '--probe_every=0']
  first = train(run_dir, *[f for f in flags if not f.startswith('--max_learner_steps')], '--max_learner_steps=100')
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  second = train(run_dir, *[f for f in flags if not f.startswith('--max_learner_steps')], '--max_learner_steps=200')
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert 'Resuming' in second.stdout
  records = RunLayout(run_dir).records('learner')
  assert [(r['learner_step'], r['attempt']) for r in records] == [(50, 1), (100, 1), (150, 2), (200, 2)]
  # The replay came back from its checkpoint at the first run's stop: at least what learning needed.
  restored = re.search(r'Replay restored: (\{.*\}) items from (\S+)\.', second.stdout)
  assert restored, second.stdout[-3000:]
  items = ast.literal_eval(restored.group(1))
  assert items['replay'] >= 200 and items['probe'] >= 200  # --min_replay_size: no refill needed.
  assert restored.group(2).startswith(RunLayout(run_dir).replay_checkpoint)


@pytest.mark.slow
def test_a_run_shorter_than_the_replay_fill_ends_and_a_diverged_run_says_so(tmp_path):
  """The evaluator's first probe point waits for 2,048 distinct inputs that a 60-step run never collects."""
  run_dir = str(tmp_path / 'short')
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every', '--probe_inputs'))]
  result = train(run_dir, '--launch_type=local_mt', *flags, '--max_learner_steps=60', '--probe_every=30')
  ended = time.time()
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  learner = RunLayout(run_dir).records('learner')
  assert learner[-1]['learner_step'] == 60  # Logged although 60 is not a multiple of --log_every=50.
  assert ended - learner[-1]['time'] < 60  # The bound: within a minute of the learner's last step.
  probes = RunLayout(run_dir).records('probes')
  assert probes[-1]['learner_step'] == 60
  assert all(200 <= r['num_unique_inputs'] < 2048 for r in probes)  # What the replay held, said in the record.
  assert 'evaluator finished' in result.stdout

  run_dir = str(tmp_path / 'diverged')
  result = train(run_dir, '--launch_type=local_mt', *flags, '--max_learner_steps=300', '--probe_every=0',
                 '--learning_rate=1e6')
  assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'diverged at step' in result.stderr and '--learning_rate' in result.stderr
  last = RunLayout(run_dir).records('learner')[-1]
  assert last['diverged'] is True and last['td_loss'] is None and 'td_loss' in last['nonfinite']
  assert 'non-finite' in result.stdout  # The progress line shows it instead of crashing on a null.


@pytest.mark.slow
def test_sigterm_stops_a_local_mt_run_with_exit_code_130(tmp_path):
  run_dir = str(tmp_path / 'run')
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_inputs'))]
  # The evaluator waits on the replay. Another loopback address than the default: the nodes dial each other there.
  run = python_module('launch.train', f'--run_dir={run_dir}', '--launch_type=local_mt', *flags,
                      '--max_learner_steps=100000', '--probe_inputs=100000', '--bind_host=127.0.0.2')
  wait_for(lambda: RunLayout(run_dir).records('learner'), 180, 'the learner to train')
  # The launcher re-executed itself under the bind library (same pid): every node's server is on --bind_host only.
  assert len(listening(run)) >= 4 and {ip for ip, _ in listening(run)} <= {'127.0.0.2', '::ffff:127.0.0.2'}
  run.send_signal(signal.SIGTERM)
  sent = time.time()
  out, err = run.communicate(timeout=120)
  assert run.returncode == 130, out[-3000:] + err[-3000:]
  assert time.time() - sent < 30
  assert 'Interrupted' in out and 'resume' in err
  assert not os.path.exists(RunLayout(run_dir).probe_set)  # No set drawn from a stopping run.


def _evaluator_state(layout: RunLayout) -> str:
  try:
    with open(layout.evaluator_status) as f:
      return json.load(f).get('state', '')
  except (OSError, ValueError):
    return ''


@pytest.mark.slow
def test_sigint_mid_probe_stops_cleanly_and_a_killed_launcher_leaves_no_process(tmp_path):
  run_dir = str(tmp_path / 'run')
  layout = RunLayout(run_dir)
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_steps'))]
  flags += ['--launch_type=local_mp', '--max_learner_steps=100000', '--probe_steps=100000']  # A probe of minutes.
  start = time.time()
  run = python_module('launch.train', f'--run_dir={run_dir}', *flags)
  wait_for(lambda: _evaluator_state(layout) == 'probing', 180, 'the first probe')
  run.send_signal(signal.SIGINT)
  sent = time.time()
  out, err = run.communicate(timeout=120)
  assert run.returncode == 130, out[-3000:] + err[-3000:]
  assert time.time() - sent < 30  # The evaluator dropped its probe instead of being killed at the notice.
  assert 'Interrupted' in out and 'resume' in err
  assert os.listdir(layout.checkpoints)  # The learner's final checkpoint.
  assert not layout.records('probes')  # The point in progress is dropped whole, not half-written.
  assert snapshots.saved(layout.probe_snapshots)[0][0] == 0  # Its snapshot stays, for the relaunch.
  time.sleep(1.0)
  assert not node_processes(run_dir) and not leftover_processes(start, run_dir)

  relaunch = python_module('launch.train', f'--run_dir={run_dir}', *flags)
  wait_for(lambda: layout.attempts() == 2 and _evaluator_state(layout) == 'probing', 180, 'the relaunch')
  with open(layout.evaluator_status) as f:
    assert json.load(f)['learner_step'] == 0  # The dropped point, from its snapshot file.
  assert os.path.isdir(os.path.join(layout.attempt_logs(1), 'learner'))  # The first launch's logs are kept.
  # Its watchdog dies: the launcher starts another, which ends the nodes when the launcher is killed below.
  watchdog, = _watchdogs(relaunch)
  watchdog.kill()
  wait_for(lambda: [w.pid for w in _watchdogs(relaunch)] not in ([], [watchdog.pid]), 30, 'a new watchdog')
  killed = time.time()
  relaunch.kill()  # kill -9 of the launcher: no stop reaches its nodes from it.
  relaunch.communicate(timeout=30)
  # SIGTERM at once: they stop as at a Ctrl-C; SIGKILL only for one still there after the notice and 10 s.
  wait_for(lambda: not node_processes(run_dir) and not leftover_processes(start, run_dir), 50,
            'the nodes to end after their launcher')
  assert time.time() - killed < 50


def _watchdogs(launcher: subprocess.Popen):
  """The live watchdog processes a launcher started."""
  return [child for child in _launched(launcher, recursive=False)[1:] if _is_live_watchdog(child)]


def _is_live_watchdog(process: psutil.Process) -> bool:
  try:
    return 'launch.program.watchdog' in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE
  except psutil.Error:
    return False


@pytest.mark.slow
def test_killed_actor_and_evaluator_restart_in_place_a_killed_learner_relaunches_the_run(tmp_path):
  run_dir = str(tmp_path / 'run')
  layout = RunLayout(run_dir)
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--checkpoint_every', '--probe_every'))]
  start = time.time()
  # Long enough for the restarted actor to start (half a minute on a loaded machine) before the learner's end.
  run = python_module('launch.train', f'--run_dir={run_dir}', '--launch_type=local_mp', *flags,
                      '--max_learner_steps=6000', '--checkpoint_every=250', '--probe_every=300')
  wait_for(lambda: len(layout.records('learner')) >= 4, 180, 'the learner at step 200')
  for node in ('actor/0', 'evaluator/0'):  # Each is restarted in place, while the rest of the run goes on.
    process, = node_processes(run_dir, node)
    process.kill()
    wait_for(lambda: any(r['node'] == node for r in layout.records('restarts')), 60, f'the restart of {node}')
  in_place = layout.records('restarts')
  wait_for(lambda: any(r['actor_id'] == 0 and r['time'] > in_place[0]['time'] for r in layout.records('actors')), 120,
            'an episode of the restarted actor')
  assert layout.attempts() == 1 and {r['attempt'] for r in layout.records('learner')} == {1}  # No relaunch for those.
  # The learner's failure stops the launch: the run is relaunched from the checkpoints (no final one).
  assert layout.records('learner')[-1]['learner_step'] < 6000, 'the run ended before its learner could be killed'
  learner_process, = node_processes(run_dir, 'learner/0')
  learner_process.kill()
  out, err = run.communicate(timeout=400)
  assert run.returncode == 0, out[-3000:] + err[-3000:]
  assert 'restarted it in place' in out and 'Relaunching from the checkpoints (1/3)' in out
  assert out.count('Replay restored') == 1
  actor_restart, evaluator_restart, relaunch = layout.records('restarts')
  for record, node in ((actor_restart, 'actor/0'), (evaluator_restart, 'evaluator/0')):
    assert record['node'] == node and record['attempt'] == 1 and record['restart'] == 1
    assert record['exit_code'] == -9 and record['exit_signal'] == 'SIGKILL' and record['steps_lost'] == 0
  assert relaunch['attempt'] == 1 and any(node.startswith('learner') for node in relaunch['nodes'])
  assert not any(node.startswith(('actor', 'evaluator')) for node in relaunch['nodes'])  # Those were restarted.
  assert 0 <= relaunch['steps_lost'] <= 250  # At most one --checkpoint_every.
  records = layout.records('learner')
  assert records[-1]['learner_step'] == 6000 and records[-1]['attempt'] == 2
  assert layout.attempts() == 2
  # Actor 0's counters go on through its restart and the relaunch: episodes 1, 2, ... of 100 steps each.
  actor_0 = [r for r in layout.records('actors') if r['actor_id'] == 0]
  assert [r['episode'] for r in actor_0] == list(range(1, len(actor_0) + 1))
  assert [r['env_steps'] for r in actor_0] == [100 * r['episode'] for r in actor_0]
  assert {r['attempt'] for r in actor_0} == {1, 2}
  # The restarted evaluator (and the relaunched one) went on from their last point, probing the snapshot files the
  # learner wrote meanwhile: every point of the schedule probed once, or recorded as skipped (the evaluator behind).
  records = layout.records('probes')
  steps = [r['learner_step'] for r in records]
  skipped = [step for r in records for step in r.get('skipped_probe_steps', [])]
  assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 6000 and not set(steps) & set(skipped)
  assert sorted(steps + skipped) == list(range(0, 6001, 300)), (steps, skipped)
  assert not os.listdir(layout.probe_snapshots)  # Each removed once probed.
  time.sleep(1.0)
  assert not node_processes(run_dir) and not leftover_processes(start, run_dir)


@pytest.mark.slow
def test_an_evaluator_failing_past_its_restarts_is_disabled_training_goes_on_and_a_relaunch_probes_the_rest(tmp_path):
  run_dir = str(tmp_path / 'run')
  layout = RunLayout(run_dir)
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every', '--checkpoint_every'))]
  flags += ['--launch_type=local_mp', '--max_learner_steps=3000', '--probe_every=500', '--checkpoint_every=500',
            '--max_restarts=1', '--nodiagnostics']
  run = python_module('launch.train', f'--run_dir={run_dir}', *flags)
  wait_for(lambda: layout.records('learner'), 180, 'the learner to train')
  for kills in (1, 2):  # Restarted in place once (--max_restarts=1); its next failure disables it.
    wait_for(lambda: node_processes(run_dir, 'evaluator/0'), 120, 'the evaluator')
    process, = node_processes(run_dir, 'evaluator/0')
    process.kill()
    wait_for(lambda: len(layout.records('restarts')) == kills, 60, f'restart record {kills}')
  restart, disabled = layout.records('restarts')
  assert 'disabled' not in restart and disabled['disabled'] is True and disabled['node'] == 'evaluator/0'
  assert layout.records('learner')[-1]['learner_step'] < 3000, 'the run ended before its evaluator was disabled'
  out, err = run.communicate(timeout=400)
  assert run.returncode == 4, out[-3000:] + err[-3000:]
  assert 'disabled, training goes on' in out
  learner = layout.records('learner')
  assert learner[-1]['learner_step'] == 3000 and {r['attempt'] for r in learner} == {1}  # Went on, no relaunch.
  probed = [r['learner_step'] for r in layout.records('probes')]
  missing = [step for step in range(0, 3001, 500) if step not in probed]
  assert missing and f'the probe points at learner steps {", ".join(map(str, missing))} were not probed' in err
  assert [step for step, _ in snapshots.saved(layout.probe_snapshots)] == missing  # They wait, for a relaunch.
  assert not node_processes(run_dir)

  relaunch = train(run_dir, *flags, timeout=400)
  assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
  assert sorted(r['learner_step'] for r in layout.records('probes')) == list(range(0, 3001, 500))
  assert not os.listdir(layout.probe_snapshots)


@pytest.mark.slow
def test_bad_flags_fail_clearly_and_keep_an_existing_run(tmp_path):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  (run_dir / 'config.json').write_text(json.dumps({'env': 'mdp:mnist:easy', 'agent': {'arch': 'mlp'}}))
  result = train(str(run_dir), '--env=mdp:mnist:bogus', timeout=120)
  assert result.returncode != 0
  assert 'easy' in result.stderr and 'hard' in result.stderr and 'sparse' in result.stderr
  result = train(str(run_dir), '--arch=transformerz', timeout=120)
  assert result.returncode != 0 and '--arch' in result.stderr and 'mlp' in result.stderr
  result = train(str(run_dir), '--interventions=layernorm,bogus', timeout=120)
  assert result.returncode != 0 and '--interventions' in result.stderr and 'reset_optimizer' in result.stderr
  result = train(str(run_dir), '--bind_host=localhost', timeout=120)
  assert result.returncode == 1 and '--bind_host=localhost is not an IP address' in result.stderr
  result = train(str(run_dir), '--env=mdp:mnist:hard', timeout=120)
  assert result.returncode != 0 and 'env' in result.stderr and "'mdp:mnist:easy' -> 'mdp:mnist:hard'" in result.stderr
  assert json.loads((run_dir / 'config.json').read_text()) == {'env': 'mdp:mnist:easy', 'agent': {'arch': 'mlp'}}
  assert sorted(os.listdir(run_dir)) == ['config.json']
  # A run directory that is a file; a config.json that is not one; a damaged checkpoint: named, nothing lost.
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  result = train(str(a_file), timeout=120)
  assert result.returncode == 1 and f'--run_dir={a_file} is a file' in result.stderr
  assert a_file.read_text() == 'mine'
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text('{"env": ')
  result = train(str(broken), timeout=120)
  assert result.returncode == 1 and f'{broken / "config.json"} is not a readable run configuration' in result.stderr
  assert (broken / 'config.json').read_text() == '{"env": ' and sorted(os.listdir(broken)) == ['config.json']


@pytest.mark.slow
def test_attach_evaluator_to_a_live_run_then_probe_its_checkpoint_offline(tmp_path):
  run_dir = str(tmp_path / 'run')
  flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--probe_every'))]
  run = python_module('launch.train', f'--run_dir={run_dir}', '--launch_type=local_mp', *flags,
                      '--max_learner_steps=3000', '--probe_every=0')
  wait_for(lambda: os.path.exists(RunLayout(run_dir).addresses), 180, 'the run to publish its addresses')
  with open(RunLayout(run_dir).addresses) as f:
    published = json.load(f)
  ports = {int(published[node].rsplit(':', 1)[1]) for node in ('learner', 'replay')}
  assert published['learner'].startswith('127.0.0.1:') and published['replay'].startswith('127.0.0.1:')
  # Every node's server listens (learner, replay, 2 actors), on loopback only: --bind_host's default.
  wait_for(lambda: ports <= {port for _, port in listening(run)} and len(listening(run)) >= 4, 120,
            'the servers to listen')
  assert all(network.is_loopback(ip) for ip, _ in listening(run)), listening(run)
  attach = python_module('launch.attach_evaluator', f'--run_dir={run_dir}', '--name=mine', '--probe_every=200',
                         '--probe_steps=20', '--nodiagnostics')
  out, err = attach.communicate(timeout=300)
  assert attach.returncode == 0, out + err[-3000:]
  run_out, run_err = run.communicate(timeout=300)
  assert run.returncode == 0, run_out + run_err[-3000:]

  records = RunLayout(run_dir).evaluator('mine').records('probes')
  steps = [r['learner_step'] for r in records]
  assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] <= 3000
  assert all(r['probe_steps'] == 20 for r in records)
  assert not RunLayout(run_dir).records('probes')  # The run's own files are untouched.

  # The run has stopped: addresses.json says so, and attaching again is a clear error.
  with open(RunLayout(run_dir).addresses) as f:
    assert json.load(f)['stopped_at'] >= published['written_at']
  again = python_module('launch.attach_evaluator', f'--run_dir={run_dir}')
  out, err = again.communicate(timeout=120)
  assert again.returncode != 0 and 'not live' in err
  not_a_run = python_module('launch.attach_evaluator', f'--run_dir={tmp_path}')
  out, err = not_a_run.communicate(timeout=120)
  assert not_a_run.returncode != 0 and 'not a run directory' in err

  checkpoint = checkpointing.path_for(RunLayout(run_dir).checkpoints, 3000)
  offline = python_module('probes.run', f'--checkpoint={checkpoint}', '--probe_steps=20')
  out, err = offline.communicate(timeout=300)
  assert offline.returncode == 0, err[-3000:]
  record, = RunLayout(run_dir).offline(checkpoint).records('probes')
  assert record['learner_step'] == 3000 and record['probe_steps'] == 20 and 'plasticity' in out


@pytest.mark.slow
def test_a_torn_record_a_planted_pickle_and_damaged_files_are_named_and_survived_by_a_real_run(tmp_path):
  run_dir = str(tmp_path / 'run')
  layout = RunLayout(run_dir)
  flags = ['--launch_type=local_mt', '--nodiagnostics',
           *(f for f in SMALL_RUN if not f.startswith('--max_learner_steps'))]
  # A probe record torn by a kill -9 (or a full disk) in the launch before: the next record must not be glued onto it.
  os.makedirs(layout.stream('probes'))
  with open(layout.records_file('probes', 'evaluator'), 'w') as f:
    f.write('{"learner_step": 0, "plasticity": 0.1, "plastic')
  first = train(run_dir, *flags, '--max_learner_steps=150')
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert [r['learner_step'] for r in layout.records('probes')] == [0, 150]  # Step 0's record, after the fragment.
  # Between launches: the probe set cut short, the final checkpoint's middle zeroed, a pickle planted that runs code.
  with open(layout.probe_set, 'r+b') as f:
    f.truncate(f.seek(0, os.SEEK_END) // 2)
  damaged = checkpointing.path_for(layout.checkpoints, 150)
  zero_the_middle(damaged)
  marker = str(tmp_path / 'code_ran')
  planted = checkpointing.path_for(layout.checkpoints, 999999999, suffix=checkpointing.PICKLED_SUFFIX)
  with open(planted, 'wb') as f:
    pickle.dump({'step': 999999999, 'state': RunsCode(marker)}, f)
  second = train(run_dir, *flags, '--max_learner_steps=300')
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert not os.path.exists(marker)
  # Each problem is a warning on the launcher's output, naming the file.
  assert f'{planted} is a pickled checkpoint' in second.stderr and checkpointing.MIGRATE_COMMAND in second.stderr
  assert (f'{damaged} is damaged: its content does not match its checksum. Resuming from '
          f'{checkpointing.path_for(layout.checkpoints, 100)}') in second.stderr
  assert f'{layout.probe_set} is not a readable probe set' in second.stderr
  learner = [r for r in layout.records('learner') if r['attempt'] == 2]
  assert [r['learner_step'] for r in learner] == [150, 200, 250, 300]  # From the checkpoint before the damaged one.
  records = layout.records('probes')
  assert [r['learner_step'] for r in records] == [0, 150, 300]
  aside = records[-1]['probe_set_replaced']  # Drawn again; the records made on it say so.
  assert aside.startswith(layout.probe_set + '.damaged-') and os.path.exists(aside) and aside in second.stderr
  assert records[-1]['probe_set_step'] == 300 and 'probe_set_replaced' not in records[1]


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_a_clear_error_and_the_last_checkpoint_intact(tmp_path):
  with tmpfs(str(tmp_path / 'disk'), '12m') as disk:
    run_dir = os.path.join(disk, 'run')
    layout = RunLayout(run_dir)
    # A checkpoint is 4.6 MB at this width: two fit on 12 MiB, the third does not.
    flags = [f for f in SMALL_RUN if not f.startswith(('--max_learner_steps', '--width_multiplier', '--probe_every'))]
    result = train(run_dir, '--launch_type=local_mp', *flags, '--max_learner_steps=1000', '--width_multiplier=0.4375',
                   '--probe_every=0')
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert f'The file system of {run_dir} is full' in result.stderr
    assert f'{checkpointing.path_for(layout.checkpoints, 300)}' in result.stderr  # What was being written.
    assert 'Relaunching' not in result.stdout and layout.attempts() == 1  # A relaunch would fill it again.
    assert not partials(run_dir)
    assert [step for step, _ in checkpointing.numbered(layout.checkpoints)] == [100, 200]
    step, state = checkpointing.load(checkpointing.path_for(layout.checkpoints, 200))  # Whole, checksum right.
    assert step == 200 and int(state['step']) == 200
