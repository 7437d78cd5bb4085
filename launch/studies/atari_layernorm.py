"""Layer norm on Atari (figure 7): human-normalised score improvement per game."""

from typing import Dict, List, Sequence, Tuple

from environments import atari, atari_scores
from launch.studies.grid import Cell, Row, Study, StudyLayout, StudyOptions, train_flags
from probes import evaluation
from probes.figures import aggregate
from probes.figures import study_plots
from probes.records.run_dir import RunLayout

ATARI_GAMES = {'smoke': ('pong',), 'cpu': ('pong', 'breakout', 'boxing'), 'paper': atari.GAMES}
# No plasticity probes (figure 7 is about scores; attach an evaluator to a run for its probes). Training frames:
# (min_replay_size + learner steps x batch / samples_per_insert) x 4, as probes.evaluation.FrameSchedule counts them.
ATARI_SCALES = {
    'smoke': dict(num_actors=1, max_learner_steps=100, min_replay_size=500, replay_capacity=2_000, log_every=50,
                  checkpoint_every=100, target_update_period=100, eval_every_frames=2_000, eval_frames=500),
    # 25,000 updates after 10,000 random transitions: 440,000 frames (the paper: 200 million).
    'cpu': dict(num_actors=1, max_learner_steps=25_000, min_replay_size=10_000, eval_every_frames=100_000,
                eval_frames=25_000),
    # Appendix A.3: 200 million frames = 50 million agent steps = 12.5 million updates of the atari preset,
    # evaluated as DQN Zoo does (every million frames, 500,000 frames at epsilon 0.01).
    'paper': dict(max_learner_steps=12_500_000, eval_every_frames=1_000_000, eval_frames=500_000),
}
ATARI_VARIANTS = {'baseline': {}, 'layernorm': {'interventions': 'layernorm'}}


def atari_cells(scale: str, options: StudyOptions) -> Tuple[List[Cell], Dict[str, str]]:
  games = options.games or ATARI_GAMES[scale]
  unknown = [game for game in games if game not in atari.GAMES]
  if unknown:
    raise ValueError(f'Unknown game(s) {", ".join(unknown)} (--games); accepted: {", ".join(atari.GAMES)}.')
  return [Cell(f'{game}-{variant}', {'game': game, 'variant': variant},
               {**ATARI_SCALES[scale], 'env': f'atari:{game}', 'probe_every': 0, **args})
          for game in games for variant, args in ATARI_VARIANTS.items()], {}


def atari_measure(cell: Cell, run_dir: str) -> Row:
  """The run's score: the mean return of its last evaluation."""
  final = evaluation.final_evaluation(RunLayout(run_dir).records(RunLayout.EVALUATION))
  return {'score': final['mean_return'], 'human_normalised': final.get('human_normalised'),
          'evaluated_frames': final['frames'], 'learner_step': final['learner_step']}


def improvements(summary: Sequence[Row]) -> List[Row]:
  """Per game, layer norm's human-normalised improvement over the baseline (Wang et al. 2016), from the mean
  scores over seeds."""
  table = []
  for game in dict.fromkeys(s['game'] for s in summary):
    means = {s['variant']: s['score_mean'] for s in summary if s['game'] == game}
    if means.get('baseline') is None or means.get('layernorm') is None:
      continue
    scores = atari_scores.reference(game)
    table.append({'game': game, 'baseline': means['baseline'], 'layernorm': means['layernorm'],
                  'random': scores.random, 'human': scores.human,
                  'improvement': atari_scores.human_normalised_improvement(game, means['layernorm'],
                                                                           means['baseline'])})
  return sorted(table, key=lambda row: row['improvement'])


def atari_aggregate(layout: StudyLayout, rows: List[Row], scale: str) -> List[str]:
  summary = aggregate.summarize(rows, ('game', 'variant'), ('score', 'human_normalised'))
  table = improvements(summary)
  written = aggregate.write_table(summary, layout.table('summary')) + aggregate.write_table(
      table, layout.table('improvement'))
  if table:
    written.append(study_plots.save(study_plots.improvement_bars(table), layout.figure('atari_layernorm')))
  return written


STUDY = Study('atari_layernorm', 'figure 7', atari_cells, {'smoke': 1, 'cpu': 1, 'paper': 3},
                                     train_flags, atari_measure, atari_aggregate, takes_games=True)
