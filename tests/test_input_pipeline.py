"""Splits without leakage, class-balanced training stream, exact evaluation batches."""

import hashlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import stats

from melanoma_jax import datasets, errors, input_pipeline


@pytest.fixture(scope='module')
def data(tiny_config):
  return input_pipeline.load_data(tiny_config)


def test_group_split_is_stratified_deterministic_and_disjoint():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(3), [60, 30, 10])
  groups = np.array([f'lesion{i // 2}' for i in range(len(labels))])  # 2 images per lesion
  train, val = input_pipeline.split_by_group(labels, groups, 0.2, seed=1)
  assert not set(groups[train]) & set(groups[val])
  assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
  assert np.bincount(labels[val]).tolist() == [12, 6, 2]
  again, _ = input_pipeline.split_by_group(labels, groups, 0.2, seed=1)
  np.testing.assert_array_equal(train, again)
  other, _ = input_pipeline.split_by_group(labels, rng.permutation(groups), 0.2, seed=2)
  assert not np.array_equal(train, other)


def test_no_image_on_both_sides_of_the_split(data):
  digest = lambda images: {hashlib.sha1(im.tobytes()).hexdigest() for im in images}
  assert not set(data.train.file_names) & set(data.val.file_names)
  assert not digest(data.train.images) & digest(data.val.images)
  assert len(data.val) > 0 and len(data.train) > len(data.val)
  # Every class keeps examples on both sides.
  assert set(data.val.labels) == set(data.train.labels) == set(range(9))


def _label_counts(train, config, epoch, steps):
  counts = np.zeros(9)
  for batch in input_pipeline.train_batches(train, config, 9, epoch, steps):
    assert batch['image'].shape == (jax.local_device_count(), config.batch_size // 4, 32, 32, 3)
    assert batch['image'].dtype == np.uint8
    counts += np.bincount(batch['label'].ravel(), minlength=9)
  return counts


def test_balanced_stream_draws_every_class_equally(data, tiny_config):
  counts = _label_counts(data.train, tiny_config, epoch=1, steps=150)
  assert stats.chisquare(counts).pvalue > 1e-3
  # The unbalanced stream instead follows the class frequencies.
  unbalanced = tiny_config.copy_and_resolve_references()
  unbalanced.balance_classes = False
  counts = _label_counts(data.train, unbalanced, epoch=1, steps=150)
  expected = np.bincount(data.train.labels, minlength=9) / len(data.train) * counts.sum()
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  assert stats.chisquare(counts).pvalue < 1e-6


@pytest.mark.parametrize('balance', [True, False])
def test_expected_draws_per_class_are_what_the_stream_draws(data, tiny_config, balance):
  config = tiny_config.copy_and_resolve_references()
  config.balance_classes = balance
  counts = _label_counts(data.train, config, epoch=2, steps=150)
  expected = input_pipeline.expected_draws_per_class(data.train.labels, 9, balance, counts.sum())
  assert expected.sum() == pytest.approx(counts.sum())
  assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_train_stream_is_reproducible_per_epoch(data, tiny_config):
  first = lambda epoch: next(input_pipeline.train_batches(data.train, tiny_config, 9, epoch, 2))
  a, b, c = first(3), first(3), first(4)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])


def test_augmentation_keeps_shape_and_changes_pixels(data, tiny_config):
  plain = tiny_config.copy_and_resolve_references()
  plain.augment.enabled = False
  aug = next(input_pipeline.train_batches(data.train, tiny_config, 9, 1, 1))
  raw = next(input_pipeline.train_batches(data.train, plain, 9, 1, 1))
  np.testing.assert_array_equal(aug['label'], raw['label'])  # same examples
  assert aug['image'].shape == raw['image'].shape
  assert not np.array_equal(aug['image'], raw['image'])


def test_eval_batches_count_every_example_once(data):
  seen_images, seen_labels = [], []
  for batch in input_pipeline.eval_batches(data.val, 8):
    assert batch['image'].shape[:2] == (jax.local_device_count(), 2)
    keep = batch['mask'].ravel() == 1
    seen_images.append(batch['image'].reshape(-1, 32, 32, 3)[keep])
    seen_labels.append(batch['label'].ravel()[keep])
  np.testing.assert_array_equal(np.concatenate(seen_images), data.val.images)
  np.testing.assert_array_equal(np.concatenate(seen_labels), data.val.labels)


def test_epoch_is_the_train_split_size():
  assert input_pipeline.steps_per_epoch(1791, 32) == 56
  assert input_pipeline.steps_per_epoch(64, 32) == 2


def test_missing_dataset_is_a_clear_error(tiny_config):
  bad = tiny_config.copy_and_resolve_references()
  bad.dataset = 'no_such_lesions'
  with pytest.raises(errors.DataError, match=r"no_such_lesions.*'image_folder', 'isic2019'"):
    input_pipeline.load_data(bad)


def test_every_registered_builder_is_the_one_tfds_knows_by_that_name():
  for name, builder_class in datasets.BUILDERS.items():
    assert tfds.builder_cls(name) is builder_class


def test_groups_csv_keeps_each_lesion_on_one_side(tiny_config, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = ['image,lesion_id']
  for split, per_class in (('Train', 12), ('Test', 2)):
    for cls in ('benign', 'melanoma'):
      folder = tmp_path / 'tree' / split / cls
      folder.mkdir(parents=True)
      for i in range(per_class):
        name = f'{split}_{cls}_{i}.png'
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)
        rows.append(f'{name},{cls}_lesion{i // 3}')  # three images per lesion
  (tmp_path / 'groups.csv').write_text('\n'.join(rows))
  config = tiny_config.copy_and_resolve_references()
  config.update({'dataset': 'image_folder', 'manual_dir': str(tmp_path / 'tree'),
                 'data_dir': str(tmp_path / 'tfds'), 'groups_csv': str(tmp_path / 'groups.csv')})
  data = input_pipeline.load_data(config)
  assert data.class_names == ('benign', 'melanoma')
  assert len(data.train) + len(data.val) == 24 and len(data.test) == 4
  assert not set(data.train.group_ids) & set(data.val.group_ids)
  assert len(data.val) % 3 == 0 and len(data.val) > 0


def test_every_pipeline_runs_without_tf_data_autotuning(data, tiny_config, monkeypatch):
  """An autotuned tf.data iterator, once done, waits for its tuning thread's next wake-up
  (up to a minute) before it is freed: that stalled the end of every training epoch."""
  autotuned, as_numpy = [], tfds.as_numpy

  def recording(ds):
    autotuned.append(ds.options().autotune.enabled is not False)  # None: TensorFlow's default, on
    return as_numpy(ds)

  monkeypatch.setattr(tfds, 'as_numpy', recording)
  list(input_pipeline.train_batches(data.train, tiny_config, 9, 1, 2))
  list(input_pipeline.BatchesAhead(lambda: input_pipeline.train_dataset(data.train, tiny_config, 9, 1, 2)).batches())
  input_pipeline.load_data(tiny_config)  # reads its train and test splits
  assert len(autotuned) == 4 and not any(autotuned)
