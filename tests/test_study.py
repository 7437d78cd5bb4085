"""Studies: the aggregation on hand-made records, the grid's checks, and a real study killed and resumed."""

import json
import math
import os
import shutil
import signal
import threading
import time

from rich.console import Console
import numpy as np
import pytest

from launch.program import run_lock
from launch.studies import runner as study_runner
from launch.studies.atari_layernorm import improvements
from launch.studies.brownian import brownian_cells
from launch.studies.falsification import FIGURE3_PAIRS, falsification_cells, falsification_tables
from launch.studies.grid import SCALES, TRAIN_SCALES, Cell, StudyLayout, StudyOptions, grid_differences, grid_record
from launch.studies.interventions import INTERVENTION_COLUMNS, interventions_aggregate, interventions_cells
from launch.studies.optimizer_regime import REGIME_MEASURES, regime_table
from launch.studies.registry import STUDIES
from launch.studies.width import width_cells
from probes.figures import aggregate
from probes.records.loggers import read_jsonl
from probes.records.run_dir import RunLayout
from tests.conftest import leftover_processes, python_module, run_module, wait_for


def test_summary_is_mean_standard_error_and_count_per_cell():
  rows = [{'cell': 'a', 'x': 1.0}, {'cell': 'a', 'x': 3.0}, {'cell': 'a', 'x': None}, {'cell': 'b', 'x': 5.0},
          {'cell': 'b', 'x': float('nan')}]
  a, b = aggregate.summarize(rows, ('cell',), ('x',))
  # Cell a: mean 2, sample std sqrt(2), standard error sqrt(2)/sqrt(2) = 1, 2 seeds measured of 3 runs.
  assert a == {'cell': 'a', 'runs': 3, 'x_mean': 2.0, 'x_stderr': pytest.approx(1.0), 'x_n': 2}
  assert b == {'cell': 'b', 'runs': 2, 'x_mean': 5.0, 'x_stderr': None, 'x_n': 1}


def test_correlation_sign_flips_across_settings_as_built():
  rows = ([{'setting': 'up', 'change_norm': x, 'plasticity_loss': 2 * x + 1} for x in (1.0, 2.0, 3.0)] +
          [{'setting': 'down', 'change_norm': x, 'plasticity_loss': -x} for x in (1.0, 2.0, 4.0)] +
          [{'setting': 'few', 'change_norm': x, 'plasticity_loss': x} for x in (1.0, 2.0)] +
          [{'setting': 'flat', 'change_norm': 1.0, 'plasticity_loss': y} for y in (1.0, 2.0, 3.0)])
  table = {entry['setting']: entry for entry in aggregate.correlations(rows, 'setting', ['change_norm'])}
  assert table['up']['correlation'] == pytest.approx(1.0) and table['up']['sign'] == '+'
  assert table['down']['correlation'] == pytest.approx(-1.0) and table['down']['sign'] == '-'
  assert table['few'] == {'setting': 'few', 'statistic': 'change_norm', 'runs': 2, 'correlation': None, 'sign': None,
                          'stderr': None, 'separated': None}
  assert table['up']['stderr'] == pytest.approx(0.0, abs=1e-6) and table['up']['separated'] is True
  assert table['flat']['correlation'] is None  # A constant statistic has no correlation.
  # A hand computation: x = (0, 1, 3), y = (1, 0, 2): r = cov / (sx sy) = 1.5 / sqrt(4.667 * 1) ... exactly:
  x, y = np.array([0.0, 1.0, 3.0]), np.array([1.0, 0.0, 2.0])
  expected = np.sum((x - x.mean()) * (y - y.mean())) / math.sqrt(np.sum((x - x.mean())**2) * np.sum((y - y.mean())**2))
  rows = [{'setting': 's', 'c': a, 'plasticity_loss': b} for a, b in zip(x, y)]
  entry = aggregate.correlations(rows, 'setting', ['c'])[0]
  assert entry['correlation'] == pytest.approx(expected)
  assert expected == pytest.approx(0.6547, abs=1e-4)
  # Its standard error sqrt((1 - r^2) / (3 - 2)) = 0.756: r is within two of them of 0.
  assert entry['stderr'] == pytest.approx(math.sqrt(1 - expected**2)) and entry['separated'] is False


def test_heatmap_grid_places_each_cell_and_leaves_missing_ones_empty():
  summaries = aggregate.summarize([{'arch': 'mlp', 'column': 'none', 'loss': 0.5},
                                   {'arch': 'mlp', 'column': 'none', 'loss': 0.7},
                                   {'arch': 'cnn', 'column': 'layernorm', 'loss': 0.1}], ('arch', 'column'), ('loss',))
  rows, columns, means, stderrs = aggregate.grid(summaries, 'arch', 'column', 'loss', ['mlp', 'cnn'],
                                                 ['none', 'layernorm'])
  assert rows == ['mlp', 'cnn'] and columns == ['none', 'layernorm']
  np.testing.assert_allclose(means, [[0.6, np.nan], [np.nan, 0.1]])
  np.testing.assert_allclose(stderrs, [[0.1, np.nan], [np.nan, np.nan]])


