"""Whole-experiment presets: flag name -> value, used where the flag is not given (`--preset`).

Flag-free, so that the studies (launch/studies/registry.py) read them without defining
launch.train's flags. Fields not named keep their declared defaults
(agents/config.py, probes/records/run_dir.py): the paper's classification-MDP settings.
"""

from typing import Any, Dict

# The MDP agent's optimizer. Appendix A.2 gives the MDP agent "the same agent structure" as the Atari one (DQN Zoo's
# double DQN: centred RMSProp at 2.5e-4), and with it the MDP runs are in the regime the paper studies: units alive
# and plasticity still lost (the optimizer_regime study: README, docs/studies.md). Appendix A.1's Adam (eps 1e-9),
# the fields' default, kills units as section 3.1 shows (46% by step 10,000): the `mdp_adam` preset.
MDP_OPTIMIZER = {'optimizer': 'rmsprop', 'learning_rate': 2.5e-4}

PRESETS: Dict[str, Dict[str, Any]] = {
    # The paper's classification-MDP settings (sections 4.1, 5.2, appendix A.2): the fields' defaults, with the
    # Atari agent's optimizer.
    'mdp': dict(MDP_OPTIMIZER),
    # The same with appendix A.1's Adam (lr 1e-3, b2 0.999, eps 1e-9): section 3.1's unit-killing regime.
    'mdp_adam': {'optimizer': 'adam', 'learning_rate': 1e-3},
    # DQN Zoo's double DQN (Quan & Ostrovski 2020) as the paper's section 5.3 and
    # appendix A.3 run it: centred RMSProp at 2.5e-4 (no gradient-norm clip, as in
    # DQN Zoo's double_q), TD-error gradient clipped to 1/32, a replay of
    # 100,000 transitions (the paper's; DQN Zoo starts learning at 5% of its 1M,
    # i.e. 50,000), epsilon 0.1, one update of 32 per 4 environment steps
    # (32 / 4 = 8 samples per insert), the target network every 1.2e5 frames =
    # 30,000 agent steps = 7,500 updates. Add --interventions=layernorm for the
    # paper's modification.
    'atari': {
        'arch': 'nature_dqn', 'optimizer': 'rmsprop', 'learning_rate': 2.5e-4, 'td_error_clip': 1 / 32,
        'batch_size': 32, 'discount': 0.99, 'epsilon': 0.1, 'target_update_period': 7_500,
        'replay_capacity': 100_000, 'min_replay_size': 50_000, 'samples_per_insert': 8.0,
    },
}
