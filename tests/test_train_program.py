"""End to end: `python -m launch.train` as a user runs it, under local_mp and local_mt."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from launch.loggers import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = ['--env=mdp:mnist:easy', '--num_actors=2', '--max_learner_steps=300', '--min_replay_size=200',
             '--log_every=50', '--checkpoint_every=100', '--target_update_period=100', '--probe_every=150',
             '--probe_steps=40', '--probe_inputs=256', '--probe_batch_size=64', '--width_multiplier=0.25']


def train(run_dir, *extra, timeout=240):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PLASTICITY_DOWNLOAD': '0'}
  return subprocess.run([sys.executable, '-m', 'launch.train', f'--run_dir={run_dir}', *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def leftover_processes(since: float, marker: str):
  found = []
  for process in psutil.process_iter(['pid', 'cmdline', 'create_time']):
    try:
      if process.info['create_time'] >= since and process.pid != os.getpid() and \
          any(marker in part for part in (process.info['cmdline'] or [])):
        found.append(process.info)
    except psutil.Error:
      pass
  return found


@pytest.mark.slow
def test_local_mp_run_finishes_writes_every_file_and_leaves_no_process(tmp_path):
  run_dir = str(tmp_path / 'run')
  start = time.time()
  result = train(run_dir, '--launch_type=local_mp', *SMALL_RUN)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  time.sleep(1.0)
  assert not leftover_processes(start, 'launchpad'), 'processes left behind'
  assert not leftover_processes(start, run_dir)

  for name in ['config.json', 'learner.jsonl', 'actors.jsonl', 'probes.jsonl',
               'plots/probe_curves.png', 'plots/plasticity.png', 'logs/learner/0', 'logs/actor/0',
               'logs/actor/1', 'logs/replay/0', 'logs/evaluator/0']:
    assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
  assert any(f.startswith('learner_') for f in os.listdir(os.path.join(run_dir, 'checkpoints')))
  for name in ['learner', 'actors', 'probes']:
    assert os.listdir(os.path.join(run_dir, 'tensorboard', name)), name

  learner = read_jsonl(os.path.join(run_dir, 'learner.jsonl'))
  assert [r['learner_step'] for r in learner] == list(range(50, 301, 50))
  assert all(set(r) >= {'td_loss', 'mean_q', 'updates_per_s'} for r in learner)
  actors = read_jsonl(os.path.join(run_dir, 'actors.jsonl'))
  assert {r['actor_id'] for r in actors} == {0, 1}
  assert all(0 <= r['episode_return'] <= r['episode_length'] for r in actors)
  probes = read_jsonl(os.path.join(run_dir, 'probes.jsonl'))
  assert probes[0]['learner_step'] == 0 and probes[-1]['learner_step'] == 300
  for record in probes:
    assert record['num_targets'] == 10 and record['probe_steps'] == 40
    assert abs(record['plasticity'] - (record['baseline'] - record['final_loss_mean'])) < 1e-6
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
  steps = [r['learner_step'] for r in read_jsonl(os.path.join(run_dir, 'learner.jsonl'))]
  assert steps == [50, 100, 150, 200]  # The second run continued at 100, not from scratch.


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
  result = train(str(run_dir), '--env=mdp:mnist:hard', timeout=120)
  assert result.returncode != 0 and 'env' in result.stderr and "'mdp:mnist:easy' -> 'mdp:mnist:hard'" in result.stderr
  assert json.loads((run_dir / 'config.json').read_text()) == {'env': 'mdp:mnist:easy', 'agent': {'arch': 'mlp'}}
  assert sorted(os.listdir(run_dir)) == ['config.json']