def test_human_normalised_improvement_of_layer_norm_per_game_by_hand():
  summary = aggregate.summarize([
      {'game': 'breakout', 'variant': 'baseline', 'score': 8.0}, {'game': 'breakout', 'variant': 'baseline',
                                                                   'score': 12.0},
      {'game': 'breakout', 'variant': 'layernorm', 'score': 20.0},
      {'game': 'pong', 'variant': 'baseline', 'score': 0.0}, {'game': 'pong', 'variant': 'layernorm', 'score': -10.0},
      {'game': 'boxing', 'variant': 'baseline', 'score': 50.0}], ('game', 'variant'), ('score',))
  table = {row['game']: row for row in improvements(summary)}
  assert set(table) == {'breakout', 'pong'}  # Boxing has no layer-norm run.
  # Breakout: random 1.7, human 30.5; baseline mean 10: (20 - 10) / (max(30.5, 10) - 1.7) = 10 / 28.8.
  assert table['breakout']['improvement'] == pytest.approx(10 / 28.8)
  # Pong: random -20.7, human 14.6: (-10 - 0) / (14.6 + 20.7).
  assert table['pong']['improvement'] == pytest.approx(-10 / 35.3)
  assert [row['game'] for row in improvements(summary)] == ['pong', 'breakout']  # Sorted, as figure 7.


def test_tables_round_trip(tmp_path):
  rows = [{'cell': 'a', 'values': [1, 2]}, {'cell': 'b', 'extra': 3.5}]
  csv_path, jsonl_path = aggregate.write_table(rows, str(tmp_path / 'results'))
  assert read_jsonl(jsonl_path) == rows
  assert open(csv_path).read().splitlines() == ['cell,values,extra', 'a,"[1, 2]",', 'b,,3.5']


def test_grids_of_every_study_and_scale_are_well_formed():
  for name in STUDIES:
    definition = STUDIES.get(name)
    accepted = definition.settable()
    for scale in SCALES:
      cells, _ = definition.cells(scale, StudyOptions())
      assert cells, (name, scale)
      assert len({c.name for c in cells}) == len(cells)
      for cell in cells:
        assert set(cell.args) <= set(accepted), (name, scale, set(cell.args) - set(accepted))
        assert all(isinstance(v, accepted[k]) or (accepted[k] is float and isinstance(v, int)) or
                   (accepted[k] is tuple and isinstance(v, str)) for k, v in cell.args.items() if v is not None)


def test_a_studys_data_dir_reaches_every_run_over_dataset_observations(tmp_path, monkeypatch):
  monkeypatch.setenv('PLASTICITY_DOWNLOAD', '0')
  data_dir = str(tmp_path)  # Holds no CIFAR-10: those cells are skipped; MNIST's run with the directory given.
  for name in ('interventions', 'falsification', 'width', 'optimizer_instability', 'brownian'):
    cells, _ = STUDIES.get(name).cells('smoke', StudyOptions(data_dir=data_dir))
    assert cells and all(cell.args.get('data_dir') == data_dir for cell in cells), name


def test_paper_scale_is_the_papers_settings():
  cells, _ = interventions_cells('paper', StudyOptions())
  assert {c.axes['arch'] for c in cells} == {'mlp', 'cnn', 'resnet18', 'vit'}
  # Every intervention crossed with both encodings (figures 8, 9), and the two target-update interventions probed
  # after they act, with both encodings too.
  assert len(cells) == 4 * (7 + 2) * 2
  assert {c.args['max_learner_steps'] for c in cells} == {1_000_000}
  for cell in cells:  # A million steps take the values near 100: the categorical support holds the probe's +-1.
    assert (cell.args.get('support_max'), cell.args.get('support_min')) == (
        (110.0, -110.0) if cell.axes['output'] == 'two_hot' else (None, None))
  assert TRAIN_SCALES['paper'] == {'max_learner_steps': 100_000}  # Probes: the defaults, 2,000 steps / 5,000.
  widths = {(c.axes['arch'], c.axes['width_factor']): c.args['width_multiplier']
            for c in width_cells('paper', StudyOptions())[0]}
  assert {f: round(w * 512) for (a, f), w in widths.items() if a == 'mlp'} == {f: 16 * f for f in (1, 2, 4, 8, 12, 16)}
  assert {f: w for (a, f), w in widths.items() if a == 'cnn'} == {1: 1.0, 2: 2.0, 4: 4.0}  # Scaled up (section 5.1).
  brownian, _ = brownian_cells('paper', StudyOptions())
  assert brownian[0].args['steps'] >= 25_000  # Figure 2: after 5 target updates of 5,000 steps.
  falsification, _ = falsification_cells('paper', StudyOptions(data_dir=None))
  main = [c for c in falsification if c.axes['set'] == 'main']
  assert {(c.axes['arch'], c.axes['variant']) for c in main} == {(a, o) for a in ('mlp', 'cnn')
                                                                 for o in ('adam', 'rmsprop')}
  extra = {(c.axes['arch'], c.axes['variant']) for c in falsification if c.axes['set'] == 'extra'}
  assert extra == {('mlp', 'rmsprop+layernorm'), ('cnn', 'rmsprop+layernorm'), ('resnet18', 'rmsprop'),
                   ('vit', 'rmsprop')}
  # Each optimizer with its own learning rate, whatever the preset's.
  assert {(c.args['optimizer'], c.args['learning_rate']) for c in falsification} == {('adam', 1e-3),
                                                                                   ('rmsprop', 2.5e-4)}


