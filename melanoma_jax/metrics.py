"""Host-side summaries of the (sum, count) metric pairs the steps return."""

from typing import Any

import jax
import numpy as np

from melanoma_jax.steps import Metrics


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
  support = confusion.sum(axis=1)
  recall = np.divide(np.diag(confusion), support, out=np.full(len(support), np.nan), where=support > 0)
  summary[f'{prefix}_balanced_accuracy'] = float(np.nanmean(recall))
  summary[f'{prefix}_recall_per_class'] = [None if np.isnan(r) else float(r) for r in recall]
  summary[f'{prefix}_confusion'] = confusion.astype(int).tolist()
  return summary
