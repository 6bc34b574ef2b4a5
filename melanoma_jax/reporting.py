"""Side effects of a run's progress: model table, dataset overview, history file, TensorBoard and curves.

The figures are drawn by `plots`; this module decides what and where.

Only process 0 writes; every function here is a no-op elsewhere.
"""

import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath

from melanoma_jax import input_pipeline, plots

MODEL_SUMMARY = 'model_summary.txt'
DATASET_OVERVIEW = 'dataset_overview.png'
CURVES_PNG = 'curves.png'


def write_model_summary(workdir: epath.PathLike, table: str) -> None:
  """Logs the model's layer table (`model_summary.layer_table`) and writes model_summary.txt."""
  if jax.process_index() != 0:
    return
  logging.info('Layer table (also in %s):\n%s', MODEL_SUMMARY, table)
  (epath.Path(workdir) / MODEL_SUMMARY).write_text(table + '\n')


def plot_dataset_overview(workdir: epath.PathLike, data: input_pipeline.Data,
                          drawn_per_epoch: np.ndarray) -> None:
  """dataset_overview.png: images per class in train (stored and as drawn per epoch), val and test.

  `drawn_per_epoch` is what the training stream draws of each class in an
  epoch, in expectation (after class balancing, if on); each class's sample
  is its first training image, as the model sees it before augmentation.
  """
  if jax.process_index() != 0:
    return
  n = len(data.class_names)
  count = lambda examples: np.bincount(examples.labels, minlength=n)
  counts = {'train (stored)': count(data.train), 'train (drawn per epoch)': drawn_per_epoch,
            'validation': count(data.val), 'test': count(data.test)}
  samples = [data.train.images[np.flatnonzero(data.train.labels == c)[0]] if count(data.train)[c] else None
             for c in range(n)]
  plots.dataset_overview(epath.Path(workdir) / DATASET_OVERVIEW, data.class_names, counts, samples)


def read_history(workdir: epath.PathLike) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / 'history.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(workdir: epath.PathLike, history: Sequence[dict[str, Any]]) -> None:
  """Rewrites history.jsonl whole, so it always matches the checkpointed run."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / 'history.jsonl'
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(''.join(json.dumps(row) + '\n' for row in history))
  tmp.replace(path)


def write_summaries(writer: tf.summary.SummaryWriter | None, row: dict[str, Any]) -> None:
  """Scalars of one history row, at its training step."""
  if writer is None:
    return
  with writer.as_default():
    for key, value in row.items():
      if key not in ('epoch', 'step') and isinstance(value, (int, float)):
        tf.summary.scalar(key, value, step=row['step'])
  writer.flush()


def plot_curves(workdir: epath.PathLike, history: Sequence[dict[str, Any]]) -> None:
  """curves.png: accuracy, loss and learning rate per epoch, train vs validation."""
  if jax.process_index() != 0 or not history:
    return
  plots.training_curves(epath.Path(workdir) / CURVES_PNG, history)