def test_cpu_scale_runs_every_intervention_on_the_mlp_and_the_eighth_width_cnn_and_says_why_others_are_skipped():
  cells, skipped = interventions_cells('cpu', StudyOptions())
  # Each column and the two probed after their hooks: the MLP under the mdp preset's RMSProp and under Adam (units
  # die), the eighth-width CNN under RMSProp.
  columns = len(INTERVENTION_COLUMNS) + 2
  assert [c.axes['arch'] for c in cells] == ['mlp'] * 2 * columns + ['cnn'] * columns
  assert {c.args['width_multiplier'] for c in cells if c.axes['arch'] == 'cnn'} == {0.125}
  assert {(c.axes['optimizer'], c.args['optimizer'], c.args['learning_rate']) for c in cells} == {
      ('rmsprop', 'rmsprop', 2.5e-4), ('adam', 'adam', 1e-3)}
  after = {c.name: c for c in cells if c.axes['probed'] == 'after'}
  assert sorted(after) == ['cnn-reset_last_layer_probed_after', 'cnn-shrink_and_perturb_probed_after',
                           'mlp-adam-reset_last_layer_probed_after', 'mlp-adam-shrink_and_perturb_probed_after',
                           'mlp-reset_last_layer_probed_after', 'mlp-shrink_and_perturb_probed_after']
  assert all(c.args['probe_after_interventions'] is True for c in after.values())
  assert not any('probe_after_interventions' in c.args for c in cells if c.axes['probed'] == 'before')
  assert sorted(skipped) == ['resnet18-*', 'vit-*'] and all('paper' in reason for reason in skipped.values())
  falsification, _ = falsification_cells('cpu', StudyOptions())
  assert {c.axes['arch'] for c in falsification} == {'mlp', 'cnn'}
  assert {c.args['width_multiplier'] for c in falsification if c.axes['arch'] == 'cnn'} == {0.125}
  assert {(c.args['probe_every'], c.args['max_learner_steps']) for c in falsification} == {(10_000, 10_000)}


def test_interventions_table_puts_the_probed_after_cells_in_columns_of_their_own(tmp_path):
  rows = [{'arch': 'mlp', 'intervention': i, 'output': o, 'probed': p, 'optimizer': opt, 'plasticity_loss': loss,
           'probe_step': 100}
          for i, o, p, opt, loss in (('none', 'regress', 'before', 'rmsprop', 0.2),
                                     ('none', 'two_hot', 'before', 'rmsprop', 0.1),
                                     ('reset_last_layer', 'regress', 'before', 'rmsprop', 0.05),
                                     ('reset_last_layer', 'regress', 'after', 'rmsprop', 0.3),
                                     ('none', 'regress', 'before', 'adam', 0.0))]
  interventions_aggregate(StudyLayout(str(tmp_path)), rows, 'cpu')
  summary = {(s['row'], s['column']): s['plasticity_loss_mean'] for s in read_jsonl(
      str(tmp_path / 'summary.jsonl'))}
  assert summary == {('mlp', 'none'): 0.2, ('mlp', 'two_hot'): 0.1, ('mlp', 'reset_last_layer'): 0.05,
                     ('mlp', 'reset_last_layer_probed_after'): 0.3, ('mlp (adam)', 'none'): 0.0}
  assert os.path.exists(tmp_path / 'interventions.png')


def test_a_column_against_no_intervention_is_lower_higher_or_within_two_standard_errors():
  # Seeds of each cell: none (0.19, 0.21): mean 0.2, standard error 0.01; every other cell's standard error 0.01
  # too, so the difference's is 0.01 * sqrt(2) = 0.01414 and two of them 0.0283.
  seeds = {'none': (0.19, 0.21), 'a': (0.09, 0.11), 'b': (0.21, 0.23), 'c': (0.29, 0.31), 'd': (0.1,)}
  rows = [{'row': 'mlp', 'column': column, 'loss': loss} for column, losses in seeds.items() for loss in losses]
  rows += [{'row': 'cnn', 'column': 'a', 'loss': loss} for loss in (0.1, 0.2)]  # No baseline in its row.
  table = {(e['row'], e['column']): e for e in aggregate.against_baseline(
      aggregate.summarize(rows, ('row', 'column'), ('loss',)), 'row', 'column', 'none', 'loss')}
  assert set(table) == {('mlp', 'a'), ('mlp', 'b'), ('mlp', 'c'), ('mlp', 'd'), ('cnn', 'a')}
  assert table['mlp', 'a']['difference'] == pytest.approx(-0.1)
  assert table['mlp', 'a']['difference_stderr'] == pytest.approx(0.01 * math.sqrt(2))
  assert table['mlp', 'a']['direction'] == 'lower'
  assert table['mlp', 'b']['direction'] == 'within'  # 0.02 apart: under 0.0283.
  assert table['mlp', 'c']['direction'] == 'higher'
  assert table['mlp', 'd']['difference'] == pytest.approx(-0.1) and table['mlp', 'd']['direction'] is None
  assert table['cnn', 'a']['difference'] is None and table['cnn', 'a']['direction'] is None


def test_interventions_mark_each_column_against_the_papers_claim(tmp_path):
  # Two seeds per cell, 0.01 apart: standard error 0.005, of a difference 0.0071.
  losses = {('none', 'regress', 'before'): 0.2, ('layernorm', 'regress', 'before'): 0.05,
            ('weight_decay', 'regress', 'before'): 0.1, ('reset_optimizer', 'regress', 'before'): 0.2,
            ('none', 'two_hot', 'before'): 0.2, ('reset_last_layer', 'regress', 'after'): 0.3,
            ('spectral_norm', 'regress', 'before'): 0.1}
  rows = [{'arch': 'mlp', 'intervention': i, 'output': o, 'probed': p, 'optimizer': 'rmsprop',
           'plasticity_loss': loss + delta, 'probe_step': 100}
          for (i, o, p), loss in losses.items() for delta in (-0.005, 0.005)]
  interventions_aggregate(StudyLayout(str(tmp_path)), rows, 'cpu')
  table = {e['column']: (e['paper_claim'], e['direction'], e['verdict'])
           for e in read_jsonl(str(tmp_path / 'against_paper.jsonl'))}
  assert table == {'layernorm': ('lower', 'lower', 'agrees'),  # The paper's main finding, reproduced.
                   'weight_decay': ('not lower', 'lower', 'disagrees'),
                   'reset_optimizer': ('not lower', 'within', 'agrees'),
                   'two_hot': ('lower', 'within', 'unclear'),
                   'reset_last_layer_probed_after': ('lower', 'higher', 'disagrees'),
                   'spectral_norm': (None, 'lower', None)}


