"""Evaluation statistics track the current weights from the first epoch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from melanoma_jax import models, optim, steps
from melanoma_jax.models import seed_cnn

STEPS_PER_EPOCH = 10


def _running_vs_true_mean_error(bn_momentum: float) -> float:
  """Relative error of bn3's running mean after one epoch, vs the true mean."""
  rng = np.random.default_rng(0)
  images = rng.integers(60, 200, (STEPS_PER_EPOCH, 16, 32, 32, 3)).astype(np.uint8)
  labels = rng.integers(0, 3, (STEPS_PER_EPOCH, 16)).astype(np.int32)
  model = models.SeedCNN(3, dropout_rate=0.0, bn_momentum=bn_momentum)
  tx = optim.PlateauOptimizer(optax.adam(1e-3), optim.keras_plateau(1e-3, 0.5, 2, 1e-4, 0, 1e-5), 1e-3)
  state = steps.create_train_state(jax.random.key(0), model, tx, (32, 32, 3))
  step = jax.jit(steps.train_step)
  for i in range(STEPS_PER_EPOCH):
    state, _ = step(state, {'image': images[i], 'label': labels[i]})
  _, intermediates = model.apply(state.variables,
                                 images.reshape(-1, 32, 32, 3), train=False,
                                 capture_intermediates=lambda mdl, _: mdl.name == 'conv3')
  true_mean = jnp.mean(jax.nn.relu(intermediates['intermediates']['conv3']['__call__'][0]), axis=(0, 1, 2))
  running_mean = state.model_state['batch_stats']['bn3']['mean']
  return float(jnp.linalg.norm(running_mean - true_mean) / jnp.linalg.norm(true_mean))


def test_derived_momentum_tracks_the_weights_where_keras_default_lags():
  derived = seed_cnn.derive_bn_momentum(STEPS_PER_EPOCH)
  assert derived < 0.99
  # ~0.10 (the weights move during the epoch, so the running mean, an
  # average over its last steps, cannot be exact) against ~0.93.
  assert _running_vs_true_mean_error(derived) < 0.2
  assert _running_vs_true_mean_error(0.99) > 0.5


def test_derived_momentum_is_bounded():
  assert seed_cnn.derive_bn_momentum(1) == 0.5
  assert seed_cnn.derive_bn_momentum(56) == pytest.approx(1 - 5 / 56)
  assert seed_cnn.derive_bn_momentum(10_000) == 0.99
