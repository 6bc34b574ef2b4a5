"""train_step / eval_step: the same maths on 1 or 4 devices, under pmap or shard_map."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from melanoma_jax import models, optim, steps

SIZE = 32
GLOBAL_BATCH = 8


def _state(num_classes=9, dropout_rate=0.0, bn_momentum=0.9):
  """A tiny seed model. SGD, not Adam: Adam's first steps are ~lr * sign(grad),
  which turns float round-off in near-zero gradients into lr-sized differences
  and would hide whether two runs compute the same gradients."""
  model = models.SeedCNN(num_classes, dropout_rate=dropout_rate, bn_momentum=bn_momentum)
  tx = optim.PlateauOptimizer(optax.sgd(2e-3), optim.keras_plateau(2e-3, 0.5, 2, 1e-4, 0, 1e-5), 2e-3)
  return steps.create_train_state(jax.random.key(0), model, tx, (SIZE, SIZE, 3))


def _batches(n, num_classes=9, seed=0):
  """Learnable batches: each class has its own brightness, plus noise."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(n):
    labels = rng.integers(0, num_classes, GLOBAL_BATCH).astype(np.int32)
    base = (labels * (200 // num_classes))[:, None, None, None]
    noise = rng.integers(0, 50, (GLOBAL_BATCH, SIZE, SIZE, 3))
    batches.append({'image': (base + noise).astype(np.uint8), 'label': labels})
  return batches


def _per_device(batch, devices):
  return {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}


def _pmapped(fn, devices):
  return jax.pmap(functools.partial(fn, axis_name='d'), axis_name='d', in_axes=(None, 0),
                  out_axes=None, devices=jax.devices()[:devices])


def _max_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def test_four_devices_available():
  assert jax.device_count() == 4, 'tests/conftest.py should force 4 CPU devices'


@pytest.mark.parametrize('dropout_rate,num_steps', [(0.0, 3), (0.5, 1)])
def test_pmap_and_shard_map_give_identical_results(dropout_rate, num_steps):
  # With dropout, one step: the masks agree (the metrics show it), but later
  # steps amplify round-off through the sparse gradients.
  state = _state(dropout_rate=dropout_rate)
  mesh = jax.make_mesh((4,), ('d',))
  sharded = jax.jit(jax.shard_map(functools.partial(steps.train_step, axis_name='d'), mesh=mesh,
                                  in_specs=(P(), P('d')), out_specs=(P(), P())))
  pmapped = _pmapped(steps.train_step, 4)
  s_pmap, s_shard = state, state
  for batch in _batches(num_steps):
    s_pmap, m_pmap = pmapped(s_pmap, _per_device(batch, 4))
    s_shard, m_shard = sharded(s_shard, jax.device_put(batch, NamedSharding(mesh, P('d'))))
    # Same maths; the two lowerings may order float reductions differently.
    assert _max_diff(m_pmap, m_shard) < 1e-4
  assert _max_diff(s_pmap.params, s_shard.params) < 2e-5
  assert _max_diff(s_pmap.model_state, s_shard.model_state) < 2e-5
  assert int(s_pmap.step) == int(s_shard.step) == num_steps


def test_plain_jit_runs_without_a_device_axis():
  state, metrics = jax.jit(steps.train_step)(_state(), _batches(1)[0])
  assert int(state.step) == 1
  assert float(metrics['loss'][1]) == GLOBAL_BATCH


@pytest.mark.parametrize('num_classes', [9, 2])
def test_one_and_four_devices_follow_the_same_trajectory(num_classes):
  # Dropout off: its masks are drawn per device, so they differ by design.
  # num_classes 2 with a 1-unit head exercises the sigmoid path. Four steps:
  # round-off from the different reduction order grows with every step.
  outputs = 1 if num_classes == 2 else num_classes
  state1 = state4 = _state(outputs)
  losses1, losses4 = [], []
  for batch in _batches(4, num_classes):
    state1, m1 = _pmapped(steps.train_step, 1)(state1, _per_device(batch, 1))
    state4, m4 = _pmapped(steps.train_step, 4)(state4, _per_device(batch, 4))
    losses1.append(float(m1['loss'][0]))
    losses4.append(float(m4['loss'][0]))
  assert _max_diff(state1.params, _state(outputs).params) > 1e-3  # it trains
  np.testing.assert_allclose(losses4, losses1, rtol=1e-4)
  assert _max_diff(state1.params, state4.params) < 1e-4
  assert _max_diff(state1.model_state, state4.model_state) < 1e-4


def test_metrics_are_exact_sums_over_devices():
  state = _state()
  batch = _batches(1)[0]
  _, m = _pmapped(steps.train_step, 4)(state, _per_device(batch, 4))
  assert float(m['loss'][1]) == GLOBAL_BATCH
  assert float(np.sum(m['confusion'][0])) == GLOBAL_BATCH
  np.testing.assert_array_equal(np.sum(m['confusion'][0], axis=1),
                                np.bincount(batch['label'], minlength=9))


def test_eval_padding_never_counts():
  state = _state()
  batch = _batches(1)[0]
  real = 5
  masked = {'image': batch['image'].copy(), 'label': batch['label'].copy(),
            'mask': (np.arange(GLOBAL_BATCH) < real).astype(np.int32)}
  masked['image'][real:] = 255  # garbage in the padding must not matter
  masked['label'][real:] = 0
  unpadded = {'image': batch['image'][:real], 'label': batch['label'][:real], 'mask': np.ones(real, np.int32)}
  m_masked = _pmapped(steps.eval_step, 4)(state, _per_device(masked, 4))
  m_plain = jax.jit(steps.eval_step)(state, unpadded)
  assert float(m_masked['loss'][1]) == real
  np.testing.assert_allclose(m_masked['loss'][0], m_plain['loss'][0], rtol=1e-5)
  np.testing.assert_array_equal(m_masked['confusion'][0], m_plain['confusion'][0])


def test_dropout_differs_per_step():
  state = _state(dropout_rate=0.5)
  batch = _batches(1)[0]
  _, m_a = jax.jit(steps.train_step)(state, batch)
  _, m_b = jax.jit(steps.train_step)(state.replace(step=state.step + 1), batch)
  assert float(m_a['loss'][0]) != float(m_b['loss'][0])


@pytest.mark.parametrize('skip', [False, True])
def test_nonfinite_step_counts_nowhere_and_changes_nothing(skip):
  tx = optim.make_optimizer(_config_with(skip_nonfinite_steps=skip))
  model = models.SeedCNN(9, dropout_rate=0.0, bn_momentum=0.9)
  state = steps.create_train_state(jax.random.key(0), model, tx, (SIZE, SIZE, 3))
  batch = _batches(1)[0]
  batch = {'image': batch['image'].astype(np.float32), 'label': batch['label']}
  batch['image'][0, 0, 0, 0] = np.nan
  new_state, metrics = jax.jit(steps.train_step)(state, batch)
  assert float(metrics['nonfinite'][0]) == 1
  assert float(metrics['loss'][1]) == 0 and float(np.sum(metrics['confusion'][0])) == 0
  for part in ('params', 'model_state', 'opt_state'):  # equal bits; the plateau's best starts at inf
    jax.tree.map(np.testing.assert_array_equal, getattr(new_state, part), getattr(state, part))
  # The flag only tells the loop whether to stop: checkpoints fit either setting.
  other = optim.make_optimizer(_config_with(skip_nonfinite_steps=not skip))
  assert jax.tree.structure(other.init(state.params)) == jax.tree.structure(state.opt_state)


def _config_with(**overrides):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('synthetic')
  config.update(overrides)
  return config


def test_initial_state_is_flax_init_op_by_op():
  model = models.SeedCNN(9, dropout_rate=0.5)
  # One compiled init program (at LLVM level 1 on the CPU) gives flax's own op-by-op values, to the bit.
  state = steps.create_train_state(jax.random.key(3), model, optax.sgd(0.1), (SIZE, SIZE, 3))
  init_rng, _ = jax.random.split(jax.random.key(3))
  expected = model.init(init_rng, jnp.zeros((1, SIZE, SIZE, 3), jnp.uint8), train=False)
  assert jax.tree.structure(state.variables) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(state.variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  # Inside a trace (how a checkpoint's template is built) it traces without the compiler options.
  shapes = jax.eval_shape(lambda: steps.create_train_state(jax.random.key(3), model, optax.sgd(0.1),
                                                           (SIZE, SIZE, 3)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes.variables) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state.variables)


class _ListWidths(nn.Module):
  """A newcomer's model with a list field, which flax cannot hash."""
  widths: list

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.widths[0], name='head')(x.reshape(x.shape[0], -1).astype(jnp.float32))


@dataclasses.dataclass
class _PlainTx:
  """A research optimizer as a plain dataclass, which cannot be hashed."""
  inner: optax.GradientTransformation

  def init(self, params):
    return self.inner.init(params)


def _finetune_optimizer():
  from configs import finetune  # pylint: disable=g-import-not-at-top
  return optim.make_optimizer(finetune.get_config('synthetic'), steps_per_epoch=3)


@pytest.mark.parametrize('make', [_finetune_optimizer, lambda: _PlainTx(optax.adam(1e-3))])
def test_optimizer_state_is_optax_init_op_by_op(make):
  tx = make()
  params = {'conv': {'kernel': jnp.ones((3, 3, 3, 4)), 'bias': jnp.ones(4)},
            'head': {'kernel': jnp.full((4, 9), 0.5), 'bias': jnp.zeros(9)}}
  got, expected = steps.init_optimizer(tx, params), tx.init(params)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert g.dtype == e.dtype
    np.testing.assert_array_equal(g, e)


def test_a_model_flax_cannot_hash_initialises_as_flax_does():
  model = _ListWidths([3])
  state = steps.create_train_state(jax.random.key(1), model, optax.sgd(0.1), (4, 4, 3))
  init_rng, _ = jax.random.split(jax.random.key(1))
  expected = model.init(init_rng, jnp.zeros((1, 4, 4, 3), jnp.uint8))
  np.testing.assert_array_equal(state.params['head']['kernel'], expected['params']['head']['kernel'])