def test_a_column_that_had_less_to_lose_than_none_lost_is_at_the_floor_not_a_verdict(tmp_path):
  # none loses 0.2 of its P(theta_0) 0.5; two-hot and weight decay start at 0.01 and 0.05: even losing all of it, they
  # would lose less than none did, so their lower losses show nothing. Layer norm starts at 0.5 too: a verdict.
  cells = {('none', 'regress'): (0.2, 0.5), ('none', 'two_hot'): (0.0, 0.01), ('layernorm', 'regress'): (0.05, 0.5),
           ('weight_decay', 'regress'): (0.03, 0.05)}
  rows = [{'arch': 'cnn', 'intervention': i, 'output': o, 'probed': 'before', 'optimizer': 'rmsprop',
           'plasticity_loss': loss + delta, 'initial_plasticity': start, 'probe_step': 100}
          for (i, o), (loss, start) in cells.items() for delta in (-0.005, 0.005)]
  interventions_aggregate(StudyLayout(str(tmp_path)), rows, 'cpu')
  table = {e['column']: (e['direction'], e['floor'], e['initial_plasticity_mean'], e['verdict'])
           for e in read_jsonl(str(tmp_path / 'against_paper.jsonl'))}
  assert table == {'two_hot': ('lower', True, pytest.approx(0.01), 'unclear'),
                   'weight_decay': ('lower', True, pytest.approx(0.05), 'unclear'),  # Not 'disagrees'.
                   'layernorm': ('lower', False, pytest.approx(0.5), 'agrees')}


def _falsification_row(dataset, difficulty, norm, loss, rank=10.0, srank=None):
  return {'set': 'main', 'setting': f'{dataset}:{difficulty}', 'dataset': dataset, 'difficulty': difficulty,
          'arch': 'mlp', 'variant': 'adam', 'final_parameter_norm': norm, 'final_feature_rank': rank,
          'final_weight_srank_mean': srank, 'change_parameter_norm': norm, 'plasticity_loss': loss}


def test_figure_3_correlates_values_at_the_end_within_each_value_of_a_factor():
  """Built so that weight norm goes with loss on MNIST and against it on CIFAR-10 (the paper's figure 3): the sign
  flips across the observation space; across tasks (both tasks hold both signs) each correlation is weaker."""
  rows = ([_falsification_row('mnist', d, x, 0.1 * x) for d, x in (('easy', 1.0), ('easy', 2.0), ('hard', 3.0))] +
          [_falsification_row('cifar10', d, x, -0.1 * x) for d, x in (('easy', 1.0), ('hard', 2.0), ('hard', 4.0))])
  tables = falsification_tables(rows)
  by_value = {(e['statistic'], e['factor'], e['value']): e for e in tables['correlations']}
  assert by_value[('parameter_norm', 'dataset', 'mnist')]['correlation'] == pytest.approx(1.0)
  assert by_value[('parameter_norm', 'dataset', 'cifar10')]['correlation'] == pytest.approx(-1.0)
  assert by_value[('parameter_norm', 'dataset', 'mnist')]['papers_pairing'] is True
  assert by_value[('parameter_norm', 'arch', 'mlp')]['papers_pairing'] is False
  assert by_value[('feature_rank', 'dataset', 'mnist')]['correlation'] is None  # A constant statistic.
  flips = {(e['statistic'], e['factor']): e for e in tables['sign_flips']}
  assert flips[('parameter_norm', 'dataset')]['flips'] is True and flips[('parameter_norm', 'dataset')]['signs'] == '+-'
  assert flips[('parameter_norm', 'arch')]['flips'] is None  # One architecture: no flip can be seen.
  assert flips[('feature_rank', 'difficulty')]['flips'] is None
  # The change version per setting, kept beside: mnist:easy has 2 runs (no correlation), the others 1.
  assert {e['setting'] for e in tables['correlations_change']} == {'mnist:easy', 'mnist:hard', 'cifar10:easy',
                                                                    'cifar10:hard'}


