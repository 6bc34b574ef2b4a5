"""Every conv/pool lowering computes what nn.Conv / nn.max_pool compute, with the same parameters."""

import importlib.metadata

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from melanoma_jax import models, optim, runtime, steps
from melanoma_jax.models import pointwise, seed_cnn_lowering as layers

LOWERINGS = sorted(layers.LOWERINGS)
JAXLIB = importlib.metadata.version('jaxlib')


def _conv_reference(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _close(actual, expected, tol=1e-5):
  """Agreement relative to the largest magnitude, as float round-off allows."""
  scale = float(jnp.max(jnp.abs(expected))) or 1.0
  np.testing.assert_allclose(np.asarray(actual) / scale, np.asarray(expected) / scale, atol=tol)


@pytest.mark.parametrize('impl', LOWERINGS)
@pytest.mark.parametrize('shape,features', [
    ((2, 12, 9, 3), 4),    # RGB input: the few-channel path; odd, non-square
    ((2, 10, 11, 16), 8),  # the matmul kernel-gradient path
])
def test_conv_matches_lax_in_value_and_gradients(impl, shape, features):
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], features))
  conv = layers.conv_general_dilated(impl)
  loss = lambda fn: lambda x, k: jnp.sum(jnp.sin(fn(x, k)))  # a non-uniform cotangent
  ours = lambda x, k: conv(x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  _close(jax.jit(ours)(x, kernel), _conv_reference(x, kernel))
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, kernel)
  expected = jax.grad(loss(_conv_reference), argnums=(0, 1))(x, kernel)
  for got, want in zip(grads, expected):
    _close(got, want)


@pytest.mark.parametrize('impl', LOWERINGS)
@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 5)])
def test_pool_matches_max_pool_in_value_and_gradient(impl, shape):
  x = jax.random.normal(jax.random.key(0), shape)  # continuous: no tied maxima
  reference = lambda y: nn.max_pool(y, (2, 2), strides=(2, 2))
  ours = lambda y: layers.max_pool_2x2(y, impl)
  np.testing.assert_array_equal(jax.jit(ours)(x), reference(x))
  loss = lambda fn: lambda y: jnp.sum(jnp.sin(fn(y)))
  np.testing.assert_allclose(jax.jit(jax.grad(loss(ours)))(x), jax.grad(loss(reference))(x),
                             rtol=1e-6)


def test_unsupported_convolutions_are_refused():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(NotImplementedError, match='VALID'):
    nn.Conv(4, (3, 3), padding='SAME', conv_general_dilated=layers.conv_general_dilated(
        'mixed')).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='Unknown conv_impl'):
    layers.resolve('winograd')


@pytest.mark.skipif(not runtime.cpu_xla_flags(JAXLIB),
                    reason=f'no XLA:CPU flags were measured on jaxlib {JAXLIB}')
def test_auto_picks_the_cpu_lowering_for_the_xla_flags(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert runtime.cpu_flags_active()  # conftest configures the runtime as launch.py does
  assert layers.resolve('auto') == 'padded'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert layers.resolve('auto') == 'mixed'


def _images(n=2, size=32):
  return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_model_checkpoints_and_gradients_carry_across_lowerings():
  images, labels = _images(), np.array([3, 7])
  init = lambda impl: models.SeedCNN(9, conv_impl=impl).init(jax.random.key(0), images, train=False)
  # Same names, shapes and dtypes: a checkpoint of one lowering restores in any other.
  shapes = {impl: jax.eval_shape(lambda: init(impl)) for impl in LOWERINGS}
  assert all(tree == shapes['native'] for tree in shapes.values())

  variables = init('native')

  def grads_and_logits(impl, params):
    def loss(params):
      logits, _ = models.SeedCNN(9, dropout_rate=0.0, conv_impl=impl).apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      return jnp.mean(steps.head_loss(logits, labels)), logits
    return jax.grad(loss, has_aux=True)(params)

  reference = jax.jit(lambda p: grads_and_logits('native', p))(variables['params'])
  for impl in set(LOWERINGS) - {'native'}:
    ours = jax.jit(lambda p, impl=impl: grads_and_logits(impl, p))(variables['params'])
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), ours, reference)


@pytest.mark.parametrize('impl', LOWERINGS)
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(impl):
  """Mixed precision: bf16 activations and convolutions, f32 params, grads and optimizer."""
  model = models.SeedCNN(9, dtype=jnp.bfloat16, conv_impl=impl, dropout_rate=0.0)
  tx = optim.PlateauOptimizer(optax.adam(1e-3), optim.keras_plateau(1e-3, 0.5, 2, 1e-4, 0, 1e-5),
                              1e-3)
  state = steps.create_train_state(jax.random.key(0), model, tx, (32, 32, 3))
  batch = {'image': _images(), 'label': np.array([3, 7], np.int32)}

  conv_dtypes = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        conv_dtypes.update(v.aval.dtype for v in eqn.invars)
    for sub in jax.extend.core.subjaxprs(jaxpr):
      visit(sub)

  visit(jax.make_jaxpr(steps.train_step)(state, batch).jaxpr)
  assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}

  def run(state, batch):
    variables = state.variables
    f32_logits = models.SeedCNN(9, conv_impl=impl).apply(variables, batch['image'], train=False)
    return steps.train_step(state, batch), model.apply(variables, batch['image'], train=False), f32_logits

  (new_state, metrics), bf16_logits, f32_logits = jax.jit(run)(state, batch)
  for tree in (new_state.params, new_state.model_state, new_state.opt_state):
    assert {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
  assert np.isfinite(float(metrics['loss'][0]))
  assert bf16_logits.dtype == jnp.float32
  _close(bf16_logits, f32_logits, 5e-2)


@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((0, 0), (0, 0))])
@pytest.mark.parametrize('shape', [(2, 8, 8, 6), (3, 7, 9, 5)])  # even and odd sides
def test_pointwise_conv_is_nn_conv_in_value_and_gradients(strides, padding, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  reference = nn.Conv(4, (1, 1), strides, padding=padding, use_bias=False)
  ours = reference.clone(conv_general_dilated=pointwise.conv_general_dilated)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  _close(jax.jit(ours.apply)(variables, x), reference.apply(variables, x))
  loss = lambda module: lambda v, y: jnp.sum(jnp.sin(module.apply(v, y)))  # a non-uniform cotangent
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  expected = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    _close(got, want)


def test_pointwise_conv_refuses_what_is_not_a_plain_1x1_convolution():
  x = jnp.ones((1, 6, 6, 4))
  for module in (nn.Conv(4, (3, 3), padding='VALID'), nn.Conv(4, (1, 1), padding=((1, 1), (1, 1))),
                 nn.Conv(4, (1, 1), kernel_dilation=2), nn.Conv(4, (1, 1), feature_group_count=2)):
    with pytest.raises(NotImplementedError, match='only 1x1 NHWC kernels'):
      module.clone(conv_general_dilated=pointwise.conv_general_dilated).init(jax.random.key(0), x)
