"""Temperature scaling against a direct NLL grid search and temperatures known by construction."""

import numpy as np
import pytest
from scipy import special

from melanoma_jax import calibration


def _sample(rng, logits, temperature):
  """Labels drawn from softmax(logits / temperature): the true temperature is known."""
  p = special.softmax(logits / temperature, axis=-1)
  return (rng.random((len(p), 1)) > np.cumsum(p, axis=-1)).sum(axis=-1)


def _grid_nll(probs, labels, temperatures):
  """NLL at each temperature, computed directly from the definition."""
  log_p = np.log(probs)
  out = []
  for t in temperatures:
    q = np.exp(log_p / t)
    q /= q.sum(axis=1, keepdims=True)
    out.append(-np.mean(np.log(q[np.arange(len(labels)), labels])))
  return np.array(out)


@pytest.mark.parametrize('true_temperature', [0.5, 2.5])
def test_softmax_fit_recovers_the_temperature_and_the_grid_minimum(true_temperature):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(20000, 5)) * 3
  labels = _sample(rng, logits, true_temperature)
  probs = special.softmax(logits, axis=-1).astype(np.float32)
  fitted = calibration.fit_temperature(probs, labels)
  assert fitted == pytest.approx(true_temperature, rel=0.05)
  grid = np.arange(0.3, 4.0, 0.001)
  assert fitted == pytest.approx(grid[np.argmin(_grid_nll(probs, labels, grid))], abs=2e-3)
  scaled = calibration.scale(probs, fitted)
  np.testing.assert_allclose(scaled, special.softmax(logits / fitted, axis=-1), atol=1e-5)
  np.testing.assert_array_equal(scaled.argmax(axis=1), probs.argmax(axis=1))


def test_sigmoid_head_is_scaled_as_its_logit():
  """A 1-unit head's [1 - p, p]: scaling is sigmoid(logit / T), and T is recovered."""
  rng = np.random.default_rng(1)
  logit = rng.normal(size=20000) * 3
  labels = (rng.random(20000) < special.expit(logit / 3.0)).astype(int)
  p = special.expit(logit)
  probs = np.stack([1 - p, p], axis=1).astype(np.float32)
  fitted = calibration.fit_temperature(probs, labels)
  assert fitted == pytest.approx(3.0, rel=0.05)
  np.testing.assert_allclose(calibration.scale(probs, fitted)[:, 1], special.expit(logit / fitted),
                             atol=1e-5)


def test_fit_record_lowers_validation_nll_and_refuses_no_examples():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(500, 3)) * 4
  labels = _sample(rng, logits, 2.0)
  probs = special.softmax(logits, axis=-1)
  record = calibration.fit(probs, labels, {'step': 7})
  assert record['nll_after'] < record['nll_before']
  assert record['nll_before'] == pytest.approx(_grid_nll(probs, labels, [1.0])[0])
  with pytest.raises(ValueError, match='No examples'):
    calibration.fit_temperature(probs[:0], labels[:0])