def test_figure_3_verdicts_need_correlations_two_standard_errors_from_zero():
  """The paper's claim per pairing (its correlation's sign flips across the factor), built to be read off:
  weight norm +1 on MNIST and -1 on CIFAR-10 (each exact: a standard error of 0): `agrees`; feature rank +1 within
  both tasks: `disagrees`; weight srank -1 on CIFAR-10 but 0.5 on MNIST (3 runs: a standard error of 0.87): the
  flip is not shown, nor its absence: `unclear`; dead units, one architecture: no verdict."""
  built = [('mnist', 'easy', 1.0, 1.0), ('mnist', 'easy', 2.0, 3.0), ('mnist', 'hard', 3.0, 2.0),
           ('cifar10', 'easy', 1.0, 1.0), ('cifar10', 'hard', 2.0, 2.0), ('cifar10', 'hard', 4.0, 4.0)]
  rows = []
  for dataset, difficulty, x, srank in built:
    sign = 1.0 if dataset == 'mnist' else -1.0
    rows.append(_falsification_row(dataset, difficulty, x, sign * 0.1 * x, rank=sign * x, srank=srank))
  tables = falsification_tables(rows)
  by_value = {(e['statistic'], e['factor'], e['value']): e for e in tables['correlations']}
  assert by_value[('weight_srank_mean', 'dataset', 'mnist')]['correlation'] == pytest.approx(0.5)
  assert by_value[('weight_srank_mean', 'dataset', 'mnist')]['stderr'] == pytest.approx(math.sqrt(0.75))
  assert by_value[('weight_srank_mean', 'dataset', 'mnist')]['separated'] is False
  assert by_value[('feature_rank', 'difficulty', 'hard')]['correlation'] == pytest.approx(1.0)
  flips = {(e['statistic'], e['factor']): e for e in tables['sign_flips']}
  verdicts = {pair: flips[pair]['verdict'] for pair in FIGURE3_PAIRS}
  assert verdicts == {('parameter_norm', 'dataset'): 'agrees', ('feature_rank', 'difficulty'): 'disagrees',
                      ('weight_srank_mean', 'dataset'): 'unclear', ('dead_unit_fraction', 'arch'): None}
  assert flips[('weight_srank_mean', 'dataset')]['signs'] == '+-'  # The raw signs flip; beyond noise, one.
  assert flips[('weight_srank_mean', 'dataset')]['separated_signs'] == '-'
  assert flips[('parameter_norm', 'difficulty')]['verdict'] is None  # Not a pairing the paper draws.


def test_the_optimizer_regime_table_says_where_units_live_and_plasticity_is_lost():
  summary = aggregate.summarize(
      [{'env': 'e', 'optimizer': o, 'final_dead_unit_fraction': d, 'plasticity_loss': loss}
       for o, d, loss in (('adam', 0.4, 0.20), ('adam', 0.5, 0.22), ('tuned', 0.01, 0.10), ('tuned', 0.0, 0.12),
                       ('rms', 0.0, 0.01), ('rms', 0.0, -0.01))], ('env', 'optimizer'), REGIME_MEASURES)
  table = {row['optimizer']: row for row in regime_table(summary)}
  assert (table['adam']['units_alive'], table['adam']['plasticity_lost'], table['adam']['papers_regime']) == (
      False, True, False)
  # tuned: loss 0.11 +- 0.01, more than two standard errors above 0; alive.
  assert (table['tuned']['units_alive'], table['tuned']['plasticity_lost'], table['tuned']['papers_regime']) == (
      True, True, True)
  assert table['rms']['plasticity_lost'] is False


def test_cifar_cells_are_skipped_with_the_reason_when_its_data_is_absent(tmp_path, monkeypatch):
  monkeypatch.setenv('PLASTICITY_DOWNLOAD', '0')
  monkeypatch.setenv('PLASTICITY_CACHE_DIR', str(tmp_path))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  cells, skipped = falsification_cells('smoke', StudyOptions())
  assert {c.axes['setting'] for c in cells} == {'mnist:easy', 'mnist:hard', 'mnist:sparse'}
  assert skipped and all(name.startswith('cifar10-') for name in skipped)
  assert 'cifar-10-batches-py' in next(iter(skipped.values()))


def test_grid_differences_name_each_difference():
  definition = STUDIES.get('interventions')
  cells, _ = definition.cells('smoke', StudyOptions())
  old = grid_record(definition, 'smoke', 1, cells[:2], {})
  new = grid_record(definition, 'smoke', 2, [cells[0].with_args(max_learner_steps=500), cells[2]], {})
  assert grid_differences(old, old) == []
  assert grid_differences(old, new) == [
      'seeds: 1 there, 2 now', f'cell {cells[1].name} only there', f'cell {cells[2].name} only now',
      f'cell {cells[0].name}: --max_learner_steps=300 there, 500 now']
  # Growing: more seeds and cells are no difference; fewer, a cell gone or changed arguments are.
  grown = grid_record(definition, 'smoke', 3, cells[:3], {})
  assert grid_differences(old, grown, growing=True) == []
  assert grid_differences(grown, old, growing=True) == ['seeds: 3 there, 1 now', f'cell {cells[2].name} only there']
  assert grid_differences(old, new, growing=True) == [
      f'cell {cells[1].name} only there', f'cell {cells[0].name}: --max_learner_steps=300 there, 500 now']


def test_a_study_grows_by_more_cells_and_seeds_keeping_its_finished_runs(tmp_path):
  out = str(tmp_path / 'study')
  layout = StudyLayout(out)
  study_runner.prepare('interventions', 'smoke', out, seeds=1, cells=['mlp-none'])
  state = json.loads(open(layout.state).read())
  state['runs']['mlp-none/seed0'].update(state='finished', exit_code=0, elapsed_s=12.0)
  open(layout.state, 'w').write(json.dumps(state))
  grown = study_runner.prepare('interventions', 'smoke', out, seeds=2, cells=['mlp-none', 'mlp-layernorm'])
  assert [run.key for run in grown.runs] == ['mlp-none/seed0', 'mlp-none/seed1', 'mlp-layernorm/seed0',
                                             'mlp-layernorm/seed1']
  on_disk = json.loads(open(layout.state).read())
  assert on_disk == grown.state and on_disk['grid']['seeds'] == 2
  assert sorted(on_disk['grid']['cells']) == ['mlp-layernorm', 'mlp-none']
  assert on_disk['runs']['mlp-none/seed0'] == state['runs']['mlp-none/seed0']  # Kept as it was: not run again.
  assert [on_disk['runs'][key]['state'] for key in ('mlp-none/seed1', 'mlp-layernorm/seed0', 'mlp-layernorm/seed1')
          ] == ['pending'] * 3
  # What growing does not explain is refused, naming it, and study.json is left as it was.
  before = open(layout.state).read()
  assert 'cell mlp-none only there' in _error(out_dir=out, seeds=2, cells=['mlp-layernorm'])
  assert 'seeds: 2 there, 1 now' in _error(out_dir=out, seeds=1, cells=['mlp-none', 'mlp-layernorm'])
  assert 'adding cells or seeds grows it' in _error(out_dir=out, seeds=2, cells=['mlp-none', 'mlp-layernorm'],
                                                     sets=['max_learner_steps=500'])
  assert open(layout.state).read() == before


