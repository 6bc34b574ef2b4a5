"""Host-side summaries of the (sum, count) metric pairs the steps return."""

from typing import Any

import jax
import numpy as np

from melanoma_jax.steps import Metrics


def accumulate(total: Metrics | None, metrics: Metrics) -> Metrics:
  """Adds one step's metric pairs to a running total, on device."""
  return metrics if total is None else jax.tree.map(lambda a, b: a + b, total, metrics)


def summarize(metrics: Metrics, prefix: str) -> dict[str, Any]:
  """Exact means from summed pairs, plus balanced accuracy and per-class recall.

  Balanced accuracy is the mean recall over the classes present in the
  labels, as in scikit-learn.
  """
  host = jax.device_get(metrics)
  summary = {f'{prefix}_{name}': float(total) / float(count)
             for name, (total, count) in host.items() if name != 'confusion'}
  confusion = np.asarray(host['confusion'][0])
  support = confusion.sum(axis=1)
  recall = np.divide(np.diag(confusion), support, out=np.full(len(support), np.nan), where=support > 0)
  summary[f'{prefix}_balanced_accuracy'] = float(np.nanmean(recall))
  summary[f'{prefix}_recall_per_class'] = [None if np.isnan(r) else float(r) for r in recall]
  summary[f'{prefix}_confusion'] = confusion.astype(int).tolist()
  return summary
