"""Architectures, output encodings and interventions: each switch does what it says."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax

from agents import encodings, interventions, networks, optimizers
from agents.builder import make_agent
from agents.config import AgentConfig
from environments.registry import Registry
from agents.update import init_state, make_target_update, make_update
from agents.types import Transition
from tests.conftest import SMALL, small_agent

def test_every_architecture_is_registered():
  assert set(networks.ARCHITECTURES) == set(SMALL)
  assert set(encodings.ENCODINGS) == {'regress', 'two_hot', 'hl_gauss'}


def test_registry_looks_up_iterates_names_and_says_what_is_accepted():
  registry = Registry('widget', '--widget')

  @registry.register('b')
  def b():
    return 'B'

  assert registry.add('a', 'A') == 'A' and b() == 'B'
  assert list(registry) == registry.names() == ['a', 'b'] and len(registry) == 2
  assert 'a' in registry and 'c' not in registry
  assert registry.get('a') == registry['a'] == 'A' and registry['b'] is b
  with pytest.raises(ValueError, match=r"^Unknown widget 'c' \(--widget\); accepted: a, b\.$"):
    registry['c']
  with pytest.raises(ValueError, match='registered twice'):
    registry.add('a', 'again')
  unflagged = Registry('dataset')
  unflagged.add('mnist', None)
  with pytest.raises(ValueError, match=r"^Unknown dataset 'x'; accepted: mnist\.$"):
    unflagged.get('x')


@pytest.mark.parametrize('registry, flag', [(networks.ARCHITECTURES, '--arch'), (encodings.ENCODINGS, '--output'),
                                            (optimizers.OPTIMIZERS, '--optimizer'),
                                            (interventions.INTERVENTIONS, '--interventions')])
def test_every_registry_names_its_flag_and_yields_sorted_names(registry, flag):
  assert list(registry) == sorted(registry) and len(registry) == len(list(registry))
  with pytest.raises(ValueError, match=f'^Unknown .* \\({flag}\\); accepted: {", ".join(registry)}\\.$'):
    registry.get('nonexistent')


# Every architecture with every encoding; every intervention alone (on the MLP); every architecture with all the
# interventions that apply to it composed (so each architecture-specific switch meets each architecture); and the
# ViT with its pre-norms alone (figure 6 compares it with and without). One compilation per case keeps it affordable.
def _applicable(arch):
  return tuple(name for name in interventions.INTERVENTIONS if interventions.INTERVENTIONS[name].applies_to(arch))


CASES = ([(arch, output, _applicable(arch) if output == 'two_hot' else ())
          for arch in SMALL for output in sorted(encodings.ENCODINGS)]
         + [('mlp', 'regress', (name,)) for name in sorted(interventions.INTERVENTIONS)]
         + [('vit', 'regress', ('layernorm',))])


@pytest.fixture
def fast_compilation():
  """Most XLA optimisations off: these tests check values, not speed, and compile much faster."""
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', False)


SLOW_TO_BUILD = ('resnet18', 'vit', 'nature_dqn')  # Seconds each: their cases run with the slow tests.


@pytest.mark.parametrize('arch, output, names', [
    pytest.param(a, o, n, id='-'.join([a, o, *n]), marks=[pytest.mark.slow] if a in SLOW_TO_BUILD else [])
    for a, o, n in CASES])
def test_accepted_combination_builds_steps_and_stays_finite(arch, output, names, fast_compilation):
  agent, config, obs = small_agent(arch, output=output, interventions=names)
  update = make_update(agent.network, agent.encoding, agent.optimizer, config.discount, agent.loss_terms)
  target_update = make_target_update(agent.network, agent.target_update_hooks, obs[:1])

  @jax.jit
  def step(state, batch):  # The update, every periodic action, then the target update: all of them due at once.
    state, metrics = update(state, batch)
    for action in agent.periodic_actions:
      state, action_metrics = action.act(state, batch)
      metrics.update(action_metrics)
    return target_update(state), metrics

  state = init_state(agent.network, agent.optimizer, jax.random.PRNGKey(0), obs[:1])
  batch = Transition(obs, np.array([0, 1, 2, 0]), np.array([1.0, 0.0, -1.0, 0.5], np.float32),
                     np.ones(4, np.float32), obs[::-1])
  state, metrics = step(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert set(metrics) >= {f'{name}_loss' for name in agent.loss_terms}
  outputs = agent.network.apply(state.params, obs)
  assert outputs.outputs.shape == (4, 3 * agent.encoding.outputs_per_action)
  assert np.all(np.isfinite(outputs.outputs)) and np.all(np.isfinite(agent.encoding.q_values(outputs.outputs)))
  assert outputs.hidden[-1].ndim == 2 and outputs.hidden[-1].shape[0] == 4


def test_unknown_interventions_architectures_and_outputs_say_why():
  with pytest.raises(ValueError, match='--interventions.*accepted'):
    make_agent(AgentConfig(interventions=('dropout',)), 3)
  with pytest.raises(ValueError, match='--interventions lists an intervention twice'):
    make_agent(AgentConfig(interventions=('layernorm', 'layernorm')), 3)
  with pytest.raises(ValueError, match='--arch'):
    make_agent(AgentConfig(arch='lstm'), 3)
  with pytest.raises(ValueError, match='--output'):
    make_agent(AgentConfig(output='quantile'), 3)
  with pytest.raises(ValueError, match='--optimizer.*accepted: adam, adam_rainbow, adam_tuned'):
    make_agent(AgentConfig(optimizer='lion'), 3)


def test_training_mode_is_asked_for_and_needs_a_key():
  agent, _, obs = small_agent('vit')
  params = agent.network.init(jax.random.PRNGKey(0), obs[:1])
  evaluated = agent.network.apply(params, obs).outputs
  # A key alone no longer switches dropout on; is_training does, and then it needs the key.
  np.testing.assert_array_equal(agent.network.apply(params, obs, rng=jax.random.PRNGKey(1)).outputs, evaluated)
  trained = agent.network.apply(params, obs, is_training=True, rng=jax.random.PRNGKey(1)).outputs
  assert not np.allclose(trained, evaluated)
  with pytest.raises(ValueError, match='is_training=True.*needs an rng'):
    agent.network.apply(params, obs, is_training=True)
  with pytest.raises(TypeError):
    agent.network.apply(params, obs, jax.random.PRNGKey(1))  # No positional key.


# The first layers it normalises are rectangular (784 x 512, 25 x 64, 9 x 256, ...), where it converges fast.
@pytest.mark.parametrize('shape', [(784, 512), (5 * 5 * 1, 64), (9, 256), (27, 64)])
def test_power_iteration_finds_the_top_singular_value(shape):
  matrix = jax.random.normal(jax.random.PRNGKey(1), shape) / np.sqrt(shape[0])
  exact = np.linalg.norm(np.asarray(matrix), 2)
  assert float(networks.top_singular_value(matrix)) == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize('arch', sorted(networks.FIRST_LAYERS))
def test_spectrally_normalised_first_layer_has_top_singular_value_one(arch):
  agent, _, obs = small_agent(arch, interventions=('spectral_norm',))
  params = agent.network.init(jax.random.PRNGKey(0), obs[:1])
  first = networks.FIRST_LAYERS[arch]
  w = params[first]['w']
  w = w.reshape(-1, w.shape[-1])
  normalised = np.asarray(w) / float(networks.top_singular_value(w))
  assert np.linalg.norm(normalised, 2) == pytest.approx(1.0, rel=0.01)
  # Prepared parameters hold the normalised weight, every other parameter as it was.
  prepared = agent.network.prepare(params)
  np.testing.assert_allclose(prepared[first]['w'].reshape(normalised.shape), normalised, rtol=1e-5)
  assert all(np.array_equal(prepared[m][k], v) for m in params for k, v in params[m].items() if (m, k) != (first, 'w'))
  # The forward pass uses the normalised weight, the same with the parameters prepared once.
  np.testing.assert_allclose(agent.network.apply(params, obs).outputs,
                             agent.network.apply_prepared(prepared, obs).outputs, rtol=1e-5, atol=1e-6)
  if arch == 'mlp':  # The first hidden layer (bias 0 at init) is relu(x @ w / sigma).
    x = np.asarray(obs, np.float32).reshape(len(obs), -1) / 255.0
    hidden = agent.network.apply(params, obs).hidden[0]
    np.testing.assert_allclose(hidden, np.maximum(x @ normalised, 0.0), rtol=1e-4, atol=1e-5)
  # Only the first layer is normalised.
  plain, _, _ = small_agent(arch)
  assert not any('spectral' in name for name in params) and plain.network.prepare(params) is params
  assert np.abs(np.asarray(plain.network.apply(params, obs).outputs) -
                np.asarray(agent.network.apply(params, obs).outputs)).max() > 1e-4


@pytest.mark.parametrize('arch', ['mlp', 'cnn', 'nature_dqn', 'resnet18'])
def test_layer_norm_follows_every_hidden_weight_layer(arch):
  plain, _, obs = small_agent(arch)
  normed, _, _ = small_agent(arch, interventions=('layernorm',))
  plain_params = plain.network.init(jax.random.PRNGKey(0), obs[:1])
  normed_params = normed.network.init(jax.random.PRNGKey(0), obs[:1])
  weight_layers = {name for name in plain_params if name != 'head'}
  assert not any('layer_norm' in name for name in plain_params)
  assert {name for name in normed_params if name.endswith('_layer_norm')} == {f'{n}_layer_norm' for n in weight_layers}


def test_vit_is_norm_free_and_layer_norm_adds_its_three_pre_norms():
  plain, _, obs = small_agent('vit')
  normed, _, _ = small_agent('vit', interventions=('layernorm',))
  plain_params = plain.network.init(jax.random.PRNGKey(0), obs[:1])
  normed_params = normed.network.init(jax.random.PRNGKey(0), obs[:1])
  assert not any('norm' in name for name in plain_params)
  assert set(normed_params) - set(plain_params) == {'attention_layer_norm', 'mlp_layer_norm', 'final_layer_norm'}


@pytest.mark.parametrize('value', [-100.0, -37.3, 0.0, 0.4, 12.25, 99.9, 100.0])
def test_two_hot_encode_then_decode_returns_the_value(value):
  config = encodings.EncodingConfig()
  encoding = encodings.make_encoding('two_hot', config)
  probabilities = rlax.transform_to_2hot(jnp.array([value]), config.support_min, config.support_max, config.num_bins)
  np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-6)
  assert (probabilities > 0).sum() <= 2
  logits = jnp.log(jnp.maximum(probabilities, 1e-30))
  np.testing.assert_allclose(encoding.q_values(logits), [[value]], atol=1e-3)


@pytest.mark.parametrize('value', [-50.0, 0.3, 42.0])
def test_hl_gauss_encodes_a_gaussian_around_the_value(value):
  config = encodings.EncodingConfig()
  probabilities = encodings.hl_gauss_distribution(jnp.array([value]), config)[0]
  centres = encodings.support(config)
  np.testing.assert_allclose(probabilities.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(probabilities * centres), value, atol=1e-2)
  width = (config.support_max - config.support_min) / (config.num_bins - 1)
  spread = jnp.sqrt(jnp.sum(probabilities * (centres - value) ** 2))
  # Binning adds about width^2 / 12 to sigma^2 = (0.75 width)^2.
  assert float(spread) == pytest.approx(np.sqrt((0.75 * width) ** 2 + width ** 2 / 12), rel=0.05)


@pytest.mark.parametrize('output', ['two_hot', 'hl_gauss'])
def test_categorical_loss_is_smallest_at_the_target_distribution(output):
  config = encodings.EncodingConfig(num_bins=11, support_min=-5.0, support_max=5.0)
  encoding = encodings.make_encoding(output, config)
  target = jnp.array([1.3])
  at_target = jnp.log(jnp.maximum({'two_hot': lambda t: rlax.transform_to_2hot(t, -5.0, 5.0, 11),
                                   'hl_gauss': lambda t: encodings.hl_gauss_distribution(t, config)}[output](target),
                                  1e-30))
  elsewhere = jnp.zeros((1, 11))
  assert float(encoding.loss(at_target, target)[0]) < float(encoding.loss(elsewhere, target)[0])
  gradient = jax.grad(lambda logits: encoding.loss(logits, target).sum())(at_target)
  np.testing.assert_allclose(gradient, 0.0, atol=1e-5)


def test_optimizer_presets():
  grads = {'w': jnp.array([0.3, -0.2])}
  params = {'w': jnp.zeros(2)}
  for name, learning_rate in itertools.product(['adam', 'adam_tuned', 'adam_rainbow', 'rmsprop', 'rmsprop_clipped',
                                                'sgd'], [1e-3]):
    optimizer = make_agent(AgentConfig(optimizer=name, learning_rate=learning_rate), 3).optimizer
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert np.all(np.sign(updates['w']) == -np.sign(grads['w'])), name
  # Adam's first step is lr * g / (|g| + eps) = lr * sign(g); eps_root 1e-3 under the root damps small gradients.
  adam = make_agent(AgentConfig(optimizer='adam'), 3).optimizer
  tuned = make_agent(AgentConfig(optimizer='adam_tuned'), 3).optimizer
  np.testing.assert_allclose(adam.update(grads, adam.init(params), params)[0]['w'], [-1e-3, 1e-3], rtol=1e-5)
  tuned_step = tuned.update(grads, tuned.init(params), params)[0]['w']
  np.testing.assert_allclose(tuned_step, -1e-3 * grads['w'] / np.sqrt(grads['w'] ** 2 + 1e-3), rtol=1e-4)
  # Rainbow's eps 1.5e-4 beside |g|: a first step of lr * g / (|g| + 1.5e-4).
  rainbow = make_agent(AgentConfig(optimizer='adam_rainbow', learning_rate=6.25e-5), 3).optimizer
  np.testing.assert_allclose(rainbow.update(grads, rainbow.init(params), params)[0]['w'],
                             -6.25e-5 * grads['w'] / (np.abs(grads['w']) + 1.5e-4), rtol=1e-5)


def test_rmsprop_is_dqn_zoos_double_dqn_optimizer_without_a_norm_clip():
  """DQN Zoo's double_q uses plain centred RMSProp; the global-norm clip at 10 is only in `rmsprop_clipped`."""
  dqn_zoo = optax.rmsprop(2.5e-4, decay=0.95, eps=0.01 / 32**2, centered=True)
  references = {'rmsprop': dqn_zoo, 'rmsprop_clipped': optax.chain(optax.clip_by_global_norm(10.0), dqn_zoo)}
  params = {'w': jnp.zeros(2)}
  # A gradient of global norm 1,000 then one of norm 1. Centred RMSProp's first step is nearly scale-free, so
  # the second tells them apart: the clip (to norm 10) leaves a second-moment estimate 1e4 times smaller.
  gradients = [{'w': jnp.array([600.0, -800.0])}, {'w': jnp.array([0.6, -0.8])}]

  def steps(optimizer):
    state, updates = optimizer.init(params), []
    for grads in gradients:
      update, state = optimizer.update(grads, state, params)
      updates.append(np.asarray(update['w']))
    return updates

  results = {}
  for name, reference in references.items():
    results[name] = steps(make_agent(AgentConfig(optimizer=name, learning_rate=2.5e-4), 3).optimizer)
    for step, expected in zip(results[name], steps(reference)):
      np.testing.assert_allclose(step, expected, rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(results['rmsprop_clipped'][1] / results['rmsprop'][1], 100.0, rtol=0.05)


@pytest.mark.parametrize('shape', [(84, 84, 4), (37, 41, 4)])  # Atari's frames; sides no stride divides.
def test_the_nature_dqns_strided_convolutions_are_hk_conv2ds_computed_on_space_to_depth_inputs(shape):
  """The same parameters (from the same key) and the same outputs as Mnih et al.'s network written with
  hk.Conv2D, and the same gradients."""
  import haiku as hk

  def reference(obs):
    x = networks.scale_observation(obs)
    for i, (channels, kernel, stride) in enumerate(((32, 8, 4), (64, 4, 2), (64, 3, 1))):
      x = jax.nn.relu(hk.Conv2D(channels, kernel, stride=stride, padding='VALID', name=f'conv_{i}')(x))
    x = jax.nn.relu(hk.Linear(512, name='linear_0')(hk.Flatten()(x)))
    return hk.Linear(6, name='head')(x)

  reference = hk.without_apply_rng(hk.transform(reference))
  network = networks.make_network('nature_dqn', networks.ArchConfig(num_outputs=6))
  obs = np.random.default_rng(0).integers(0, 256, (5, *shape), dtype=np.uint8)
  params = network.init(jax.random.PRNGKey(3), obs[:1])
  expected = reference.init(jax.random.PRNGKey(3), obs[:1])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
  outputs = lambda p: network.apply(p, obs).outputs
  np.testing.assert_allclose(outputs(params), reference.apply(params, obs), rtol=1e-4, atol=1e-5)
  grads, expected_grads = (jax.grad(lambda p: jnp.sum(f(p) ** 2))(params)
                           for f in (outputs, lambda p: reference.apply(p, obs)))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads, expected_grads)
  with pytest.raises(ValueError, match='stride dividing the kernel'):
    hk.transform(lambda x: networks.StridedConv2D(8, 3, 2, name='bad')(x)).init(jax.random.PRNGKey(0), obs)