def _finished_study(out: str, cells, seeds: int, losses) -> None:
  """A study directory whose runs finished, each with probe records of a known plasticity loss (losses[key])."""
  from agents.config import AgentConfig
  from probes.records.run_dir import ExperimentConfig, write_or_check_config
  prepared = study_runner.prepare('interventions', 'smoke', out, seeds=seeds, cells=cells)
  for run in prepared.runs:
    write_or_check_config(ExperimentConfig(run_dir=run.run_dir, agent=AgentConfig()))
    probes = RunLayout(run.run_dir).logger(RunLayout.PROBES, 'evaluator', tensorboard=False)
    for step, plasticity in ((0, 0.5), (300, 0.5 - losses[run.key])):
      probes({'learner_step': step, 'plasticity': plasticity, 'plasticity_loss': 0.5 - plasticity})
    prepared.state['runs'][run.key].update(state='finished', exit_code=0)
  study_runner._write_state(prepared.layout, prepared.state)


def test_combined_study_directories_aggregate_as_one_study_and_refuse_what_would_not_be_one(tmp_path):
  # mlp-none at two seeds in one directory (0.1, 0.3: mean 0.2), mlp-layernorm at one seed in another (0.05).
  first, second, out = (str(tmp_path / name) for name in ('first', 'second', 'combined'))
  _finished_study(first, ['mlp-none'], 2, {'mlp-none/seed0': 0.1, 'mlp-none/seed1': 0.3})
  _finished_study(second, ['mlp-layernorm'], 1, {'mlp-layernorm/seed0': 0.05})
  study, scale, rows = study_runner.combine([first, second], out, Console())
  assert (study.name, scale) == ('interventions', 'smoke') and not os.path.exists(out)
  assert sorted((r['cell'], r['seed'], round(r['plasticity_loss'], 6)) for r in rows) == [
      ('mlp-layernorm', 0, 0.05), ('mlp-none', 0, 0.1), ('mlp-none', 1, 0.3)]
  tables = str(tmp_path / 'tables')
  interventions_aggregate(StudyLayout(tables), rows, scale)
  summary = {s['column']: (s['plasticity_loss_mean'], s['runs']) for s in read_jsonl(tables + '/summary.jsonl')}
  assert summary == {'none': (pytest.approx(0.2), 2), 'layernorm': (pytest.approx(0.05), 1)}
  # Refused, naming what: a run in two directories (it would count twice), a cell whose flags differ, another
  # study, and an --out_dir that is a study (its own tables) or holds someone else's files.
  again = str(tmp_path / 'again')
  _finished_study(again, ['mlp-none'], 1, {'mlp-none/seed0': 0.1})
  with pytest.raises(ValueError, match=f'run mlp-none/seed0 is in both {first} and {again}: it would count twice'):
    study_runner.combine([first, again], out, Console())
  changed = str(tmp_path / 'changed')
  study_runner.prepare('interventions', 'smoke', changed, seeds=3, cells=['mlp-none'], sets=['max_learner_steps=500'])
  with pytest.raises(ValueError, match=f'cell mlp-none is not one cell: --max_learner_steps=300 in {first}, 500 in '
                     f'{changed}'):
    study_runner.combine([first, changed], out, Console())
  other = str(tmp_path / 'other')
  study_runner.prepare('width', 'smoke', other, cells=['mlp-mnist-period100-x1'])
  with pytest.raises(ValueError, match=f'one study at one scale; got {first}: interventions at smoke; {other}: '
                     'width at smoke'):
    study_runner.combine([first, other], out, Console())
  with pytest.raises(ValueError, match='--study=width, but the --combine directories hold interventions runs'):
    study_runner.combine([first, second], out, Console(), study_name='width')
  with pytest.raises(ValueError, match='--scale=cpu, but the --combine directories were run at smoke'):
    study_runner.combine([first, second], out, Console(), scale='cpu')
  with pytest.raises(ValueError, match='is a study directory: its own tables would be overwritten'):
    study_runner.combine([first, second], first, Console())
  os.makedirs(out)
  (tmp_path / 'combined' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='holds files but no combined_from.json'):
    study_runner.combine([first, second], out, Console())
  with pytest.raises(ValueError, match='holds no study.json: not a study directory'):
    study_runner.combine([first, out], str(tmp_path / 'elsewhere'), Console())
  assert (tmp_path / 'combined' / 'notes.txt').read_text() == 'mine'


def run_study(*args, timeout=120):
  return run_module('launch.study', *args, timeout=timeout)


def _error(**kwargs) -> str:
  with pytest.raises(ValueError) as raised:
    study_runner.prepare(**{'name': 'interventions', 'scale': 'smoke', **kwargs})
  return str(raised.value)


