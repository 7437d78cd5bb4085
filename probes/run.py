r"""Runs the evaluator's measurements offline, on a saved checkpoint.

  python -m probes.run --checkpoint=runs/mnist_easy/checkpoints/learner_000010000.pkl

The run's config.json (two levels above the checkpoint) says how to rebuild
the agent and the environment. The probe measures on the run's probe set
(RUN_DIR/probe_set.npz: the inputs, targets and transitions of every probe
point of the run). For a run without one, it collects its own: the
transitions met by the checkpoint's own epsilon-greedy policy acting in the
run's environment (the distribution a live replay would hold), saved beside
the results. Results go to RUN_DIR/offline/<checkpoint name>/ (or --out_dir),
in the same files an evaluator writes.
"""

import dataclasses
import os
from typing import Optional

from absl import app
from absl import flags
import jax
import numpy as np

import environments
from agents import checkpointing
from agents.actor import Actor
from agents.builder import make_agent
from agents.learning import TrainingState
from launch.experiment import ExperimentConfig, load_config
from agents.types import Transition
from probes import probe_set
from probes.evaluator import Evaluator

CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Path of a learner checkpoint (RUN_DIR/checkpoints/*.pkl).')
OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write (default: RUN_DIR/offline/<checkpoint name>).')
PROBE_STEPS = flags.DEFINE_integer('probe_steps', None, 'Steps of each probe fit (default: the run\'s).',
                                   lower_bound=1)
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the probe targets and of the acting that collects inputs.')


def collect_transitions(config: ExperimentConfig, params, num: int, seed: int) -> Transition:
  """`num` transitions of the checkpoint's epsilon-greedy policy in the run's environment."""
  env = environments.make(config.env, seed=seed, **config.env_options())
  transitions = []
  actor = Actor(make_agent(config.agent, env.action_spec().num_values), env, config.agent.epsilon,
                params_source=lambda: (0, params), add=transitions.append, seed=seed,
                reward_clip=config.agent.reward_clip)
  actor.run(num_steps=num)
  return jax.tree_util.tree_map(lambda *x: np.stack(x), *transitions)


def run_on_checkpoint(checkpoint: str, out_dir: Optional[str] = None, probe_steps: Optional[int] = None,
                      seed: int = 0) -> dict:
  """Probes one checkpoint; returns the record written to OUT_DIR/probes.jsonl."""
  if not os.path.isfile(checkpoint):
    raise ValueError(f'--checkpoint={checkpoint} is not a file.')
  run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
  config = load_config(run_dir)
  if probe_steps:
    config = dataclasses.replace(config, probe=dataclasses.replace(config.probe, steps=probe_steps))
  step, state = checkpointing.load(checkpoint)
  state = TrainingState(*state)
  params, target_params = jax.tree_util.tree_map(jax.numpy.asarray, (state.params, state.target_params))
  out_dir = out_dir or os.path.join(run_dir, 'offline', os.path.splitext(os.path.basename(checkpoint))[0])
  run_set = os.path.join(run_dir, probe_set.PROBE_SET_FILE)
  if os.path.exists(run_set):
    set_path, source = run_set, None
  else:
    set_path = os.path.join(out_dir, probe_set.PROBE_SET_FILE)
    num = max(config.probe.num_inputs, config.diagnostics.td_covariance_samples)
    source = probe_set.ArraySource(collect_transitions(config, params, num, seed))
  num_actions = environments.make(config.env, seed=seed, **config.env_options()).action_spec().num_values
  evaluator = Evaluator(make_agent(config.agent, num_actions), config.probe,
                        params_source=lambda: (step, params, target_params), replay_source=source, out_dir=out_dir,
                        probe_set_path=set_path,
                        diagnostics_config=config.diagnostics if config.diagnostics_enabled else None, seed=seed,
                        discount=config.agent.discount,
                        reference_probes=os.path.join(run_dir, 'probes.jsonl') if source is None else None)
  return evaluator.evaluate()


def main(argv):
  del argv
  if not CHECKPOINT.value:
    raise app.UsageError('--checkpoint is required.')
  try:
    record = run_on_checkpoint(CHECKPOINT.value, OUT_DIR.value, PROBE_STEPS.value, SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  print(f'{CHECKPOINT.value} (learner step {record["learner_step"]}): plasticity {record["plasticity"]:.4f} '
        f'(final loss {record["final_loss_mean"]:.4f}, baseline {record["baseline"]:.4f})')


if __name__ == '__main__':
  app.run(main)
