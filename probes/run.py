r"""Runs the evaluator's measurements offline, on a saved checkpoint.

  python -m probes.run --checkpoint=runs/mnist_easy/checkpoints/learner_000010000.msgpack

The run's config.json (two levels above the checkpoint) says how to rebuild
the agent and the environment. The probe measures on the run's probe set
(RUN_DIR/probe_set.npz: the inputs, targets and transitions of every probe
point of the run). For a run without one, it collects its own: the
transitions met by the checkpoint's own epsilon-greedy policy acting in the
run's environment (the distribution a live replay would hold), saved beside
the results. Results go to RUN_DIR/offline/<checkpoint name>/ (or --out_dir),
in the same files an evaluator writes. A pickled checkpoint (`.pkl`, an
earlier version's format) is never read: `python -m launch.migrate` converts
the run directory.
"""

import os
from typing import Callable, Optional

from absl import app
from absl import flags
import jax
import numpy as np

import environments
from agents import checkpointing, storage
from agents.actor import Actor
from agents.builder import make_agent
from agents import config_flags
from agents.learner import initial_state
from agents.types import Transition
from probes.measures import probe_set
from probes.evaluator import Evaluator
from probes.records.run_dir import ExperimentConfig, RunLayout, load_config

CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                 'Path of a learner checkpoint (RUN_DIR/checkpoints/learner_<step>.msgpack).')
OUT_DIR = flags.DEFINE_string('out_dir', None, 'Where to write (default: RUN_DIR/offline/<checkpoint name>).')
OVERRIDES = config_flags.define(
    ExperimentConfig, overrides=True, help_suffix=' (Default: as the run has it.)',
    only=[f.flag for f in config_flags.fields(ExperimentConfig)
          if f.path[0] in ('probe', 'diagnostics', 'diagnostics_enabled')])
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the probe targets and of the acting that collects inputs.')


def collect_transitions(config: ExperimentConfig, params, num: int, seed: int) -> Transition:
  """`num` transitions of the checkpoint's epsilon-greedy policy in the run's environment."""
  env = environments.make(config.env, seed=seed, **config.env_options())
  transitions = []
  actor = Actor(make_agent(config.agent, env.action_spec().num_values), config.agent, env,
                params_source=lambda: (0, params), add=transitions.append, seed=seed)
  actor.run(num_steps=num)
  return jax.tree_util.tree_map(lambda *x: np.stack(x), *transitions)


def run_on_checkpoint(checkpoint: str, out_dir: Optional[str] = None, seed: int = 0,
                      override: Callable[[ExperimentConfig], ExperimentConfig] = lambda config: config) -> dict:
  """Probes one checkpoint with the run's settings (`override` may change them); returns the record written
  to OUT_DIR's probes stream. A ValueError naming the checkpoint if it is not one of this run's (damaged,
  planted, pickled)."""
  if not storage.path(checkpoint).is_file():
    raise ValueError(f'--checkpoint={checkpoint} is not a file.')
  location = os.path.abspath(checkpoint) if '://' not in checkpoint else checkpoint
  run_dir = os.fspath(storage.path(location).parent.parent)
  config = override(load_config(run_dir))
  spec, num_actions = environments.specs(config.env, **config.env_options())  # An environment only if collecting.
  agent = make_agent(config.agent, num_actions)
  template = jax.eval_shape(lambda: initial_state(agent, config.seed, np.zeros(spec.shape, spec.dtype)))
  step, state = checkpointing.load(checkpoint, template)
  params, target_params = jax.tree_util.tree_map(jax.numpy.asarray, (state.params, state.target_params))
  run = RunLayout(run_dir)
  out = RunLayout(out_dir) if out_dir else run.offline(checkpoint)
  if storage.path(run.probe_set).exists():
    set_path, source = run.probe_set, None
  else:
    set_path = out.probe_set
    num = max(config.probe.num_inputs, config.diagnostics.td_covariance_samples)
    source = probe_set.ArraySource(collect_transitions(config, params, num, seed))
  evaluator = Evaluator.for_run(config, agent, params_source=lambda: (step, params, target_params),
                                replay_source=source, out=out, probe_set_path=set_path, seed=seed,
                                reference_probes=run if source is None else None)
  return evaluator.evaluate()


def main(argv):
  del argv
  if not CHECKPOINT.value:
    raise app.UsageError('--checkpoint is required.')
  try:
    record = run_on_checkpoint(CHECKPOINT.value, OUT_DIR.value, SEED.value,
                               lambda config: config_flags.apply_overrides(config, OVERRIDES))
  except ValueError as e:
    raise app.UsageError(str(e))
  print(f'{CHECKPOINT.value} (learner step {record["learner_step"]}): plasticity {record["plasticity"]:.4f} '
        f'(final loss {record["final_loss_mean"]:.4f}, baseline {record["baseline"]:.4f})')


if __name__ == '__main__':
  app.run(main)