@pytest.mark.slow
def test_bad_inputs_are_clear_errors_and_touch_nothing(tmp_path):
  out = str(tmp_path / 'study')
  assert "Unknown study 'plasticityz' (--study); accepted: atari_layernorm, brownian" in _error(name='plasticityz',
                                                                                                 out_dir=out)
  assert "Unknown scale 'huge' (--scale); accepted: smoke, cpu, paper" in _error(scale='huge', out_dir=out)
  message = _error(cells=['mlp-none', 'mlp-bogus'], out_dir=out)
  assert 'Unknown cell(s) mlp-bogus (--cells)' in message and 'cnn-two_hot' in message
  message = _error(sets=['max_learner_stepz=5'], out_dir=out)
  assert "unknown flag 'max_learner_stepz'" in message and 'max_learner_steps' in message
  assert 'expected FLAG=VALUE' in _error(sets=['max_learner_steps'], out_dir=out)
  assert '--set=max_learner_steps=many: not a int' in _error(sets=['max_learner_steps=many'], out_dir=out)
  with_default = study_runner.prepare('interventions', 'smoke', out, cells=['mlp-none'], sets=['max_learner_steps=300'])
  without = study_runner.prepare('interventions', 'smoke', out, cells=['mlp-none'])
  assert with_default.state['grid'] == without.state['grid']
  shutil.rmtree(out)
  message = _error(name='atari_layernorm', games=['pong', 'pongg'], out_dir=out)
  assert 'Unknown game(s) pongg (--games)' in message and 'breakout' in message
  assert '--games applies to atari_layernorm only' in _error(name='width', games=['pong'], out_dir=out)
  assert not os.path.exists(out)
  a_file = tmp_path / 'a_file'
  a_file.write_text('mine')
  assert 'is a file' in _error(out_dir=str(a_file))
  not_a_study = tmp_path / 'other'
  not_a_study.mkdir()
  (not_a_study / 'notes.txt').write_text('mine')
  assert 'not a study directory' in _error(out_dir=str(not_a_study))
  # Through the command: a study directory made by another grid is refused, naming the difference, untouched.
  layout = StudyLayout(out)
  study_runner.prepare('interventions', 'smoke', out, cells=['mlp-none'])
  before = open(layout.state).read()
  result = run_study('--study=interventions', '--cells=mlp-none', '--set=max_learner_steps=500', f'--out_dir={out}')
  assert result.returncode == 1 and 'was made by a different grid' in result.stderr
  assert 'cell mlp-none: --max_learner_steps=300 there, 500 now' in result.stderr
  assert open(layout.state).read() == before and sorted(os.listdir(out)) == ['study.json']


@pytest.mark.slow
def test_the_study_command_combines_directories_into_one_studys_tables(tmp_path):
  first, second, out = (str(tmp_path / name) for name in ('first', 'second', 'combined'))
  _finished_study(first, ['mlp-none'], 2, {'mlp-none/seed0': 0.1, 'mlp-none/seed1': 0.3})
  _finished_study(second, ['mlp-layernorm'], 1, {'mlp-layernorm/seed0': 0.05})
  before = {d: open(StudyLayout(d).state).read() for d in (first, second)}
  refused = run_study(f'--combine={first},{second}', f'--out_dir={out}', '--cells=mlp-none')
  assert refused.returncode == 1 and 'drop --cells' in refused.stderr and not os.path.exists(out)
  result = run_study(f'--combine={first},{second}', f'--out_dir={out}', '--study=interventions')
  assert result.returncode == 0, result.stderr
  assert json.load(open(StudyLayout(out).sources)) == {'study': 'interventions', 'scale': 'smoke',
                                                         'from': [first, second]}
  assert sorted((r['cell'], r['seed']) for r in read_jsonl(out + '/results.jsonl')) == [
      ('mlp-layernorm', 0), ('mlp-none', 0), ('mlp-none', 1)]
  summary = {s['column']: s['plasticity_loss_mean'] for s in read_jsonl(out + '/summary.jsonl')}
  assert summary == {'none': pytest.approx(0.2), 'layernorm': pytest.approx(0.05)}
  assert os.path.exists(StudyLayout(out).figure('interventions')) and not os.path.exists(StudyLayout(out).state)
  assert {d: open(StudyLayout(d).state).read() for d in (first, second)} == before
  rerun = run_study(f'--combine={first},{second}', f'--out_dir={out}')  # Its own earlier tables: redrawn.
  assert rerun.returncode == 0, rerun.stderr


@pytest.mark.slow
def test_a_failing_run_is_reported_while_the_others_finish(tmp_path):
  layout = StudyLayout(str(tmp_path))
  definition = STUDIES.get('optimizer_instability')
  good, _ = definition.cells('smoke', StudyOptions())
  bad = Cell('bad', {'arch': 'mlp'}, {'env': 'mdp:mnist:bogus'})  # launch.train refuses it (exit 1).
  runs = [study_runner.Run(f'{c.name}/seed0', c, 0, layout.run_dir(c.name, 0), layout.log(c.name, 0))
          for c in (bad, good[0])]
  state = {'grid': {'study': 'test'}, 'runs': {r.key: {'state': 'pending'} for r in runs}}
  console = Console(record=True, width=200)
  assert study_runner.execute(layout, state, runs, 2, None, console)
  assert state['runs']['bad/seed0']['state'] == 'failed' and state['runs']['bad/seed0']['exit_code'] == 1
  assert state['runs']['adam/seed0']['state'] == 'finished'
  assert json.load(open(layout.state))['runs'] == state['runs']
  text = console.export_text()
  assert 'failed bad/seed0 (exit 1)' in text and layout.log('bad', 0) in text
  assert 'mdp:mnist:bogus' in open(layout.log('bad', 0)).read()
  rows = study_runner.collect(definition, layout, state, runs, console)
  assert [r['cell'] for r in rows] == ['adam'] and 0.0 <= rows[0]['final_accuracy'] <= 1.0


