"""Every conv/pool lowering computes what nn.Conv / nn.max_pool compute, with the same parameters."""

import importlib.metadata
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from melanoma_jax import models, optim, runtime, steps
from melanoma_jax.models import efficientnet, onednn, pointwise, seed_cnn_lowering as layers

ONEDNN_MISSING = onednn.unavailable_reason()
# The lowerings this machine runs ('onednn' needs the optional oneDNN wheels; CI installs them).
RUNNABLE = sorted(set(layers.LOWERINGS) - ({'onednn'} if ONEDNN_MISSING else set()))
LOWERINGS = [pytest.param(impl, marks=pytest.mark.skipif(
    impl not in RUNNABLE, reason=f'oneDNN unavailable: {ONEDNN_MISSING}')) for impl in sorted(layers.LOWERINGS)]
JAXLIB = importlib.metadata.version('jaxlib')


@pytest.fixture(params=['onednn', 'xla'])
def kernel_grad_by(request, monkeypatch):
  """Each way of computing a oneDNN layer's kernel gradient; which one a layer takes depends on the CPU."""
  monkeypatch.setattr(onednn, '_kernel_grad_by_xla', lambda *args: request.param == 'xla')


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


@pytest.mark.parametrize('impl', sorted(set(RUNNABLE) - {'native'}))
def test_pool_shares_the_gradient_of_tied_maxima_as_jnp_max(impl):
  """Ties (ReLU zeros) get jnp.max's equal shares: the gradient's sum per window is kept."""
  x = jnp.round(jax.random.normal(jax.random.key(0), (2, 7, 9, 5)))  # many ties
  h, w = 6, 8

  def reference(y):
    n, _, _, c = y.shape
    return y[:, :h, :w].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  loss = lambda fn: lambda y: jnp.sum(jnp.sin(fn(y)) * jnp.arange(1, 21).reshape(1, 1, 4, 5))
  got = jax.jit(jax.grad(loss(lambda y: layers.max_pool_2x2(y, impl))))(x)
  np.testing.assert_allclose(got, jax.grad(loss(reference))(x), rtol=1e-6)
  assert float(jnp.sum(jnp.abs(got[:, h:]))) == float(jnp.sum(jnp.abs(got[:, :, w:]))) == 0


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
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: None)
  assert layers.resolve('auto') == 'onednn'
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'onednn is not installed')
  assert layers.resolve('auto') == 'padded'
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert layers.resolve('auto') == 'mixed'


def test_onednn_refused_with_the_reason_where_it_cannot_run(monkeypatch):
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'onednn is not installed: pip install')
  with pytest.raises(ValueError, match="conv_impl='onednn' runs only on a CPU.*not installed"):
    layers.resolve('onednn')


def test_onednn_build_problems_say_what_to_install(tmp_path, monkeypatch):
  with pytest.raises(onednn.Unavailable, match=r"no-such-wheel is not installed: pip install -e '\.\[onednn\]'"):
    onednn._installed_file('no-such-wheel', 'dnnl.hpp')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  monkeypatch.setenv('CXX', 'no-such-compiler')
  with pytest.raises(onednn.Unavailable, match='no C\\+\\+ compiler'):
    onednn._build(str(tmp_path), [], 'key')
  assert not list(tmp_path.rglob('*.so'))


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
def test_onednn_gradients_are_the_same_bits_every_run(kernel_grad_by):
  """Bitwise resume needs a deterministic step: either kernel gradient reduces in a fixed order."""
  x = jax.random.normal(jax.random.key(0), (4, 20, 20, 16))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 16, 32))
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(onednn.conv(x, k))), argnums=(0, 1)))
  first = grad(x, kernel)
  for _ in range(3):
    jax.tree.map(np.testing.assert_array_equal, grad(x, kernel), first)


def _images(n=2, size=32):
  return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_model_checkpoints_and_gradients_carry_across_lowerings():
  images, labels = _images(), np.array([3, 7])
  init = lambda impl: models.SeedCNN(9, conv_impl=impl).init(jax.random.key(0), images, train=False)
  # Same names, shapes and dtypes: a checkpoint of one lowering restores in any other.
  shapes = {impl: jax.eval_shape(lambda: init(impl)) for impl in RUNNABLE}
  assert all(tree == shapes['native'] for tree in shapes.values())

  variables = init('native')
  for impl in RUNNABLE:  # the same initial values too: the same initialisers under the same names
    jax.tree.map(np.testing.assert_array_equal, init(impl), variables)

  def grads_and_logits(impl, params):
    def loss(params):
      logits, _ = models.SeedCNN(9, dropout_rate=0.0, conv_impl=impl).apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, images, train=True,
          mutable=['batch_stats'])
      return jnp.mean(steps.head_loss(logits, labels)), logits
    return jax.grad(loss, has_aux=True)(params)

  reference = jax.jit(lambda p: grads_and_logits('native', p))(variables['params'])
  for impl in set(RUNNABLE) - {'native'}:
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


