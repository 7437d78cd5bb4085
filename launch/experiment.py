"""The experiment's configuration and run-directory layout (see WORKSPACE.md)."""

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from agents.config import AgentConfig
from launch.replay import ReplayConfig
from probes.diagnostics import DiagnosticsConfig
from probes.plasticity import ProbeConfig

CONFIG_FILE = 'config.json'
# Fields that may differ when a run directory is resumed (they do not change what is learnt).
RESUMABLE_FIELDS = ('max_learner_steps', 'num_actors', 'launch_type', 'run_dir', 'data_dir')


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  run_dir: str
  env: str = 'mdp:mnist:easy'
  data_dir: Optional[str] = None
  # ALE's repeat_action_probability for atari:* envs (0.25: Machado et al. 2018).
  sticky_action_probability: float = 0.0
  num_actors: int = 2
  launch_type: str = 'local_mp'
  max_learner_steps: int = 100_000
  seed: int = 0
  agent: AgentConfig = AgentConfig()
  replay: ReplayConfig = ReplayConfig()
  probe: ProbeConfig = ProbeConfig()
  probe_every: int = 5000  # 0 runs no evaluator.
  # The curvature and representation diagnostics at every probe point.
  diagnostics_enabled: bool = True
  diagnostics: DiagnosticsConfig = DiagnosticsConfig()
  checkpoint_every: int = 5000
  log_every: int = 100
  actor_params_update_period: int = 100

  def env_options(self) -> Dict[str, Any]:
    """Keyword options of `environments.make` for this run's env."""
    options: Dict[str, Any] = {'data_dir': self.data_dir} if self.data_dir else {}
    if self.env.startswith('atari:'):
      options['sticky_action_probability'] = self.sticky_action_probability
    return options

  def path(self, *parts: str) -> str:
    return os.path.join(self.run_dir, *parts)

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def write_or_check_config(config: ExperimentConfig) -> bool:
  """Writes config.json in a new run dir; in an existing one, checks it matches.

  Returns True when the run directory already held a run (a resume). A
  mismatch raises ValueError naming each differing flag, before anything in
  the directory is touched.
  """
  path = config.path(CONFIG_FILE)
  current = json.loads(json.dumps(config.to_dict()))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    differences = _differences(saved, current)
    if differences:
      raise ValueError(
          f'--run_dir={config.run_dir} holds a run with a different configuration; resuming it '
          f'needs the same flags. Differences (flag: saved -> given): {"; ".join(differences)}. '
          f'Use another --run_dir for a new run.')
    with open(path, 'w') as f:
      json.dump(current, f, indent=2)
    return True
  os.makedirs(config.run_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(current, f, indent=2)
  return False


def _differences(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = '') -> list:
  out = []
  for key in sorted(set(saved) | set(current)):
    if not prefix and key in RESUMABLE_FIELDS:
      continue
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_differences(a, b, prefix=f'{key}.'))
    elif a != b:
      out.append(f'{key}: {a!r} -> {b!r}')
  return out


def load_config(run_dir: str) -> ExperimentConfig:
  """Reads a run directory's config.json back into an ExperimentConfig."""
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f'{run_dir} is not a run directory: {path} does not exist.')
  with open(path) as f:
    raw = json.load(f)
  raw['agent']['interventions'] = tuple(raw['agent']['interventions'])
  return ExperimentConfig(**{**raw, 'agent': AgentConfig(**raw['agent']), 'replay': ReplayConfig(**raw['replay']),
                             'probe': ProbeConfig(**raw['probe']),
                             'diagnostics': DiagnosticsConfig(**raw.get('diagnostics', {}))})
