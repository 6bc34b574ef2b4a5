"""Grouped stratified k-fold CV, out-of-fold predictions, CV reports and ensembles."""

import numpy as np
import pytest
from sklearn import model_selection

from melanoma_jax import input_pipeline


def _lesions(seed, num_groups=120, num_classes=4):
  """Labels and group ids of lesions with 1-4 images each, one class per lesion, imbalanced."""
  rng = np.random.default_rng(seed)
  group_class = rng.choice(num_classes, num_groups, p=np.linspace(2, 1, num_classes) / np.linspace(2, 1, num_classes).sum())
  sizes = rng.integers(1, 5, num_groups)
  labels = np.repeat(group_class, sizes)
  groups = np.repeat([f'lesion{g}' for g in range(num_groups)], sizes)
  order = rng.permutation(len(labels))
  return labels[order], groups[order], sizes.max()


def _class_proportion_spread(labels, folds, num_folds):
  """Mean over classes of the standard deviation over folds of the class's share of the fold."""
  shares = np.array([np.bincount(labels[folds == f], minlength=labels.max() + 1) / np.sum(folds == f)
                     for f in range(num_folds)])
  return shares.std(axis=0).mean()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_folds_keep_groups_whole_and_classes_stratified(seed):
  labels, groups, largest = _lesions(seed)
  folds = input_pipeline.assign_folds(labels, groups, 5, seed=seed)
  assert set(folds.tolist()) == set(range(5))
  for group in np.unique(groups):  # Every group in exactly one fold.
    assert len(set(folds[groups == group].tolist())) == 1
  for c in np.unique(labels):  # Direct counting: per-class counts differ by at most one lesion.
    counts = np.bincount(folds[labels == c], minlength=5)
    assert counts.max() - counts.min() <= largest, (c, counts)
  sizes = np.bincount(folds, minlength=5)
  assert sizes.max() - sizes.min() <= 2 * largest


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_folds_are_as_stratified_as_scikit_learns(seed):
  labels, groups, _ = _lesions(seed, num_groups=200)
  ours = input_pipeline.assign_folds(labels, groups, 5, seed=seed)
  theirs = np.empty(len(labels), int)
  splitter = model_selection.StratifiedGroupKFold(5, shuffle=True, random_state=seed)
  for f, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
    theirs[val] = f
  assert _class_proportion_spread(labels, ours, 5) <= _class_proportion_spread(labels, theirs, 5) + 0.005


def test_folds_are_deterministic_by_seed_and_singletons_split_evenly():
  labels = np.repeat(np.arange(3), [61, 30, 9])
  names = np.array([f'img{i}' for i in range(len(labels))])
  folds = input_pipeline.assign_folds(labels, names, 3, seed=7)
  np.testing.assert_array_equal(folds, input_pipeline.assign_folds(labels, names, 3, seed=7))
  assert not np.array_equal(folds, input_pipeline.assign_folds(labels, names, 3, seed=8))
  assert [sorted(np.bincount(folds[labels == c]).tolist()) for c in range(3)] == [
      [20, 20, 21], [10, 10, 10], [3, 3, 3]]


def test_more_folds_than_groups_is_refused():
  with pytest.raises(ValueError, match=r'num_folds=4 must be in \[2, 3\]'):
    input_pipeline.assign_folds(np.array([0, 0, 1, 1]), np.array(['a', 'a', 'b', 'c']), 4, seed=0)