def _assert_same_values_and_gradients(ours: nn.Module, reference: nn.Module, variables: dict,
                                      x: jax.Array):
  """`ours` (jitted) gives `reference`'s outputs and its gradients for the variables and the input."""
  _close(jax.jit(ours.apply)(variables, x), reference.apply(variables, x))
  loss = lambda module: lambda v, y: jnp.sum(jnp.sin(module.apply(v, y)))  # a non-uniform cotangent
  grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  expected = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    _close(got, want)


@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((0, 0), (0, 0))])
@pytest.mark.parametrize('shape', [(2, 8, 8, 6), (3, 7, 9, 5)])  # even and odd sides
def test_pointwise_conv_is_nn_conv_in_value_and_gradients(strides, padding, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  reference = nn.Conv(4, (1, 1), strides, padding=padding, use_bias=False)
  ours = reference.clone(conv_general_dilated=pointwise.conv_general_dilated)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  _assert_same_values_and_gradients(ours, reference, variables, x)


def test_pointwise_conv_refuses_what_is_not_a_plain_1x1_convolution():
  x = jnp.ones((1, 6, 6, 4))
  for module in (nn.Conv(4, (3, 3), padding='VALID'), nn.Conv(4, (1, 1), padding=((1, 1), (1, 1))),
                 nn.Conv(4, (1, 1), kernel_dilation=2), nn.Conv(4, (1, 1), feature_group_count=2)):
    with pytest.raises(NotImplementedError, match='only 1x1 NHWC kernels'):
      module.clone(conv_general_dilated=pointwise.conv_general_dilated).init(jax.random.key(0), x)


def _ops_in(fn, *args) -> set[str]:
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
@pytest.mark.parametrize('kernel,strides,padding', [
    (3, 1, 'SAME'), (3, 2, 'SAME'), (3, 2, ((0, 1), (1, 0))),  # ResNet, EfficientNet stem
    (7, 2, ((3, 3), (3, 3))), (4, 4, 'VALID')])                 # ResNet stem, ViT patches
@pytest.mark.parametrize('shape', [(2, 12, 12, 3), (3, 9, 11, 5)])  # even and odd sides
def test_onednn_conv_is_nn_conv_in_value_and_gradients(kernel, strides, padding, shape, kernel_grad_by):
  x = jax.random.normal(jax.random.key(0), shape)
  reference = nn.Conv(4, (kernel, kernel), strides, padding=padding)
  ours = reference.clone(conv_general_dilated=onednn.conv_general_dilated)
  variables = reference.init(jax.random.key(1), x)
  assert 'ffi_call' in _ops_in(jax.grad(lambda v: jnp.sum(ours.apply(v, x))), variables)
  _assert_same_values_and_gradients(ours, reference, variables, x)


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
@pytest.mark.parametrize('groups,features', [(2, 6), (8, 8)])  # grouped; depthwise
@pytest.mark.parametrize('strides', [1, 2])
def test_onednn_grouped_conv_is_nn_conv_in_value_and_gradients(groups, features, strides):
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, 8))
  reference = nn.Conv(features, (3, 3), strides, padding='SAME', feature_group_count=groups)
  ours = reference.clone(conv_general_dilated=onednn.conv_general_dilated)
  variables = reference.init(jax.random.key(1), x)
  assert 'ffi_call' in _ops_in(jax.grad(lambda v: jnp.sum(ours.apply(v, x))), variables)
  _assert_same_values_and_gradients(ours, reference, variables, x)


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
@pytest.mark.parametrize('shape,features', [((2, 12, 9, 3), 4), ((3, 9, 11, 16), 8)])
def test_seed_conv_relu_fused_by_onednn_is_relu_of_nn_conv(shape, features, kernel_grad_by):
  """Bias and ReLU inside oneDNN's convolution, the bias gradient with the kernel's: nn.Conv + relu."""
  x = jax.random.normal(jax.random.key(0), shape)
  conv = nn.Conv(features, (3, 3), padding='VALID')
  reference = nn.Sequential([conv, nn.relu])
  ours = nn.Sequential([layers.conv_relu(features, 'onednn', jnp.float32, 'layers_0')])
  variables = reference.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + 0.1, variables)  # a non-zero bias
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  assert 'ffi_call' in _ops_in(jax.grad(lambda v: jnp.sum(ours.apply(v, x))), variables)
  _assert_same_values_and_gradients(ours, reference, variables, x)


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
@pytest.mark.parametrize('names,by_xla', [
    (('brg_conv_fwd:avx512_core', 'brg_conv_bwd_d:avx512_core', 'jit:avx512_core'), False),
    (('brg_conv_fwd:avx2', 'brg_conv_bwd:avx2+brg_conv_fwd:avx2', 'jit:avx2'), True),
    (('brg_conv_fwd:avx2', 'brgconv_strided:avx2', 'x64:gemm:jit'), True)])
