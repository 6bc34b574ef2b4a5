"""The plateau rule follows Keras ReduceLROnPlateau(monitor='val_loss') exactly."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from melanoma_jax import optim


def _config(lr=1e-3, factor=0.5, patience=2, min_delta=1e-4, cooldown=0, min_lr=1e-5):
  config = default.get_config('synthetic')
  config.learning_rate = lr
  config.plateau.update({'enabled': True, 'factor': factor, 'patience': patience,
                         'min_delta': min_delta, 'cooldown': cooldown, 'min_lr': min_lr})
  return config


def _ours(config, losses):
  tx = optim.make_optimizer(config)
  opt_state = tx.init({'w': jnp.zeros(3)})
  lrs = []
  for loss in losses:
    opt_state = tx.end_epoch(opt_state, loss)
    lrs.append(tx.current_learning_rate(opt_state))
  return lrs


def _keras(config, losses):
  keras = pytest.importorskip('keras')
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss='mse')
  p = config.plateau
  callback = keras.callbacks.ReduceLROnPlateau(
      monitor='val_loss', factor=p.factor, patience=p.patience, min_delta=p.min_delta,
      cooldown=p.cooldown, min_lr=p.min_lr)
  callback.set_model(model)
  callback.on_train_begin()
  lrs = []
  for epoch, loss in enumerate(losses):
    callback.on_epoch_end(epoch, {'val_loss': float(loss)})
    lrs.append(float(model.optimizer.learning_rate.numpy()))
  return lrs


def test_hand_worked_sequence():
  # patience 2: two epochs without an improvement of more than min_delta halve the LR.
  losses = [1.0, 0.9, 0.95, 0.9, 0.85, 0.84995, 0.86, 0.7]
  assert _ours(_config(), losses) == pytest.approx(
      [1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-6)


def test_min_lr_is_an_absolute_floor():
  lrs = _ours(_config(lr=1e-3, factor=0.1, patience=1, min_lr=5e-5), [1.0] * 6)
  assert lrs == pytest.approx([1e-3, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5], rel=1e-6)


@pytest.mark.parametrize('patience,cooldown,min_delta,factor',
                         list(itertools.product((1, 2, 3), (0, 1, 2, 3), (1e-4, 0.02), (0.5, 0.2))))
def test_matches_keras_on_random_walks(patience, cooldown, min_delta, factor):
  rng = np.random.default_rng(patience * 100 + cooldown * 10 + int(factor * 10))
  # Noisy, mostly decreasing losses with long plateaus: every rule gets exercised.
  losses = np.abs(1.0 + np.cumsum(rng.normal(-0.01, 0.03, 40)) * (rng.random(40) < 0.6))
  config = _config(factor=factor, patience=patience, min_delta=min_delta, cooldown=cooldown, min_lr=2e-5)
  assert _ours(config, losses) == pytest.approx(_keras(config, losses), rel=1e-5)


def test_zero_min_delta_is_refused_with_a_reason():
  with pytest.raises(ValueError, match='min_delta must be > 0'):
    optim.make_optimizer(_config(min_delta=0.0))


def test_train_updates_use_the_plateau_scale_and_leave_it_alone():
  config = _config(lr=0.1)
  tx = optim.make_optimizer(config)
  params = {'w': jnp.ones(2)}
  opt_state = tx.init(params)
  full, _ = tx.update({'w': jnp.ones(2)}, opt_state, params)
  for _ in range(3):  # three epochs without improvement: one halving (patience 2)
    opt_state = tx.end_epoch(opt_state, 1.0)
  halved, after = tx.update({'w': jnp.ones(2)}, opt_state, params)
  np.testing.assert_allclose(halved['w'], full['w'] / 2, rtol=1e-6)
  assert float(after[1].scale) == float(opt_state[1].scale) == 0.5
