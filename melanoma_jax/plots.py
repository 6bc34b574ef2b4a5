"""Every figure: dataset overview, training curves, confusion matrices, ROC curves, reliability, Grad-CAM.

Plain matplotlib over numbers computed elsewhere (`metrics`, `clinical_report`,
`reporting`, `saliency`), so what a figure shows is what the report says.
"""

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from etils import epath

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

CONFUSION_PNG = 'confusion_matrix.png'
ROC_PNG = 'roc_curves.png'
RELIABILITY_PNG = 'reliability.png'
REPORT_PLOTS = {'confusion matrix': CONFUSION_PNG, 'ROC curves': ROC_PNG,
                'reliability diagram': RELIABILITY_PNG}

# (false positive rate, true positive rate, AUC) of one curve.
Curve = tuple[np.ndarray, np.ndarray, float]


def _save(fig: matplotlib.figure.Figure, path: epath.PathLike) -> None:
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, dpi=100)
  plt.close(fig)


def confusion_matrices(path: epath.PathLike, confusion: Sequence[Sequence[int]],
                       class_names: Sequence[str]) -> None:
  """Counts, and rows normalised to 1 (each true class's recall on the diagonal)."""
  counts = np.asarray(confusion, np.float64)
  support = counts.sum(axis=1, keepdims=True)
  normalised = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
  n = len(class_names)
  fig, axes = plt.subplots(1, 2, figsize=(2 * (2.5 + 0.55 * n), 2 + 0.55 * n))
  for ax, values, title, fmt in ((axes[0], counts, 'counts', '{:.0f}'),
                                 (axes[1], normalised, 'row-normalised (recall on diagonal)', '{:.2f}')):
    ax.imshow(values, cmap='Blues', vmin=0)
    for (i, j), v in np.ndenumerate(values):
      ax.text(j, i, fmt.format(v), ha='center', va='center', fontsize=8,
              color='white' if v > 0.6 * values.max() else 'black')
    ax.set(xticks=range(n), yticks=range(n), xlabel='predicted', ylabel='true', title=title)
    ax.set_xticklabels(class_names, rotation=45, ha='right')
    ax.set_yticklabels(class_names)
  _save(fig, path)


def roc_curves(path: epath.PathLike, curves: Mapping[str, Curve], melanoma: str | None,
               operating_point: tuple[float, float] | None) -> None:
  """Melanoma vs rest with the alert's (1 - specificity, sensitivity), and every class vs rest.

  Classes absent from the labels have no curve and are not in `curves`.
  """
  panels = ([melanoma] if melanoma in curves else []) + [None]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
  for ax, only in zip(axes[0], panels):
    for name, (fpr, tpr, auc) in curves.items():
      if only in (None, name):
        ax.plot(fpr, tpr, label=f'{name} (AUC {auc:.3f})', lw=2 if only else 1.2)
    if only is not None and operating_point is not None:
      ax.plot(*operating_point, 'ro', ms=8, label='alert threshold (1 - spec., sens.)')
    ax.plot([0, 1], [0, 1], 'k:', lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel='false positive rate (1 - specificity)',
           ylabel='true positive rate (sensitivity)',
           title=f'{only} vs rest' if only else 'each class vs rest')
    ax.legend(loc='lower right', fontsize=8)
  _save(fig, path)


def reliability_diagrams(path: epath.PathLike, panels: Mapping[str, Mapping[str, Any]]) -> None:
  """Observed frequency vs mean predicted probability per bin, with the bin counts below."""
  fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 7), squeeze=False,
                           gridspec_kw={'height_ratios': (3, 1)}, sharex='col')
  for (title, bins), top, bottom in zip(panels.items(), axes[0], axes[1]):
    mean = np.asarray(bins['mean_probability'], np.float64)
    frequency = np.asarray(bins['frequency'], np.float64)
    edges = np.linspace(0, 1, len(mean) + 1)
    top.plot([0, 1], [0, 1], 'k:', lw=1, label='perfect calibration')
    top.bar(edges[:-1], np.nan_to_num(frequency), width=np.diff(edges), align='edge',
            alpha=0.35, edgecolor='C0', label='observed frequency per bin')
    top.plot(mean, frequency, 'o-', color='C3', label='(mean probability, frequency)')
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel='observed frequency', title=title)
    top.legend(loc='upper left', fontsize=8)
    bottom.bar(edges[:-1], bins['count'], width=np.diff(edges), align='edge', color='grey')
    bottom.set(xlabel='predicted probability', ylabel='examples')
  _save(fig, path)


def grad_cam_overlay(path: epath.PathLike, image: np.ndarray, cam: np.ndarray, title: str) -> None:
  """The image as the model saw it, and with the Grad-CAM map over it."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.8), gridspec_kw={'width_ratios': (1, 1.08)})
  axes[0].imshow(image)
  axes[0].set_title('input')
  axes[1].imshow(image)
  shown = axes[1].imshow(cam, cmap='jet', alpha=0.45, vmin=0, vmax=1)
  axes[1].set_title('Grad-CAM')
  fig.colorbar(shown, ax=axes[1], fraction=0.046, label='relative evidence')
  fig.suptitle(title)
  for ax in axes:
    ax.axis('off')
  _save(fig, path)


def dataset_overview(path: epath.PathLike, class_names: Sequence[str],
                     counts: Mapping[str, Sequence[float]], samples: Sequence[np.ndarray | None]) -> None:
  """Images per class for each split (bars, `counts` keyed by legend label), and one sample image per class."""
  n = len(class_names)
  fig = plt.figure(figsize=(max(10, 1.4 * n), 4 + 0.35 * n + 1.8))
  grid = fig.add_gridspec(2, n, height_ratios=(4 + 0.35 * n, 1.8))
  bars = fig.add_subplot(grid[0, :])
  height = 0.8 / len(counts)
  positions = np.arange(n)
  for i, (label, values) in enumerate(counts.items()):
    shown = bars.barh(positions + (i - (len(counts) - 1) / 2) * height, values, height, label=label)
    bars.bar_label(shown, fmt='%.0f', fontsize=7, padding=2)
  bars.set(yticks=positions, xlabel='images', title='Images per class and split')
  bars.set_yticklabels(class_names)
  bars.invert_yaxis()
  bars.legend(loc='lower right', fontsize=8)
  for c, (name, image) in enumerate(zip(class_names, samples)):
    ax = fig.add_subplot(grid[1, c])
    if image is not None:
      ax.imshow(image)
    ax.set_title('\n'.join(textwrap.wrap(name, 14)), fontsize=8)
    ax.axis('off')
  _save(fig, path)


def training_curves(path: epath.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
  """Accuracy, loss and learning rate per epoch of the training history, train vs validation."""
  epochs = [row['epoch'] for row in history]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, metric in zip(axes[:2], ('accuracy', 'loss')):
    ax.plot(epochs, [row[f'train_{metric}'] for row in history], 'o-', label='train')
    ax.plot(epochs, [row[f'val_{metric}'] for row in history], 'o-', label='validation')
    ax.set(xlabel='epoch', ylabel=metric, title=metric)
    ax.legend()
  axes[0].plot(epochs, [row['val_balanced_accuracy'] for row in history], 's--',
               label='validation (balanced)')
  axes[0].legend()
  axes[2].semilogy(epochs, [row['lr'] for row in history], 'o-')
  axes[2].set(xlabel='epoch', ylabel='learning rate', title='learning rate')
  _save(fig, path)
