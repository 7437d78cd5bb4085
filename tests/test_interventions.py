"""Interventions: each effect does what its entry in agents/interventions.py says, on hand-checkable cases."""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import interventions, networks, snapshots
from agents.builder import make_agent
from agents.config import AgentConfig
from agents.learner import Learner
from agents.update import init_state, make_target_update, make_update
from agents.types import Transition
from tests.conftest import SMALL, random_batches, small_agent

INPUT = SMALL['mlp'][0]  # The MLP's observations: the learners' and random_batches'.


def batch_of(obs):
  n = len(obs)
  return Transition(obs, np.arange(n) % 3, np.linspace(-1, 1, n).astype(np.float32), np.ones(n, np.float32),
                    obs[::-1])


def test_new_options_are_agent_config_fields_with_their_defaults():
  config = AgentConfig()
  assert (config.l2_init, config.redo_every, config.redo_threshold) == (1e-5, 1000, 0.025)
  fields = {field.name: field for field in dataclasses.fields(AgentConfig)}
  for name, lower_bound in (('l2_init', 0.0), ('redo_every', 1), ('redo_threshold', 0.0)):
    assert fields[name].metadata['help'] and fields[name].metadata['lower_bound'] == lower_bound
  # Each intervention declares the fields it reads: its own configuration (today's ones keep their flags).
  options = {name: interventions.INTERVENTIONS[name].options for name in interventions.INTERVENTIONS}
  assert options['l2_init'] == ('l2_init',) and options['redo'] == ('redo_every', 'redo_threshold')
  assert options['weight_decay'] == ('weight_decay',) and options['shrink_and_perturb'] == ('shrink', 'perturb')
  assert all(set(names) <= set(fields) for names in options.values())
  with pytest.raises(ValueError, match='not AgentConfig fields'):
    interventions.Intervention(doc='x', options=('no_such_field',))


@pytest.mark.parametrize('arch', ['resnet18', 'vit'])
def test_an_intervention_restricted_to_some_architectures_names_them(arch):
  with pytest.raises(ValueError, match=f"'redo' \\(--interventions\\) does not apply to --arch={arch}; "
                                       'it applies to: cnn, mlp, nature_dqn'):
    make_agent(AgentConfig(arch=arch, interventions=('redo',)), 3)


def _target_update_once(names):
  agent, _, obs = small_agent(interventions=names)
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), obs[:1])
  state = state._replace(params=jax.tree_util.tree_map(lambda x: x + 0.5, state.params))  # "Trained" parameters.
  fresh = agent.network.init(jax.random.split(state.rng)[1], obs[:1])  # The draw the target update makes.
  return state, make_target_update(agent.network, agent.target_update_hooks, obs[:1])(state), fresh


def test_reset_last_layer_reinitialises_the_head_only():
  before, after, fresh = _target_update_once(('reset_last_layer',))
  for module in before.params:
    for name, value in after.params[module].items():
      expected = fresh[module][name] if module == 'head' else before.params[module][name]
      np.testing.assert_array_equal(value, expected, err_msg=f'{module}/{name}')
  jax.tree_util.tree_map(np.testing.assert_array_equal, after.target_params, before.params)


def test_shrink_and_perturb_matches_its_formula():
  config = AgentConfig()
  before, after, fresh = _target_update_once(('shrink_and_perturb',))
  jax.tree_util.tree_map(
      lambda new, old, f: np.testing.assert_allclose(new, config.shrink * old + config.perturb * f, rtol=1e-6),
      after.params, before.params, fresh)


def test_reset_optimizer_restarts_its_state():
  agent, config, obs = small_agent(interventions=('reset_optimizer',))
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), obs[:1])
  batch = Transition(obs, np.array([0, 1, 2, 0]), np.ones(4, np.float32), np.ones(4, np.float32), obs)
  state, _ = make_update(agent.network, agent.encoding, agent.optimizer, config.discount)(state, batch)
  assert int(state.opt_state[0].count) == 1
  state = make_target_update(agent.network, agent.target_update_hooks, obs[:1])(state)
  assert int(state.opt_state[0].count) == 0
  jax.tree_util.tree_map(lambda m: np.testing.assert_array_equal(m, 0.0), state.opt_state[0].mu)


