"""Temperature scaling: probabilities that mean what they say.

A network trained to low loss is usually over-confident: of the images it
calls melanoma with p = 0.9, far fewer than 90% are. Temperature scaling
(Guo et al., 2017) divides the log-probabilities by one number T fitted on
validation by minimum negative log-likelihood; the predicted class never
changes (T > 0), only how sure the model claims to be. It works on
log-probabilities, so the softmax head and the 1-unit sigmoid head (whose
probabilities are [1 - p, p]) are scaled alike: softmax(log p / T) is
softmax(logits / T) for either.

The NLL is convex in 1/T, hence unimodal in log T, so a bounded Brent search
over log T finds the minimum.
"""

import math
from typing import Any

import numpy as np
from etils import epath
from scipy import optimize, special

from melanoma_jax import run_files

CALIBRATION_FILE = 'calibration.json'
# The search range of T: beyond it the validation set is too small to say more.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# Probabilities come as float32: a 0 is anything below its smallest normal.
_FLOOR = float(np.finfo(np.float32).tiny)


def log_probabilities(probs: np.ndarray) -> np.ndarray:
  """log p in float64, a probability that underflowed to 0 taken as float32's smallest."""
  return np.log(np.clip(np.asarray(probs, np.float64), _FLOOR, 1.0))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
  """The probabilities at temperature T: softmax(log p / T) per row."""
  return special.softmax(log_probabilities(probs) / temperature, axis=-1)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
  """Mean -log p(true class) after scaling by `temperature`."""
  scaled = log_probabilities(probs) / temperature
  labels = np.asarray(labels)
  return float(np.mean(special.logsumexp(scaled, axis=-1) - scaled[np.arange(len(labels)), labels]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
  """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] of least NLL on (probs, labels)."""
  if not len(labels):
    raise ValueError('No examples to fit a temperature on.')
  result = optimize.minimize_scalar(
      lambda log_t: negative_log_likelihood(probs, labels, math.exp(log_t)),
      bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)), method='bounded',
      options={'xatol': 1e-6})
  return float(math.exp(result.x))


def fit(probs: np.ndarray, labels: np.ndarray, checkpoint: dict[str, Any]) -> dict[str, Any]:
  """The calibration record stored with a run: T and the validation NLL before and after."""
  temperature = fit_temperature(probs, labels)
  return {
      'method': 'temperature scaling', 'temperature': temperature,
      'rule': 'p = softmax(log p_model / temperature)', 'fitted_on': 'validation',
      'num_examples': len(labels),
      'nll_before': negative_log_likelihood(probs, labels),
      'nll_after': negative_log_likelihood(probs, labels, temperature),
      'checkpoint': checkpoint,
  }


def write(workdir: epath.PathLike, calibration: dict[str, Any] | None) -> None:
  """Saves the temperature with the model, for evaluate and inference; process 0 only."""
  run_files.write_json(workdir, CALIBRATION_FILE, calibration)


def read(workdir: epath.PathLike) -> dict[str, Any] | None:
  return run_files.read_json(workdir, CALIBRATION_FILE)