@pytest.mark.slow
def test_a_run_whose_directory_a_live_launch_holds_starts_once_that_launch_is_gone(tmp_path):
  """A study rerun right after its process was killed: the killed one's runs still stop (up to their notice)."""
  layout = StudyLayout(str(tmp_path))
  cell = Cell('quick', {}, {}, command='json.tool')  # Any quick command: what matters is when it starts.
  run = study_runner.Run('quick/seed0', cell, 0, layout.run_dir('quick', 0), layout.log('quick', 0))
  state = {'grid': {'study': 'test'}, 'runs': {run.key: {'state': 'pending'}}}
  lock = run_lock.RunLock(RunLayout(run.run_dir))
  lock.acquire()  # As the run's launcher, started by the killed study process, holds it while it stops.
  released = []

  def release():
    released.append(time.time())
    lock.release()

  timer = threading.Timer(2.0, release)
  timer.start()
  console = Console(record=True, width=200)
  try:
    study_runner.execute(layout, state, [run], 1, None, console)
  finally:
    timer.join()
  assert run.started >= released[0]
  assert f'quick/seed0: its run directory is in use (pid {os.getpid()} on ' in console.export_text()


@pytest.mark.slow
def test_a_killed_study_leaves_no_run_behind_and_resumes_without_redoing_finished_runs(tmp_path):
  out = tmp_path / 'study'
  layout = StudyLayout(str(out))
  args = ('--study=interventions', '--scale=smoke', f'--out_dir={out}', '--cells=mlp-none,mlp-layernorm',
          '--run_launch_type=local_mt')
  started = time.time()
  first = python_module('launch.study', *args)
  deadline = time.time() + 300
  state = {}
  while time.time() < deadline and first.poll() is None:
    state = json.load(open(layout.state)) if os.path.exists(layout.state) else {}
    runs = state.get('runs', {})
    if runs.get('mlp-none/seed0', {}).get('state') == 'finished' and 'pid' in runs.get('mlp-layernorm/seed0', {}):
      break
    time.sleep(0.5)
  assert 'pid' in state['runs']['mlp-layernorm/seed0'], state
  # Into its training, not past it (a fixed wait let an idle machine finish the whole run first).
  learner_records = RunLayout(layout.run_dir('mlp-layernorm', 0)).records_file(RunLayout.LEARNER, 'learner')
  wait_for(lambda: os.path.exists(learner_records) and os.path.getsize(learner_records) > 0, 120,
           'the learner of mlp-layernorm to train')
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=10)
  # Its run got SIGTERM from the kernel: it saves its checkpoint and exits.
  wait_for(lambda: not leftover_processes(started, str(out)), 60, 'the run of the killed study to exit')
  resumed = run_study(*args, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert '1 of 2 runs already finished; running 1.' in resumed.stdout
  assert open(layout.log('mlp-none', 0)).read().count('=== ') == 1  # Not redone.
  assert open(layout.log('mlp-layernorm', 0)).read().count('=== ') == 2
  rows = read_jsonl(layout.table('results') + '.jsonl')
  assert sorted(r['cell'] for r in rows) == ['mlp-layernorm', 'mlp-none']
  assert all(r['probe_step'] == 300 and r['plasticity_loss'] is not None for r in rows)
  summary = read_jsonl(layout.table('summary') + '.jsonl')
  assert {s['column']: s['plasticity_loss_n'] for s in summary} == {'none': 1, 'layernorm': 1}
  assert os.path.getsize(layout.figure('interventions')) > 10_000
  assert json.load(open(layout.state))['runs']['mlp-layernorm/seed0']['attempts'] == 2


def test_run_measures_of_a_run_written_before_the_new_fields_report_and_say_so(tmp_path, caplog):
  """An old categorical run: probe records without `probe_fit_loss` (probed on its logits), diagnostics without
  some statistics, no learner records: measured, the missing measures absent, with a warning naming the run."""
  from agents.config import AgentConfig
  from probes.records.run_dir import ExperimentConfig, RunLayout, write_or_check_config
  run_dir = str(tmp_path / 'old')
  write_or_check_config(ExperimentConfig(run_dir=run_dir, agent=AgentConfig(output='two_hot')))
  layout = RunLayout(run_dir)
  probes = layout.logger(RunLayout.PROBES, 'evaluator', tensorboard=False)
  for step, plasticity in ((0, 0.2), (100, 0.05)):
    probes({'learner_step': step, 'plasticity': plasticity, 'plasticity_loss': 0.2 - plasticity})
  diagnostics = layout.logger(RunLayout.DIAGNOSTICS, 'evaluator', tensorboard=False)
  for step, norm in ((0, 10.0), (100, 12.5)):
    diagnostics({'learner_step': step, 'parameter_norm': norm})
  with caplog.at_level('WARNING'):
    measures = aggregate.run_measures(run_dir)
  assert measures['plasticity_loss'] == pytest.approx(0.15) and measures['probe_fit_loss'] is None
  assert measures['final_parameter_norm'] == 12.5 and measures['change_parameter_norm'] == pytest.approx(2.5)
  assert 'td_loss' not in measures and 'final_feature_rank' not in measures
  assert run_dir in caplog.text and 'logits' in caplog.text