def test_weight_decay_adds_the_l2_gradient():
  plain = make_agent(AgentConfig(optimizer='sgd', learning_rate=0.1), 3).optimizer
  decayed = make_agent(AgentConfig(optimizer='sgd', learning_rate=0.1, interventions=('weight_decay',),
                                   weight_decay=0.01), 3).optimizer
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.5])}
  np.testing.assert_allclose(plain.update(grads, plain.init(params), params)[0]['w'], [-0.05, -0.05])
  np.testing.assert_allclose(decayed.update(grads, decayed.init(params), params)[0]['w'],
                             [-0.1 * (0.5 + 0.01), -0.1 * (0.5 - 0.02)], rtol=1e-6)


def test_l2_init_term_is_half_c_times_the_squared_distance_and_pulls_towards_init():
  term = interventions.l2_init_term(AgentConfig(l2_init=0.1), None, None)
  params = {'layer': {'w': jnp.array([[1.0, 2.0]]), 'b': jnp.array([0.0])}}
  initial = {'layer': {'w': jnp.array([[0.0, 0.0]]), 'b': jnp.array([1.0])}}
  np.testing.assert_allclose(term(params, initial, None), 0.5 * 0.1 * (1 + 4 + 1), rtol=1e-6)
  np.testing.assert_allclose(term(initial, initial, None), 0.0)
  gradient = jax.grad(term)(params, initial, None)  # c (theta - theta_0): descending it moves towards theta_0.
  np.testing.assert_allclose(gradient['layer']['w'], [[0.1, 0.2]], rtol=1e-6)
  np.testing.assert_allclose(gradient['layer']['b'], [-0.1], rtol=1e-6)


def test_l2_init_adds_its_gradient_to_the_td_gradient_in_the_update():
  # With SGD, the update with the term minus the update without it is -lr * c * (theta - theta_0).
  obs = small_agent()[2]
  updated = {}
  for names in ((), ('l2_init',)):
    agent, config, _ = small_agent(optimizer='sgd', learning_rate=0.1, l2_init=1.0, interventions=names)
    state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), obs[:1])
    state = state._replace(params=jax.tree_util.tree_map(lambda p: p + 0.05, state.params))
    updated[names], metrics = make_update(agent.network, agent.encoding, agent.optimizer, config.discount,
                                          agent.loss_terms)(state, batch_of(obs))
  num_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
  np.testing.assert_allclose(metrics['l2_init_loss'], 0.5 * 1.0 * 0.05**2 * num_params, rtol=1e-4)
  jax.tree_util.tree_map(lambda with_term, without: np.testing.assert_allclose(
      with_term - without, -0.1 * 1.0 * 0.05, rtol=1e-3), updated[('l2_init',)].params, updated[()].params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, updated[('l2_init',)].initial_params,
                         updated[()].initial_params)


def test_initial_parameters_survive_checkpoints(tmp_path):
  config = AgentConfig(width_multiplier=0.05, batch_size=4, interventions=('l2_init',), l2_init=0.1)
  agent, dummy = make_agent(config, 3), np.zeros((8, 8, 1), np.uint8)
  learner = Learner(agent, config, random_batches(4, INPUT), dummy, seed=3, checkpoint_dir=str(tmp_path / 'new'))
  theta_0 = jax.device_get(learner.state.initial_params)
  learner.run(max_steps=5)
  assert not np.allclose(learner.state.params['linear_0']['w'], theta_0['linear_0']['w'])
  resumed = Learner(agent, config, random_batches(4, INPUT), dummy, seed=3, checkpoint_dir=str(tmp_path / 'new'))
  assert resumed.step_count == 5
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.state.initial_params, theta_0)


def test_every_chain_lists_its_architectures_weight_layers_in_hidden_order():
  for arch, chain in networks.CHAINS.items():
    agent, _, obs = small_agent(arch)
    params = agent.network.init(jax.random.PRNGKey(0), obs[:1])
    hidden = agent.network.apply(params, obs).hidden
    assert set(chain) == {module for module in params if 'w' in params[module]}, arch
    assert len(hidden) == len(chain) - 1 and chain[-1] == networks.HEAD
    for h, layer, following in zip(hidden, chain[:-1], chain[1:]):
      assert h.shape[-1] == params[layer]['w'].shape[-1], (arch, layer)
      assert params[following]['w'].shape[-2] in (h.shape[-1], np.prod(h.shape[1:])), (arch, following)


