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

import environments
from launch import brownian_study
from probes.diagnostics import DiagnosticsConfig

_STUDY = brownian_study.StudyConfig()
_DIAGNOSTICS = DiagnosticsConfig()

RUN_DIR = flags.DEFINE_string('run_dir', None, 'Directory the results go to; one holding brownian.jsonl is refused.')
STEPS = flags.DEFINE_integer('steps', _STUDY.steps, 'Training steps of both processes.', lower_bound=1)
MEASURE_EVERY = flags.DEFINE_integer('measure_every', _STUDY.measure_every,
                                     'Steps between measurements (also at step 0 and the last step).', lower_bound=1)
NUM_TRANSITIONS = flags.DEFINE_integer('num_transitions', _STUDY.num_transitions,
                                       'Uniformly-random-policy transitions collected up front; batches are sampled '
                                       'from them.', lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer('batch_size', _STUDY.batch_size, 'Training batch (appendix A.1).', lower_bound=1)
LEARNING_RATE = flags.DEFINE_float('learning_rate', _STUDY.learning_rate, 'SGD learning rate (appendix A.1).')
TARGET_UPDATE_PERIOD = flags.DEFINE_integer('target_update_period', _STUDY.target_update_period,
                                            'Steps between target-network copies (appendix A.1).', lower_bound=1)
WIDTH_MULTIPLIER = flags.DEFINE_float('width_multiplier', _STUDY.width_multiplier,
                                      'Scales the MLP\'s two hidden layers of 512.')
SEED = flags.DEFINE_integer('seed', _STUDY.seed, 'Seed of the environment, policy, batches, initialisation, walk, '
                            'perturbation network and Lanczos start.')
DATA_DIR = flags.DEFINE_string('data_dir', None, 'MNIST location (see environments/datasets.py); default: the usual '
                               'search, ending with the embedded 10,000 digits.')
LANCZOS_STEPS = flags.DEFINE_integer('lanczos_steps', _DIAGNOSTICS.lanczos_steps,
                                     'Lanczos iterations of the Hessian density.', lower_bound=1)
HESSIAN_BATCH_SIZE = flags.DEFINE_integer('hessian_batch_size', _DIAGNOSTICS.hessian_batch_size,
                                          'Probe inputs the Hessian is taken on.', lower_bound=1)
COVARIANCE_SAMPLES = flags.DEFINE_integer('covariance_samples', _DIAGNOSTICS.covariance_samples,
                                          'k of the probe-task gradient covariance C_k.', lower_bound=2)
TD_COVARIANCE_SAMPLES = flags.DEFINE_integer('td_covariance_samples', _DIAGNOSTICS.td_covariance_samples,
                                             'k of the TD-loss gradient covariance (0: off).', lower_bound=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}.')
  if not RUN_DIR.value:
    raise app.UsageError('--run_dir is required.')
  config = brownian_study.StudyConfig(
      learning_rate=LEARNING_RATE.value, batch_size=BATCH_SIZE.value, target_update_period=TARGET_UPDATE_PERIOD.value,
      steps=STEPS.value, measure_every=MEASURE_EVERY.value, num_transitions=NUM_TRANSITIONS.value,
      width_multiplier=WIDTH_MULTIPLIER.value, seed=SEED.value)
  diagnostics = DiagnosticsConfig(lanczos_steps=LANCZOS_STEPS.value, hessian_batch_size=HESSIAN_BATCH_SIZE.value,
                                  covariance_samples=COVARIANCE_SAMPLES.value,
                                  td_covariance_samples=TD_COVARIANCE_SAMPLES.value)
  try:
    brownian_study.validate(config, diagnostics)
    brownian_study.check_run_dir(RUN_DIR.value)
    env = environments.make(brownian_study.ENV, seed=SEED.value, data_dir=DATA_DIR.value)
  except ValueError as e:
    raise app.UsageError(str(e))
  print(f'{env.data_source}; collecting {config.num_transitions} transitions of a uniformly random policy.',
        flush=True)
  transitions = brownian_study.collect_transitions(env, config.num_transitions, SEED.value)
  try:
    probe_inputs = brownian_study.select_probe_inputs(transitions, diagnostics)
  except ValueError as e:
    raise app.UsageError(str(e))
  brownian_study.run(RUN_DIR.value, config, diagnostics, transitions, probe_inputs,
                     env.action_spec().num_values, log=lambda line: print(line, flush=True))


if __name__ == '__main__':
  app.run(main)
