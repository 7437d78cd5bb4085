r"""The Brownian-motion control of section 3.2 (figure 2, appendix A.1).

  python -m launch.brownian --run_dir=runs/brownian [--steps=20000] [--measure_every=5000]

Trains the MDP preset's MLP with SGD (1e-3, batches of 512, target network
every 5,000 steps) on the double-DQN loss of `mdp:mnist:easy` transitions from
a uniformly random policy, beside a random walk from the same initialisation
whose every step is an isotropic Gaussian direction with the norm of the
gradient step. At steps 0, `--measure_every`, ... both get the evaluator's
diagnostics (Hessian density, probe-task C_k, TD C_k) on the same probe
inputs. Writes RUN_DIR/brownian.jsonl (one record per measured step and
process), RUN_DIR/covariance/ and RUN_DIR/td_covariance/
(<process>_<step>.npy), RUN_DIR/config.json and RUN_DIR/plots/brownian.png.
"""

from absl import app
from absl import flags

from agents import config_flags
import environments
from launch import brownian_study
from probes.diagnostics import DiagnosticsConfig

RUN_DIR = flags.DEFINE_string('run_dir', None, 'Directory the results go to; one holding brownian.jsonl is refused.')
STUDY = config_flags.define(brownian_study.StudyConfig)
DIAGNOSTICS = config_flags.define(DiagnosticsConfig, only=brownian_study.DIAGNOSTIC_FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  if not RUN_DIR.value:
    raise app.UsageError('--run_dir is required.')
  config = config_flags.build(brownian_study.StudyConfig, STUDY)
  diagnostics = config_flags.build(DiagnosticsConfig, DIAGNOSTICS)
  try:
    brownian_study.validate(config, diagnostics)
    brownian_study.check_run_dir(RUN_DIR.value)
    env = environments.make(brownian_study.ENV, seed=config.seed, data_dir=config.data_dir)
  except ValueError as e:
    raise app.UsageError(str(e))
  print(f'{env.data_source}; collecting {config.num_transitions} transitions of a uniformly random policy.',
        flush=True)
  transitions = brownian_study.collect_transitions(env, config.num_transitions, config.seed)
  try:
    probe_inputs = brownian_study.select_probe_inputs(transitions, diagnostics)
  except ValueError as e:
    raise app.UsageError(str(e))
  brownian_study.run(RUN_DIR.value, config, diagnostics, transitions, probe_inputs,
                     env.action_spec().num_values, log=lambda line: print(line, flush=True))


if __name__ == '__main__':
  app.run(main)