def test_dormancy_scores_match_sokar_et_al():
  # Units' mean |h| over the batch (and a conv channel's positions) over the layer's mean of it.
  dense = jnp.array([[0.0, 1.0, 3.0], [0.0, 3.0, 5.0]])  # E|h| = 0, 2, 4; layer mean 2.
  conv = jnp.ones((2, 3, 3, 2)).at[..., 1].set(0.0)
  silent = jnp.zeros((2, 4))
  scores = interventions.dormancy_scores((dense, conv, silent))
  np.testing.assert_allclose(scores[0], [0.0, 1.0, 2.0])
  np.testing.assert_allclose(scores[1], [2.0, 0.0])
  np.testing.assert_array_equal(scores[2], 0.0)  # A silent layer is all dormant, as the diagnostics count it.


def _flattened_rows(h_shape, unit):
  """The rows of a dense layer's w that read `unit` of a conv output [B, H, W, C] flattened row-major."""
  return np.arange(int(np.prod(h_shape[1:-1]))) * h_shape[-1] + unit


# A dead unit in a dense layer feeding a dense one, a conv channel feeding a conv, a conv channel feeding a dense
# layer through the flatten (rows unit, C + unit, 2C + unit, ...).
@pytest.mark.parametrize('arch, layer', [('mlp', 'linear_0'), ('cnn', 'conv_0'), ('cnn', 'conv_1')])
def test_redo_recycles_exactly_the_dormant_unit(arch, layer):
  agent, config, obs = small_agent(arch, num_observations=16, interventions=('redo',))
  chain = networks.CHAINS[arch]
  following = chain[chain.index(layer) + 1]
  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), obs[:1])
  # Large positive biases keep every other unit active alike (scores about 1); unit 2 of `layer` never fires.
  params = jax.tree_util.tree_map(np.array, state.params)
  bias = 10.0
  for module in chain[:-1]:
    params[module]['b'][:] = bias
    bias *= 30.0
  params[layer]['b'][2] = -1e9
  # Adam's moments of every weight as if trained (a dead unit's own would be 0: no gradient reaches it).
  opt_state = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) if x.ndim else x, state.opt_state)
  state = state._replace(params=jax.tree_util.tree_map(jnp.asarray, params), opt_state=opt_state)
  before = jax.device_get(state)
  hidden = agent.network.apply(state.params, obs).hidden
  assert [np.flatnonzero(s <= config.redo_threshold).tolist() for s in interventions.dormancy_scores(hidden)] == [
      [2] if module == layer else [] for module in chain[:-1]]

  (action,) = agent.periodic_actions
  assert action.period == config.redo_every
  after, metrics = jax.jit(action.act)(state, batch_of(obs))
  after = jax.device_get(after)
  assert int(metrics['redo_recycled_units']) == 1
  fresh = agent.network.init(jax.random.split(before.rng)[1], obs[:1])  # The draw the action makes.

  h_shape = hidden[chain.index(layer)].shape
  w = before.params[following]['w']
  if w.ndim == 4:  # conv -> conv: the kernel's input channel.
    rows = (..., 2, slice(None))
  elif w.shape[0] == h_shape[-1]:  # dense -> dense.
    rows = (2,)
  else:  # conv -> flatten -> dense.
    rows = (_flattened_rows(h_shape, 2),)
  expected = jax.tree_util.tree_map(np.array, before.params)
  expected[layer]['w'][..., 2] = fresh[layer]['w'][..., 2]
  expected[layer]['b'][2] = fresh[layer]['b'][2]
  expected[following]['w'][rows] = 0.0
  for module in expected:
    for name in expected[module]:
      np.testing.assert_array_equal(after.params[module][name], expected[module][name], err_msg=f'{module}/{name}')
  assert np.any(expected[layer]['w'][..., 2] != before.params[layer]['w'][..., 2])
  # The outgoing weights are zero, so the recycled unit changes nothing yet.
  np.testing.assert_allclose(agent.network.apply(after.params, obs).outputs,
                             agent.network.apply(before.params, obs).outputs, rtol=1e-5)
  # Adam's moments of exactly those weights restart; its count and everything else are kept.
  touched = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, bool), before.params)
  touched[layer]['w'][..., 2] = touched[layer]['b'][2] = True
  touched[following]['w'][rows] = True
  for moments in ('mu', 'nu'):
    jax.tree_util.tree_map(
        lambda new, old, t: np.testing.assert_array_equal(new, np.where(t, 0.0, old)),
        getattr(after.opt_state[0], moments), getattr(before.opt_state[0], moments), touched)
  assert int(after.opt_state[0].count) == int(before.opt_state[0].count)
  for field in ('target_params', 'initial_params', 'step'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(after, field), getattr(before, field))
  assert not np.array_equal(after.rng, before.rng)


