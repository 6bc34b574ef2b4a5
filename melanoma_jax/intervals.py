"""95% confidence intervals for the headline figures of a report.

A Test split of ~100 images cannot tell 0.85 from 0.75 sensitivity; every
headline figure says so with its interval. Proportions (sensitivity,
specificity, PPV, NPV, accuracy, per-class recall) get the exact binomial
(Clopper-Pearson) interval. Balanced accuracy and ROC AUC, which are not
one proportion, get a percentile interval from a stratified bootstrap:
resamples drawn with replacement within each true class, so every resample
keeps the split's class counts (no resample loses the rare class), seeded so
reports are reproducible. Resamples are weight matrices and every statistic
is computed for all of them at once in numpy.

In report.json an interval-carrying figure is {"value": v, "ci95": [lo, hi]};
`value` reads either form.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special  # not scipy.stats: its import slows the start of every run

from melanoma_jax import datasets, metrics

LEVEL = 0.95
NUM_RESAMPLES = 2000
SEED = 0


def clopper_pearson(successes: int, trials: int, level: float = LEVEL) -> tuple[float, float]:
  """Exact binomial interval of successes / trials; (NaN, NaN) without trials."""
  if trials <= 0:
    return math.nan, math.nan
  alpha = 1 - level
  # Quantiles of Beta distributions (scipy.stats.beta.ppf is the same function).
  lo = special.betaincinv(successes, trials - successes + 1, alpha / 2) if successes > 0 else 0.0
  hi = special.betaincinv(successes + 1, trials - successes, 1 - alpha / 2) if successes < trials else 1.0
  return float(lo), float(hi)


def stratified_resamples(strata: np.ndarray, num_resamples: int = NUM_RESAMPLES,
                         seed: int = SEED) -> np.ndarray:
  """Bootstrap indices [num_resamples, N]: row b, at each stratum's positions, draws that stratum.

  Each row is a resample with replacement within every stratum, so each
  keeps the strata's sizes.
  """
  strata = np.asarray(strata)
  rng = np.random.default_rng(seed)
  indices = np.empty((num_resamples, len(strata)), np.int64)
  for value in np.unique(strata):
    members = np.flatnonzero(strata == value)
    indices[:, members] = members[rng.integers(0, len(members), (num_resamples, len(members)))]
  return indices


def resample_counts(indices: np.ndarray) -> np.ndarray:
  """How often each example is drawn in each resample: weights [B, N]."""
  num_resamples, n = indices.shape
  flat = (np.arange(num_resamples)[:, None] * n + indices).ravel()
  return np.bincount(flat, minlength=num_resamples * n).reshape(num_resamples, n)


def weighted_recalls(weights: np.ndarray, labels: np.ndarray, correct: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Per-resample recall of each class [B, C] (NaN for a class absent from the labels)."""
  labels, correct = np.asarray(labels), np.asarray(correct, np.float64)
  one_hot = (labels[:, None] == np.arange(num_classes)).astype(np.float64)  # [N, C]
  hits, support = weights @ (one_hot * correct[:, None]), weights @ one_hot
  return metrics.ratio(hits, support)


def weighted_auc(weights: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """ROC AUC of each resample [B] (ties count one half); NaN without both classes.

  AUC = sum over positives i and negatives j of w_i w_j [s_i > s_j] (+1/2 if
  equal) / (W+ W-). The negatives below and tied with each positive score
  come from cumulative weights over the sorted negative scores, so the cost
  is B * N, not B * N+ * N-.
  """
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  if positive.all() or not positive.any():
    return np.full(len(weights), np.nan)
  order = np.argsort(scores[~positive], kind='stable')
  negative_scores, negative_weights = scores[~positive][order], weights[:, ~positive][:, order]
  cumulative = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(negative_weights, axis=1)], axis=1)
  below = np.searchsorted(negative_scores, scores[positive], side='left')
  not_above = np.searchsorted(negative_scores, scores[positive], side='right')
  wins = cumulative[:, below] + 0.5 * (cumulative[:, not_above] - cumulative[:, below])  # [B, N+]
  positive_weights = weights[:, positive]
  return (np.sum(positive_weights * wins, axis=1) /
          (positive_weights.sum(axis=1) * negative_weights.sum(axis=1)))


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
  """(lo, hi) percentiles of the defined bootstrap values; (NaN, NaN) when none is."""
  samples = np.asarray(samples, np.float64)
  samples = samples[~np.isnan(samples)]
  if not len(samples):
    return math.nan, math.nan
  lo, hi = np.percentile(samples, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
  return float(lo), float(hi)


def with_ci(value: Any, interval: tuple[float, float]) -> dict[str, Any]:
  """The report.json form of a figure with its interval (NaN as None)."""
  clean = lambda x: None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)
  return {'value': clean(value), 'ci95': [clean(interval[0]), clean(interval[1])]}


