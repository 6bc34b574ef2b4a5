"""Every metric, computed in one place: step summaries and the clinical metrics.

Host summaries of the steps' (sum, count) pairs, and the clinical metrics of
predictions (per-class rates, ROC, calibration, the melanoma threshold).

The clinical metrics are numpy over whole prediction sets, so figures do not
depend on how many devices or hosts ran the model. Undefined values (0/0, a
class absent from the labels) are NaN.
"""

import math
from typing import Any

import jax
import numpy as np

from melanoma_jax.steps import Metrics

NUM_CALIBRATION_BINS = 15
CALIBRATION_BINNING = (
    f'{NUM_CALIBRATION_BINS} equal-width bins of the probability over [0, 1], each closed on the '
    'right (the first also on the left); ECE = sum over bins of (examples in bin / N) * '
    '|observed frequency - mean probability|. Overall ECE bins the top-class probability '
    '(outcome: prediction correct); melanoma ECE bins p(melanoma) (outcome: is melanoma).')


def accumulate(total: Metrics | None, metrics: Metrics) -> Metrics:
  """Adds one step's metric pairs to a running total, on device."""
  return metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)


def to_json(metrics: Metrics) -> dict[str, Any]:
  """Running sums as JSON (float32 values are exact as Python floats)."""
  return {name: [np.asarray(v).tolist() for v in pair] for name, pair in jax.device_get(metrics).items()}


def from_json(saved: dict[str, Any]) -> Metrics:
  return {name: tuple(np.asarray(v, np.float32) for v in pair) for name, pair in saved.items()}


def summarize(metrics: Metrics, prefix: str) -> dict[str, Any]:
  """Exact means from summed pairs, plus balanced accuracy and per-class recall.

  Balanced accuracy is the mean recall over the classes present in the
  labels, as in scikit-learn.
  """
  host = jax.device_get(metrics)
  summary = {f'{prefix}_{name}': float(total) / float(count)
             for name, (total, count) in host.items() if name not in ('confusion', 'nonfinite')}
  summary[f'{prefix}_nonfinite_steps'] = int(host['nonfinite'][0]) if 'nonfinite' in host else 0
  confusion = np.asarray(host['confusion'][0])
  recall = per_class_metrics(confusion)['recall']
  summary[f'{prefix}_balanced_accuracy'] = nanmean(recall)
  summary[f'{prefix}_recall_per_class'] = [None if np.isnan(r) else float(r) for r in recall]
  summary[f'{prefix}_confusion'] = confusion.astype(int).tolist()
  return summary


def ratio(numerator: Any, denominator: Any) -> np.ndarray:
  """numerator / denominator, NaN where the denominator is 0."""
  numerator, denominator = np.broadcast_arrays(np.asarray(numerator, np.float64),
                                               np.asarray(denominator, np.float64))
  return np.divide(numerator, denominator, out=np.full(numerator.shape, np.nan),
                   where=denominator > 0)