def test_the_learner_runs_redo_every_redo_every_steps():
  # Threshold 1: about half of the units score at or below the layer's mean, so every recycling recycles some.
  config = AgentConfig(width_multiplier=0.05, batch_size=8, interventions=('redo',), redo_every=3,
                       redo_threshold=1.0)
  learner = Learner(make_agent(config, 3), config, random_batches(8, INPUT), np.zeros((8, 8, 1), np.uint8))
  recycled = {}
  for _ in range(7):
    metrics = learner.step()
    if 'redo_recycled_units' in metrics:
      recycled[learner.step_count] = int(metrics['redo_recycled_units'])
  assert sorted(recycled) == [3, 6] and all(count > 0 for count in recycled.values())
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(learner.state.params))


@pytest.mark.parametrize('intervention', ['reset_last_layer', 'shrink_and_perturb'])
def test_probe_snapshots_hold_what_training_produced_before_the_steps_interventions(tmp_path, intervention):
  """A probe step is a multiple of the target period: the snapshot (and `get_snapshot`) holds the parameters the
  updates produced, the target a copy of them, not the reset or perturbed ones the learner goes on from; with
  `measure_after_interventions`, the latter."""
  config = AgentConfig(width_multiplier=0.05, batch_size=8, target_update_period=5, interventions=(intervention,))
  agent = make_agent(config, 3)
  folders = {after: str(tmp_path / f'after_{after}') for after in (False, True)}
  learners = {after: Learner(agent, config, random_batches(8, INPUT), np.zeros((8, 8, 1), np.uint8), log_every=5,
                             snapshot_dir=folders[after], snapshot_every=5, measure_after_interventions=after)
              for after in (False, True)}
  trained = {}
  for after, learner in learners.items():
    for _ in range(4):
      learner.step()
    # Step 5's update alone, as the learner applies it: the state it gives before the interventions.
    batch = next(itertools.islice(random_batches(8, INPUT), 4, None))
    trained[after] = jax.jit(make_update(agent.network, agent.encoding, agent.optimizer, config.discount))(
        learner.state, batch)[0].params
    learner.step()
    assert learner.step_count == 5
  before, after = learners[False], learners[True]
  step, params, target_params = snapshots.load(snapshots.path_for(folders[False], 5))
  assert step == 5
  chex.assert_trees_all_close(params, jax.device_get(trained[False]), rtol=1e-6)
  chex.assert_trees_all_close(target_params, params)
  assert not np.allclose(params['head']['w'], np.asarray(before.state.params['head']['w']))  # The learner's moved on.
  chex.assert_trees_all_close(before.get_snapshot()[1], params)
  chex.assert_trees_all_close(before.get_params()[1], jax.device_get(before.state.params))
  step, params, target_params = snapshots.load(snapshots.path_for(folders[True], 5))
  chex.assert_trees_all_close(params, jax.device_get(after.state.params))
  chex.assert_trees_all_close(target_params, jax.device_get(after.state.target_params))
  # Between target updates nothing intervenes: the snapshot is the state.
  before.run(max_steps=7)
  step, params, target_params = snapshots.load(snapshots.path_for(folders[False], 7))
  chex.assert_trees_all_close((params, target_params),
                              jax.device_get((before.state.params, before.state.target_params)))
