"""The one configuration of the double-DQN agent (DQN Zoo style: one config per agent).

Defaults follow the paper's classification-MDP experiments (sections 4.1, 5.2
and appendix A.1/A.2). Where the paper disagrees with itself, the choice and the
reason are noted beside the field.
"""

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  # Network and output encoding (registries in agents/networks.py, agents/encodings.py).
  arch: str = 'mlp'
  width_multiplier: float = 1.0
  output: str = 'regress'
  # Categorical encodings (two_hot, hl_gauss): see agents/encodings.py for the defaults' reason.
  num_bins: int = 101
  support_min: float = -100.0
  support_max: float = 100.0
  # Composable interventions (registry in agents/interventions.py).
  interventions: Tuple[str, ...] = ()
  weight_decay: float = 1e-5  # l2 coefficient of the `weight_decay` intervention (section 5.2).
  shrink: float = 0.8  # lambda of `shrink_and_perturb`: theta <- shrink * theta + perturb * theta_fresh.
  perturb: float = 0.2  # sigma of `shrink_and_perturb`.
  # Optimizer preset (registry in agents/optimizers.py); appendix A.1's Adam by default.
  optimizer: str = 'adam'
  learning_rate: float = 1e-3
  td_error_clip: Optional[float] = None
  # Double DQN.
  discount: float = 0.99
  batch_size: int = 32
  # Section 4.1 says 1,000 learner steps, appendix A.2 says 10,000; the
  # experiments shown (figures 3-6, "100 iterations of 1000 steps") use 1,000.
  target_update_period: int = 1000
  # Acting: the paper's training epsilon (appendix A.3); rewards clipped for learning.
  epsilon: float = 0.1
  reward_clip: Optional[float] = 1.0
