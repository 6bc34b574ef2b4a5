"""A killed preparation resumes: the rerun decodes only what the first run had not."""

import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import field_fixtures
from melanoma_jax import preprocessing
from melanoma_jax.datasets import preparation, preparation_cache

CLASSES = ('melanoma', 'nevus', 'vascular lesion')
SIZE = 16


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp('tree')
  for split, n in (('Train', 4), ('Test', 2)):
    for c, name in enumerate(CLASSES):
      for i in range(n):
        field_fixtures.jpeg(root / split / name / f'{c}_{i}.jpg', seed=100 * c + 10 * len(split) + i)
  (root / 'Train' / 'nevus' / 'broken.jpg').write_bytes(b'not a jpeg')
  return root


def _builder(tree, data_dir):
  config = preparation.FolderConfig(name=f'{SIZE}px', image_size=SIZE)
  return tfds.builder('image_folder', manual_dir=tree, data_dir=data_dir, config=config)


def _examples(builder):
  return {split: [(ex['file_name'], ex['label'], ex['group_id'], ex['image'].tobytes())
                  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]
          for split in ('train', 'test')}


def test_rerun_after_a_kill_decodes_only_the_rest_and_prepares_the_same_data(tree, tmp_path, monkeypatch,
                                                                             caplog):
  reference = _builder(tree, tmp_path / 'uninterrupted')
  reference.download_and_prepare()
  decode = preparation.decode_image
  calls = []

  def killed_after_ten(path, *args):
    calls.append(path)
    if len(calls) > 10:
      raise KeyboardInterrupt  # A kill, for the preparation: nothing catches it.
    return decode(path, *args)

  monkeypatch.setattr(preparation, 'decode_image', killed_after_ten)
  builder = _builder(tree, tmp_path / 'resumed')
  with pytest.raises(KeyboardInterrupt):
    builder.download_and_prepare()
  assert not builder.is_prepared()
  cache = preparation_cache.PreparationCache.for_builder(builder)
  kept = cache.size()
  assert 1 <= kept <= 10  # Decoding runs ahead on threads: those done by the kill are kept.

  calls.clear()
  monkeypatch.setattr(preparation, 'decode_image',
                      lambda path, *args: calls.append(path) or decode(path, *args))
  builder = _builder(tree, tmp_path / 'resumed')
  with caplog.at_level(logging.INFO):
    builder.download_and_prepare()
  assert f'resuming an interrupted preparation; the {kept} images it decoded' in caplog.text
  total = 3 * (4 + 2) + 1  # The unreadable file is remembered too.
  assert len(calls) == total - kept
  assert _examples(builder) == _examples(reference)
  assert builder.preparation_report()['skipped'] == reference.preparation_report()['skipped']
  assert not cache.folder.exists()  # Prepared: the cache is gone.


def test_an_entry_is_reused_only_for_the_same_file_and_settings(tmp_path):
  path = tmp_path / 'a.jpg'
  field_fixtures.jpeg(path, seed=1)
  computed = []

  def compute(options=preprocessing.Preprocess()):
    computed.append(path)
    decoded = preprocessing.decode_image(path, SIZE, options)
    return decoded, preparation.encode_png(decoded.pixels)

  cache = preparation_cache.PreparationCache(tmp_path / 'cache', SIZE)
  first = cache.get(path, compute)
  assert cache.get(path, compute) == first and len(computed) == 1
  # Other preprocessing options or another stored size are other entries.
  options = preprocessing.Preprocess(color_constancy=True)
  other = preparation_cache.PreparationCache(tmp_path / 'cache', SIZE, options)
  assert other.get(path, lambda: compute(options)) != first and len(computed) == 2
  preparation_cache.PreparationCache(tmp_path / 'cache', SIZE * 2).get(path, compute)
  assert len(computed) == 3
  # An edited file is decoded again.
  field_fixtures.jpeg(path, seed=2)
  os.utime(path, ns=(1, 1))
  assert cache.get(path, compute) != first and len(computed) == 4
  # An entry that is not whole (a disk fault) is decoded again, never read as it is.
  for entry in (tmp_path / 'cache').glob('*/*'):
    entry.write_bytes(entry.read_bytes()[:-5])
  cache.get(path, compute)
  assert len(computed) == 5
  png = cache.get(path, compute)[1]
  np.testing.assert_array_equal(
      tfds.features.Image(shape=(SIZE, SIZE, 3)).decode_example_np(png),
      preprocessing.decode_image(path, SIZE).pixels)
