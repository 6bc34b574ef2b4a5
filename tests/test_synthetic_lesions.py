"""Tests for the synthetic lesion builder and its renderer."""

import collections
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from melanoma_jax.datasets import ISIC_CLASSES
from melanoma_jax.datasets import ISIC_TRAIN_COUNTS
from melanoma_jax.datasets import synthetic_lesions


def _build_tiny(data_dir) -> dict[str, list[dict]]:
  """Builds `synthetic_lesions/tiny` and returns each split's examples by file name."""
  builder = tfds.builder('synthetic_lesions/tiny', data_dir=str(data_dir))
  builder.download_and_prepare()
  splits = {}
  for split in ('train', 'test'):
    examples = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    splits[split] = sorted(examples, key=lambda e: e['file_name'])
  return splits


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  return _build_tiny(tmp_path_factory.mktemp('tfds'))


def _render_set(per_class: int, size: int, difficulty: float, seed: int):
  images, labels = [], []
  for label, class_name in enumerate(ISIC_CLASSES):
    for index in range(per_class):
      rng = np.random.default_rng([seed, label, index])
      images.append(synthetic_lesions.render_lesion(rng, class_name, size, difficulty))
      labels.append(label)
  return np.stack(images), np.array(labels)


def _nearest_mean_accuracy(difficulty: float) -> float:
  """Fits class means of centre colour histograms on one set and scores another."""
  def features(images):
    centre = images[:, 8:24, 8:24].reshape(len(images), -1, 3) // 32  # 8 bins a channel.
    counts = np.stack([[np.bincount(channel, minlength=8) for channel in image.T]
                       for image in centre])
    return np.sqrt(counts.reshape(len(images), -1) / centre.shape[1])
  x_fit, y_fit = _render_set(20, 32, difficulty, seed=1)
  x_eval, y_eval = _render_set(20, 32, difficulty, seed=2)
  f_fit, f_eval = features(x_fit), features(x_eval)
  means = np.stack([f_fit[y_fit == c].mean(0) for c in range(len(ISIC_CLASSES))])
  predicted = ((f_eval[:, None] - means[None]) ** 2).sum(-1).argmin(1)
  return float((predicted == y_eval).mean())


def test_tiny_has_imbalanced_train_and_balanced_test(tiny):
  train_counts = collections.Counter(ISIC_CLASSES[e['label']] for e in tiny['train'])
  test_counts = collections.Counter(ISIC_CLASSES[e['label']] for e in tiny['test'])
  assert train_counts == {c: math.ceil(n / 10) for c, n in ISIC_TRAIN_COUNTS.items()}
  assert test_counts == {c: 4 for c in ISIC_CLASSES}


def test_tiny_examples_follow_the_feature_contract(tiny):
  for split, examples in tiny.items():
    for example in examples:
      assert example['image'].dtype == np.uint8
      assert example['image'].shape == (32, 32, 3)
      class_name = ISIC_CLASSES[example['label']]
      file_name = example['file_name'].decode()
      assert file_name.startswith(f'synthetic/{split}/{class_name}/')
      assert file_name.endswith('.png')
      assert example['group_id'].decode() == file_name
  names = [e['file_name'] for split in tiny.values() for e in split]
  assert len(set(names)) == len(names)


def test_builds_are_identical(tiny, tmp_path):
  again = _build_tiny(tmp_path)
  for split, examples in tiny.items():
    assert [e['file_name'] for e in again[split]] == [e['file_name'] for e in examples]
    for a, b in zip(again[split], examples):
      np.testing.assert_array_equal(a['image'], b['image'])


def test_full_config_stores_128px_images(tmp_path):
  builder = tfds.builder('synthetic_lesions/full', data_dir=str(tmp_path))
  assert builder.info.features['image'].shape == (128, 128, 3)
  assert builder.info.features['label'].names == list(ISIC_CLASSES)
  assert builder.info.supervised_keys == ('image', 'label')


def test_render_lesion_is_a_function_of_its_seed():
  first = synthetic_lesions.render_lesion(np.random.default_rng(3), 'melanoma', 48)
  second = synthetic_lesions.render_lesion(np.random.default_rng(3), 'melanoma', 48)
  other = synthetic_lesions.render_lesion(np.random.default_rng(4), 'melanoma', 48)
  assert first.dtype == np.uint8 and first.shape == (48, 48, 3)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other)


def test_render_lesion_rejects_unknown_class():
  with pytest.raises(ValueError, match='Unknown class'):
    synthetic_lesions.render_lesion(np.random.default_rng(0), 'freckle', 32)


def test_vascular_lesions_are_redder_than_nevi():
  images, labels = _render_set(20, 32, synthetic_lesions.DEFAULT_DIFFICULTY, seed=0)
  centre = images[:, 8:24, 8:24].astype(float)
  redness = centre[..., 0] - centre[..., 1]
  vascular = redness[labels == ISIC_CLASSES.index('vascular lesion')].mean()
  nevus = redness[labels == ISIC_CLASSES.index('nevus')].mean()
  assert vascular > nevus + 10


def test_classes_are_learnable_but_not_trivially_separable():
  accuracy = _nearest_mean_accuracy(synthetic_lesions.DEFAULT_DIFFICULTY)
  assert 0.25 < accuracy < 0.95


def test_difficulty_makes_classes_harder_to_tell_apart():
  assert _nearest_mean_accuracy(0.0) > _nearest_mean_accuracy(1.0)
