"""Training losses against a direct numpy computation and scikit-learn's class weights."""

import jax
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from configs import default
from melanoma_jax import losses
from melanoma_jax.errors import ConfigError


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference(logits, labels, smoothing=0.0, gamma=0.0, weights=None):
  """sum_k q_k (1 - p_k)^gamma (-log p_k), times the label's class weight."""
  if logits.shape[-1] == 1:
    logits = np.concatenate([np.zeros_like(logits), logits], -1)  # sigmoid = softmax over [0, z]
  log_p = _log_softmax(logits.astype(np.float64))
  k = log_p.shape[-1]
  q = np.eye(k)[labels] * (1 - smoothing) + smoothing / k
  loss = np.sum(q * (1 - np.exp(log_p)) ** gamma * -log_p, -1)
  return loss * (np.asarray(weights)[labels] if weights is not None else 1.0)


@pytest.mark.parametrize('units', [1, 4])
@pytest.mark.parametrize('smoothing, gamma', [(0.0, 0.0), (0.1, 0.0), (0.0, 2.0), (0.2, 1.5)])
def test_losses_equal_direct_computation(units, smoothing, gamma):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (16, units)).astype(np.float32)
  labels = rng.integers(0, max(units, 2), 16)
  weights = rng.uniform(0.5, 2, max(units, 2))
  ours = losses.Loss(smoothing, gamma, tuple(weights))(logits, labels)
  np.testing.assert_allclose(ours, _reference(logits, labels, smoothing, gamma, weights), rtol=2e-5)


def test_inverse_frequency_weights_equal_scikit_learn():
  labels = np.repeat(np.arange(4), [50, 10, 5, 35])
  expected = compute_class_weight('balanced', classes=np.arange(4), y=labels)
  np.testing.assert_allclose(losses.inverse_frequency_weights(np.bincount(labels)), expected)
  with pytest.raises(ConfigError, match='every class'):
    losses.inverse_frequency_weights(np.array([3, 0, 2]))


def test_config_selects_the_loss():
  config = default.get_config('synthetic').loss
  assert losses.make_loss(config, np.array([1, 3])) is None  # plain: the seed recipe's head_loss
  config.name = 'weighted_cross_entropy'
  assert losses.make_loss(config, np.array([1, 3])).class_weights == (2.0, 2 / 3)
  config.name = 'focal'
  assert losses.make_loss(config, None).focal_gamma == 2.0
  config.name = 'hinge'
  with pytest.raises(ConfigError, match='config.loss.name'):
    losses.make_loss(config, None)


def test_focal_loss_is_differentiable_where_confident():
  grad = jax.grad(lambda z: losses.Loss(focal_gamma=2.0)(z, np.array([0])).sum())(np.array([[30.0, -30.0]]))
  assert np.all(np.isfinite(grad))