def test_kernel_gradients_leave_onednn_where_it_has_no_avx512_kernel_for_them(names, by_xla, monkeypatch):
  """oneDNN's kernel gradients without AVX-512 were measured slower than XLA's (`benchmarks/conv_layers.py`)."""
  monkeypatch.setattr(onednn, 'implementations', lambda *args: names)
  x, kernel, depthwise = jnp.zeros((2, 8, 8, 4)), jnp.zeros((3, 3, 4, 8)), jnp.zeros((3, 3, 1, 4))
  assert onednn._kernel_grad_by_xla(x, kernel, (1, 1), ((1, 1), (1, 1)), False) == by_xla
  assert not onednn._kernel_grad_by_xla(x, depthwise, (1, 1), ((1, 1), (1, 1)), False)


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
def test_onednn_names_the_kernels_it_runs():
  names = onednn.implementations((2, 12, 12, 8), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)))
  assert len(names) == 3 and all(':' in name for name in names), names


@pytest.mark.parametrize('on_onednn', [pytest.param(True, marks=pytest.mark.skipif(
    bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')), False])
@pytest.mark.parametrize('kernel,strides', [(3, 1), (3, 2), (5, 2)])
def test_efficientnet_depthwise_conv_is_grouped_nn_conv(on_onednn, kernel, strides, monkeypatch):
  """Both of its CPU paths (oneDNN's depthwise kernels, shifted products) compute nn.Conv's function."""
  if not on_onednn:
    monkeypatch.setattr(onednn, 'runs', lambda *arrays: False)
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, 8))
  reference = nn.Conv(8, (kernel, kernel), strides, padding='SAME', feature_group_count=8, use_bias=False)
  ours = efficientnet.DepthwiseConv(kernel, strides, jnp.float32)
  variables = reference.init(jax.random.key(1), x)
  assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(variables)
  assert ('ffi_call' in _ops_in(jax.grad(lambda v: jnp.sum(ours.apply(v, x))), variables)) == on_onednn
  _assert_same_values_and_gradients(ours, reference, variables, x)


@pytest.mark.parametrize('module', [nn.Conv(4, (3, 3), kernel_dilation=2),
                                    nn.Conv(4, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)])
def test_onednn_conv_leaves_what_it_does_not_take_to_xla(module):
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4))
  ours = module.clone(conv_general_dilated=onednn.conv_general_dilated)
  variables = module.init(jax.random.key(1), x)
  assert 'ffi_call' not in _ops_in(ours.apply, variables, x)
  np.testing.assert_array_equal(jax.jit(ours.apply)(variables, x), jax.jit(module.apply)(variables, x))


@pytest.mark.skipif(bool(ONEDNN_MISSING), reason=f'oneDNN unavailable: {ONEDNN_MISSING}')
def test_a_machine_where_onednn_cannot_run_trains_on_xla_and_says_why():
  """oneDNN installed but unable to run (here: no OpenCL CPU runtime to reach) is found before any step."""
  code = ('from melanoma_jax.models import onednn, seed_cnn_lowering as s; '
          "print(s.resolve('auto')); print(onednn.unavailable_reason())")
  env = {**os.environ, 'OCL_ICD_FILENAMES': '/nonexistent/libintelocl.so'}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       check=True, timeout=300).stdout.splitlines()
  assert out[0] in ('padded', 'mixed')
  assert out[1].startswith('oneDNN cannot run a convolution on this machine: ')