@pytest.mark.parametrize('kernel,with_bias', [(5, True), (3, False)])  # The CNN's first layer, ResNet-18's stem.
def test_one_channel_convolutions_are_hk_conv2ds_computed_as_sums_of_taps(kernel, with_bias):
  """The same parameters (from the same key), outputs and gradients (filter and input) as hk.Conv2D, and every
  MNIST network's one-channel first convolution is one."""
  import haiku as hk

  def make(layer):
    return hk.without_apply_rng(hk.transform(lambda x: layer(6, kernel, with_bias=with_bias, name='conv')(x)))

  reference, ours = make(hk.Conv2D), make(networks.OneChannelConv2D)
  inputs = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 7, 1))
  params = ours.init(jax.random.PRNGKey(1), inputs)
  expected_params = reference.init(jax.random.PRNGKey(1), inputs)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected_params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected_params)
  np.testing.assert_allclose(ours.apply(params, inputs), reference.apply(params, inputs), rtol=1e-5, atol=1e-6)
  cotangent = jax.random.normal(jax.random.PRNGKey(2), (3, 9, 7, 6))
  grads, expected_grads = (jax.grad(lambda p, x: jnp.vdot(jnp.tanh(f(p, x)), cotangent), argnums=(0, 1))(params, inputs)
                           for f in (ours.apply, reference.apply))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, expected_grads)
  for arch, first in (('cnn', 'conv_0'), ('resnet18', 'stem')):
    forward = networks.ARCHITECTURES.get(arch)(networks.ArchConfig(num_outputs=4, width_multiplier=0.125))
    modules = set()

    def recording(x, forward=forward, modules=modules):
      def record(method, args, kwargs, context):
        out = method(*args, **kwargs)
        if context.method_name == '__call__':
          modules.add((type(context.module), context.module.module_name))
        return out

      with hk.intercept_methods(record):
        return forward(x)

    hk.transform(recording).init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.uint8))
    assert (networks.OneChannelConv2D, first) in modules
    assert not any(kind is hk.Conv2D and name == first for kind, name in modules)
  with pytest.raises(ValueError, match='odd kernel'):
    hk.transform(lambda x: networks.OneChannelConv2D(4, 2)(x)).init(jax.random.PRNGKey(0), inputs)


def test_one_channel_convolutions_take_forward_over_reverse_derivatives():
  """Hessian-vector products (jvp of a gradient: the curvature diagnostics') through the CNN equal those of the
  same network written with hk.Conv2D."""
  import haiku as hk

  def make(layer):
    def forward(x):
      x = jax.nn.relu(layer(4, 5, name='conv')(x))
      return hk.Linear(1, name='head')(x.reshape(x.shape[0], -1))
    return hk.without_apply_rng(hk.transform(forward))

  reference, ours = make(hk.Conv2D), make(networks.OneChannelConv2D)
  inputs = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
  params = ours.init(jax.random.PRNGKey(1), inputs)
  tangent = jax.tree_util.tree_map(lambda leaf: jnp.ones_like(leaf) * 0.1, params)

  def hvp(apply):
    loss = lambda p: jnp.sum(apply(p, inputs) ** 2)
    return jax.jvp(jax.grad(loss), (params,), (tangent,))[1]

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), hvp(ours.apply),
                         hvp(reference.apply))