def value(figure: Any) -> Any:
  """A figure's value, with or without its interval."""
  return figure['value'] if isinstance(figure, dict) else figure


def add_intervals(split_report: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str], num_resamples: int = NUM_RESAMPLES,
                  seed: int = SEED) -> dict[str, Any]:
  """`clinical_report.report`'s dict with its headline figures as {"value", "ci95"}.

  Accuracy, per-class recall and the melanoma alert's sensitivity,
  specificity, PPV and NPV: Clopper-Pearson from the report's counts.
  Balanced accuracy, macro and per-class ROC AUC: stratified bootstrap of
  `probs` and `labels` (the predictions the report was computed from).
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  result = {**split_report, 'per_class': {k: dict(v) for k, v in split_report['per_class'].items()}}
  num_classes = len(class_names)
  weights = resample_counts(stratified_resamples(labels, num_resamples, seed)).astype(np.float64)
  correct = np.argmax(probs, axis=-1) == labels
  recalls = weighted_recalls(weights, labels, correct, num_classes)
  present = np.bincount(labels, minlength=num_classes) > 0
  result['balanced_accuracy'] = with_ci(split_report['balanced_accuracy'], percentile_interval(
      np.mean(recalls[:, present], axis=1) if present.any() else np.full(num_resamples, np.nan)))
  result['accuracy'] = with_ci(split_report['accuracy'], clopper_pearson(int(correct.sum()), len(labels)))
  aucs = np.stack([weighted_auc(weights, probs[:, c], labels == c) for c in range(num_classes)], axis=1)
  defined = ~np.all(np.isnan(aucs), axis=0)
  result['macro_roc_auc'] = with_ci(split_report['macro_roc_auc'], percentile_interval(
      np.mean(aucs[:, defined], axis=1) if defined.any() else np.full(num_resamples, np.nan)))
  confusion = np.asarray(split_report['confusion_matrix'])
  for c, name in enumerate(class_names):
    entry = result['per_class'][name]
    entry['recall'] = with_ci(entry['recall'], clopper_pearson(int(confusion[c, c]), int(confusion[c].sum())))
    entry['roc_auc'] = with_ci(entry['roc_auc'], percentile_interval(aucs[:, c]))
  melanoma = split_report.get('melanoma')
  if melanoma is not None:
    melanoma = result['melanoma'] = dict(melanoma)
    m = list(class_names).index(datasets.MELANOMA)
    melanoma['roc_auc'] = with_ci(melanoma['roc_auc'], percentile_interval(aucs[:, m]))
    if melanoma.get('threshold') is not None:
      tp, fn = melanoma['true_positives'], melanoma['false_negatives']
      fp, tn = melanoma['false_positives'], melanoma['true_negatives']
      for key, (k, n) in (('sensitivity', (tp, tp + fn)), ('specificity', (tn, tn + fp)),
                          ('ppv', (tp, tp + fp)), ('npv', (tn, tn + fn))):
        melanoma[key] = with_ci(melanoma[key], clopper_pearson(k, n))
  result['intervals'] = (
      f'95% intervals: Clopper-Pearson (exact binomial) for accuracy, recall, sensitivity, '
      f'specificity, PPV and NPV; percentile of a stratified bootstrap ({num_resamples} resamples '
      f'within each true class, seed {seed}) for balanced accuracy and ROC AUC.')
  return result


def format_figure(figure: Any) -> str | None:
  """'0.850 (0.62-0.97)' for a figure with its interval, None for a plain one."""
  if not isinstance(figure, dict):
    return None
  if figure['value'] is None:
    return 'n/a'
  lo, hi = figure['ci95']
  return f'{figure["value"]:.3f}' + ('' if lo is None else f' ({lo:.2f}-{hi:.2f})')