def nanmean(values: np.ndarray) -> float:
  """Mean of the defined values; NaN (no warning) when none is."""
  values = np.asarray(values, np.float64)
  return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else math.nan


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts [true class, predicted class]."""
  flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """One-vs-rest support, precision, recall (sensitivity), specificity and F1 per class.

  F1 is 2 TP / (2 TP + FP + FN), so a class absent from the labels but
  predicted scores 0, and one neither present nor predicted is undefined
  (as scikit-learn with zero_division=NaN).
  """
  tp = np.diag(confusion).astype(np.float64)
  fp = confusion.sum(axis=0) - tp
  fn = confusion.sum(axis=1) - tp
  tn = confusion.sum() - tp - fp - fn
  return {
      'support': confusion.sum(axis=1),
      'precision': ratio(tp, tp + fp),
      'recall': ratio(tp, tp + fn),
      'specificity': ratio(tn, tn + fp),
      'f1': ratio(2 * tp, 2 * tp + fp + fn),
  }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U), ties counting one half; NaN without both classes."""
  positive = np.asarray(positive, bool)
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  if not n_pos or not n_neg:
    return math.nan
  _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
  ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # Tied scores share their mean rank.
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(false positive rate, true positive rate, threshold) at every distinct score, alerting at >=.

  The first point is (0, 0) at threshold +inf, as scikit-learn's
  `roc_curve(drop_intermediate=False)`.
  """
  scores, positive = np.asarray(scores), np.asarray(positive, bool)
  order = np.argsort(-scores, kind='stable')
  scores, positive = scores[order], positive[order]
  last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # Last of each tied group.
  tps = np.cumsum(positive)[last]
  fps = last + 1 - tps
  return (np.r_[0.0, ratio(fps, fps[-1])], np.r_[0.0, ratio(tps, tps[-1])],
          np.r_[np.inf, scores[last]])


def binary_at_threshold(p_positive: np.ndarray, positive: np.ndarray,
                        threshold: float) -> dict[str, Any]:
  """Alert counts and rates when alerting at p >= threshold."""
  alert = np.asarray(p_positive) >= threshold
  positive = np.asarray(positive, bool)
  tp, fn = int(np.sum(alert & positive)), int(np.sum(~alert & positive))
  fp, tn = int(np.sum(alert & ~positive)), int(np.sum(~alert & ~positive))
  return {
      'sensitivity': float(ratio(tp, tp + fn)),
      'specificity': float(ratio(tn, tn + fp)),
      'ppv': float(ratio(tp, tp + fp)),
      'npv': float(ratio(tn, tn + fn)),
      'true_positives': tp, 'false_negatives': fn, 'false_positives': fp, 'true_negatives': tn,
  }


def reliability(probability: np.ndarray, outcome: np.ndarray,
                num_bins: int = NUM_CALIBRATION_BINS) -> dict[str, np.ndarray]:
  """Per bin (see CALIBRATION_BINNING): count, mean probability, observed frequency (NaN if empty)."""
  probability = np.asarray(probability, np.float64)
  bins = np.searchsorted(np.linspace(0.0, 1.0, num_bins + 1)[1:-1], probability, side='left')
  count = np.bincount(bins, minlength=num_bins)
  return {
      'count': count,
      'mean_probability': ratio(np.bincount(bins, probability, num_bins), count),
      'frequency': ratio(np.bincount(bins, np.asarray(outcome, np.float64), num_bins), count),
  }


def expected_calibration_error(probability: np.ndarray, outcome: np.ndarray,
                               num_bins: int = NUM_CALIBRATION_BINS) -> float:
  """Count-weighted mean |frequency - mean probability| over the bins of CALIBRATION_BINNING."""
  bins = reliability(probability, outcome, num_bins)
  gaps = np.abs(bins['frequency'] - bins['mean_probability'])
  return float(np.sum(np.where(bins['count'] > 0, gaps * bins['count'], 0.0)) / len(probability))


def choose_threshold(p_melanoma: np.ndarray, is_melanoma: np.ndarray,
                     target_sensitivity: float) -> float:
  """The highest threshold on p(melanoma) whose sensitivity here is >= the target.

  The highest, because raising the threshold never lowers specificity: of
  the thresholds that miss few enough melanomas, it raises fewest false
  alarms. Alerts are p >= threshold. Choose it on validation, not Test.
  """
  if not 0 < target_sensitivity <= 1:
    raise ValueError(f'target_sensitivity={target_sensitivity} must be in (0, 1].')
  scores = np.sort(np.asarray(p_melanoma)[np.asarray(is_melanoma, bool)])[::-1]
  if not len(scores):
    raise ValueError('No melanoma among the examples: cannot choose a threshold for a sensitivity.')
  # Melanomas that must alert; the tolerance keeps 0.9 * 30 from rounding up to 28.
  needed = max(1, math.ceil(target_sensitivity * len(scores) - 1e-9))
  return float(scores[needed - 1])
