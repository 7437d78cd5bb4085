"""Random and human reference scores of the 57 Atari games, and the scores normalised by them.

The table is the one the Atari-57 literature normalises by: the random-agent
and professional-human-tester scores of Mnih et al. 2015 (Nature DQN) and van
Hasselt et al. 2016 (double DQN), with the games those tables lack (Berzerk,
Defender, Phoenix, Pitfall, Skiing, Solaris, Surround, Yars' Revenge) from the
57-game tables of Wang et al. 2016 and Badia et al. 2020 (Agent57); the
numbers are DQN Zoo's (Quan & Ostrovski 2020, `dqn_zoo/atari_data.py`, commit
f87bb1f), the implementation whose double DQN Lyle et al. 2023 ran. Each is the
mean undiscounted return of episodes that start after up to 30 no-ops and end
by 108,000 frames: the evaluation protocol of `environments/atari.py`.

  * human-normalised score (Mnih et al. 2015): (agent - random) / (human -
    random): 0 plays like the random agent, 1 like the human tester;
  * human-normalised improvement (Wang et al. 2016, Dueling networks, section
    4.2; Lyle et al. 2023's figure 7 reports it for layer norm over double
    DQN): (agent - baseline) / (max(human, baseline) - random). The max keeps
    a small change between two agents that both play far below the human
    from showing as a large improvement.
"""

from typing import NamedTuple, Optional


class ReferenceScores(NamedTuple):
  random: float
  human: float


# Keyed by `environments.atari.GAMES`' names (ALE's).
REFERENCE_SCORES = {
    'alien': ReferenceScores(227.8, 7127.7),
    'amidar': ReferenceScores(5.8, 1719.5),
    'assault': ReferenceScores(222.4, 742.0),
    'asterix': ReferenceScores(210.0, 8503.3),
    'asteroids': ReferenceScores(719.1, 47388.7),
    'atlantis': ReferenceScores(12850.0, 29028.1),
    'bank_heist': ReferenceScores(14.2, 753.1),
    'battle_zone': ReferenceScores(2360.0, 37187.5),
    'beam_rider': ReferenceScores(363.9, 16926.5),
    'berzerk': ReferenceScores(123.7, 2630.4),
    'bowling': ReferenceScores(23.1, 160.7),
    'boxing': ReferenceScores(0.1, 12.1),
    'breakout': ReferenceScores(1.7, 30.5),
    'centipede': ReferenceScores(2090.9, 12017.0),
    'chopper_command': ReferenceScores(811.0, 7387.8),
    'crazy_climber': ReferenceScores(10780.5, 35829.4),
    'defender': ReferenceScores(2874.5, 18688.9),
    'demon_attack': ReferenceScores(152.1, 1971.0),
    'double_dunk': ReferenceScores(-18.6, -16.4),
    'enduro': ReferenceScores(0.0, 860.5),
    'fishing_derby': ReferenceScores(-91.7, -38.7),
    'freeway': ReferenceScores(0.0, 29.6),
    'frostbite': ReferenceScores(65.2, 4334.7),
    'gopher': ReferenceScores(257.6, 2412.5),
    'gravitar': ReferenceScores(173.0, 3351.4),
    'hero': ReferenceScores(1027.0, 30826.4),
    'ice_hockey': ReferenceScores(-11.2, 0.9),
    'jamesbond': ReferenceScores(29.0, 302.8),
    'kangaroo': ReferenceScores(52.0, 3035.0),
    'krull': ReferenceScores(1598.0, 2665.5),
    'kung_fu_master': ReferenceScores(258.5, 22736.3),
    'montezuma_revenge': ReferenceScores(0.0, 4753.3),
    'ms_pacman': ReferenceScores(307.3, 6951.6),
    'name_this_game': ReferenceScores(2292.3, 8049.0),
    'phoenix': ReferenceScores(761.4, 7242.6),
    'pitfall': ReferenceScores(-229.4, 6463.7),
    'pong': ReferenceScores(-20.7, 14.6),
    'private_eye': ReferenceScores(24.9, 69571.3),
    'qbert': ReferenceScores(163.9, 13455.0),
    'riverraid': ReferenceScores(1338.5, 17118.0),
    'road_runner': ReferenceScores(11.5, 7845.0),
    'robotank': ReferenceScores(2.2, 11.9),
    'seaquest': ReferenceScores(68.4, 42054.7),
    'skiing': ReferenceScores(-17098.1, -4336.9),
    'solaris': ReferenceScores(1236.3, 12326.7),
    'space_invaders': ReferenceScores(148.0, 1668.7),
    'star_gunner': ReferenceScores(664.0, 10250.0),
    'surround': ReferenceScores(-10.0, 6.5),
    'tennis': ReferenceScores(-23.8, -8.3),
    'time_pilot': ReferenceScores(3568.0, 5229.2),
    'tutankham': ReferenceScores(11.4, 167.6),
    'up_n_down': ReferenceScores(533.4, 11693.2),
    'venture': ReferenceScores(0.0, 1187.5),
    # Random above human under some other protocols (not this one).
    'video_pinball': ReferenceScores(16256.9, 17667.9),
    'wizard_of_wor': ReferenceScores(563.5, 4756.5),
    'yars_revenge': ReferenceScores(3092.9, 54576.9),
    'zaxxon': ReferenceScores(32.5, 9173.3),
}


def reference(game: str) -> ReferenceScores:
  """A game's reference scores; a ValueError naming the accepted games for an unknown one."""
  if game not in REFERENCE_SCORES:
    raise ValueError(f'No reference scores for Atari game {game!r}; games: {", ".join(sorted(REFERENCE_SCORES))}.')
  return REFERENCE_SCORES[game]


def game_of(env_spec: str) -> Optional[str]:
  """The game of an `atari:<game>` spec with reference scores, else None (other families have none)."""
  family, _, game = env_spec.partition(':')
  return game if family == 'atari' and game in REFERENCE_SCORES else None


def human_normalised(game: str, score: float) -> float:
  """(score - random) / (human - random): 0 at the random agent's score, 1 at the human tester's."""
  scores = reference(game)
  return (score - scores.random) / (scores.human - scores.random)


def human_normalised_improvement(game: str, score: float, baseline: float) -> float:
  """Wang et al. 2016's improvement of `score` over `baseline`'s: (score - baseline) / (max(human, baseline) -
  random); positive when `score` is higher."""
  scores = reference(game)
  return (score - baseline) / (max(scores.human, baseline) - scores.random)
