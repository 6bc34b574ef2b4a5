"""The HAM10000, ISIC 2019 and SIIM-ISIC 2020 builders on tiny copies of their published layouts.

Fixtures copy the file, folder and column names exactly (see
shared/DATASETS.md) with made-up pixels, and carry the bad rows real
downloads have: missing images, unknown labels, malformed rows.
"""

import pathlib

import field_fixtures
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from melanoma_jax import errors, input_pipeline, preprocessing
from melanoma_jax.datasets import ham10000
from melanoma_jax.datasets import isic2019
from melanoma_jax.datasets import isic2020
from melanoma_jax.datasets import preparation
from melanoma_jax.datasets import preparation_cache
from melanoma_jax.datasets import tables
from melanoma_jax.datasets import vocabulary

SIZE = 8


def _prepare(name: str, data_dir: pathlib.Path, manual_dir: pathlib.Path
             ) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=data_dir,
                         config=preparation.FolderConfig(name=f'{SIZE}px', image_size=SIZE))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _examples(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, dict]:
  """Examples by image id, labels as class names."""
  names = builder.info.features['label'].names
  examples = {}
  for ex in tfds.as_numpy(builder.as_dataset(split)):
    assert ex['image'].shape == (SIZE, SIZE, 3) and ex['image'].dtype == np.uint8
    key = pathlib.PurePath(ex['file_name'].decode()).stem
    examples[key] = {'label': names[ex['label']], 'group': ex['group_id'].decode(),
                     'age': float(ex['age']), 'sex': ex['sex'].decode(),
                     'site': ex['site'].decode(), 'file_name': ex['file_name'].decode()}
  return examples


def _skipped(builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  return {s['file_name']: s['reason'] for s in builder.preparation_report()['skipped']}


# --- HAM10000 ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ham(tmp_path_factory) -> tfds.core.DatasetBuilder:
  root = field_fixtures.write_ham10000(tmp_path_factory.mktemp('ham'))
  return _prepare('ham10000', tmp_path_factory.mktemp('data'), root.parent)


def test_ham10000_examples(ham):
  assert ham.info.features['label'].names == [
      'actinic keratosis', 'basal cell carcinoma', 'benign keratosis', 'dermatofibroma',
      'melanoma', 'nevus', 'vascular lesion']
  train = _examples(ham, 'train')
  assert sorted(train) == [f'ISIC_{i:07d}' for i in range(1, 9)]
  expected = {  # image: (class, lesion, age, sex, site)
      1: ('melanoma', 'HAM_0000001', 55, 'male', 'torso'),
      2: ('melanoma', 'HAM_0000001', 55, 'male', 'torso'),
      3: ('nevus', 'HAM_0000002', -1, '', ''),
      4: ('basal cell carcinoma', 'HAM_0000003', 70, 'female', 'head/neck'),
      5: ('actinic keratosis', 'HAM_0000004', 65, 'female', 'head/neck'),
      6: ('benign keratosis', 'HAM_0000005', 45, 'male', 'torso'),
      7: ('dermatofibroma', 'HAM_0000006', 30, 'female', 'lower extremity'),
      8: ('vascular lesion', 'HAM_0000007', 5, 'male', 'palms/soles'),
  }
  for i, (label, lesion, age, sex, site) in expected.items():
    ex = train[f'ISIC_{i:07d}']
    assert (ex['label'], ex['group'], ex['age'], ex['sex'], ex['site']) == (
        label, lesion, age, sex, site)
    assert ex['file_name'].startswith(ham10000.IMAGE_FOLDERS[i % 2] + '/')  # Not the lower-case copy.
  test = _examples(ham, 'test')
  assert {k: v['label'] for k, v in test.items()} == {
      'ISIC_0000101': 'melanoma', 'ISIC_0000102': 'vascular lesion'}
  assert test['ISIC_0000101']['age'] == vocabulary.MISSING_AGE


def test_ham10000_report_lists_every_bad_row(ham):
  skipped = _skipped(ham)
  assert skipped[f'{ham10000.IMAGE_FOLDERS[1]}/ISIC_0000009.jpg'].startswith(
      "HAM10000_metadata.csv line 10: unknown label 'xyz'")
  assert skipped['HAM10000_metadata.csv line 11 (ISIC_0000010)'] == 'image file not found'
  assert skipped['HAM10000_metadata.csv line 12'] == 'malformed row: 6 fields, the header has 7'
  assert 'unknown sex' in skipped[f'{ham10000.IMAGE_FOLDERS[0]}/ISIC_0000012.jpg']
  assert skipped[f'{ham10000.IMAGE_FOLDERS[1]}/ISIC_0000099.jpg'] == (
      'not listed in HAM10000_metadata.csv')
  assert skipped[f'{ham10000.TEST_IMAGES}/ISIC_0000103.jpg'].endswith('one-hot label with 2 ones '
                                                                       "(['MEL', 'NV'])")
  assert skipped[f'{ham10000.TEST_IMAGES}/LICENSE.txt'] == "unsupported extension '.txt'"
  # Its row was malformed, so the image is listed as unlisted too.
  assert skipped[f'{ham10000.IMAGE_FOLDERS[1]}/ISIC_0000011.jpg'] == (
      'not listed in HAM10000_metadata.csv')
  # Every file and row is accounted for: written or listed.
  assert len(skipped) == 8
  assert ham.preparation_report()['totals'] == {'train': 8, 'test': 2}


def test_ham10000_layout_errors(tmp_path):
  with pytest.raises(errors.DatasetLayoutError,
                     match=r'(?s)has no HAM10000_metadata.csv.*Kaggle'):
    _prepare('ham10000', tmp_path / 'data', tmp_path)
  field_fixtures.write_csv(tmp_path / ham10000.METADATA_CSV, ['image_id,dx', 'ISIC_0000001,mel'])
  for part in ham10000.IMAGE_FOLDERS:
    (tmp_path / part).mkdir()
  with pytest.raises(errors.DatasetLayoutError,
                     match=r"lacks the column\(s\) \['lesion_id', 'dx_type', 'age', 'sex'"):
    _prepare('ham10000', tmp_path / 'data', tmp_path)
  (tmp_path / ham10000.METADATA_CSV).write_bytes(b'\xff\xfe\x00garbage')
  with pytest.raises(errors.DatasetLayoutError, match='is not a UTF-8 CSV file'):
    _prepare('ham10000', tmp_path / 'data', tmp_path)


# --- ISIC 2019 --------------------------------------------------------------------------


@pytest.fixture(scope='module')
def isic_2019(tmp_path_factory) -> tfds.core.DatasetBuilder:
  root = field_fixtures.write_isic2019(tmp_path_factory.mktemp('isic2019'))
  return _prepare('isic2019', tmp_path_factory.mktemp('data'), root)


def test_isic2019_examples_and_report(isic_2019):
  assert isic_2019.info.features['label'].names == [
      'actinic keratosis', 'basal cell carcinoma', 'benign keratosis', 'dermatofibroma',
      'melanoma', 'nevus', 'squamous cell carcinoma', 'vascular lesion']
  train = _examples(isic_2019, 'train')
  assert {k: v['label'] for k, v in train.items()} == {
      'ISIC_0000000': 'actinic keratosis', 'ISIC_0000001': 'basal cell carcinoma',
      'ISIC_0000002': 'benign keratosis', 'ISIC_0000003': 'dermatofibroma',
      'ISIC_0000004': 'melanoma', 'ISIC_0000005': 'nevus',
      'ISIC_0000006': 'squamous cell carcinoma', 'ISIC_0000007': 'vascular lesion',
      'ISIC_0000008_downsampled': 'melanoma', 'ISIC_0000009_downsampled': 'nevus'}
  assert train['ISIC_0000001']['group'] == 'BCN_0000001'
  assert (train['ISIC_0000001']['site'], train['ISIC_0000004']['site']) == ('torso', 'torso')
  assert train['ISIC_0000002']['group'] == '' and train['ISIC_0000002']['age'] == -1
  assert (train['ISIC_0000008_downsampled']['group'],
          train['ISIC_0000008_downsampled']['age']) == ('MSK4_0001', 70)
  assert train['ISIC_0000009_downsampled']['sex'] == ''  # No metadata row: all unknown.
  assert train['ISIC_0000000']['file_name'] == (
      f'{isic2019.IMAGE_FOLDER}/{isic2019.IMAGE_FOLDER}/ISIC_0000000.jpg')
  skipped = _skipped(isic_2019)
  folder = f'{isic2019.IMAGE_FOLDER}/{isic2019.IMAGE_FOLDER}'
  assert skipped[f'{folder}/ISIC_0000010.jpg'].endswith('label UNK is not a class of this dataset')
  assert "holds 'yes', not a number" in skipped[f'{folder}/ISIC_0000011.jpg']
  assert skipped[f'{isic2019.GROUND_TRUTH_CSV} line 14 (ISIC_0000012)'] == 'image file not found'
  assert skipped[f'{folder}/ATTRIBUTION.txt'] == "unsupported extension '.txt'"
  assert len(skipped) == 4
  assert 'test' not in isic_2019.info.splits


def test_isic2019_groups_never_cross_splits(isic_2019, monkeypatch):
  """Training on a dataset without a test split carves Test by lesion, then validation."""
  monkeypatch.setattr(input_pipeline, 'prepared_builder', lambda config, dataset=None: isic_2019)
  config = ml_collections.ConfigDict({
      'image_size': SIZE, 'task': 'multiclass', 'groups_csv': None, 'val_fraction': 0.3,
      'test_fraction': 0.3, 'seed': 1, 'dataset': 'isic2019'})
  data = input_pipeline.load_data(config)
  sides = [set(split.group_ids) for split in (data.train, data.val, data.test)]
  assert len(data.train) + len(data.val) + len(data.test) == 10
  assert sides[0] and sides[2]  # Validation may be empty: each class has at most 2 lesions.
  assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
  lesion = [s for s in sides if 'BCN_0000001' in s]
  assert len(lesion) == 1  # Both images of the lesion on one side.
  assert data.class_names == tuple(isic_2019.info.features['label'].names)


# --- SIIM-ISIC 2020 ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def isic_2020(tmp_path_factory) -> tfds.core.DatasetBuilder:
  root = field_fixtures.write_isic2020(tmp_path_factory.mktemp('isic2020'))
  return _prepare('isic2020', tmp_path_factory.mktemp('data'), root)


def test_isic2020_examples_duplicates_and_report(isic_2020):
  assert isic_2020.info.features['label'].names == ['benign keratosis', 'melanoma', 'nevus',
                                                    'unknown']
  train = _examples(isic_2020, 'train')
  assert {k: (v['label'], v['group']) for k, v in train.items()} == {
      'ISIC_0001001': ('melanoma', 'IP_001'), 'ISIC_0001002': ('nevus', 'IP_001'),
      'ISIC_0001003': ('unknown', 'IP_002'), 'ISIC_0001004': ('benign keratosis', 'IP_003'),
      'ISIC_0001005': ('benign keratosis', 'IP_003'), 'ISIC_0001006': ('unknown', 'IP_004')}
  assert (train['ISIC_0001003']['age'], train['ISIC_0001003']['site']) == (-1, '')
  assert (train['ISIC_0001004']['sex'], train['ISIC_0001004']['site']) == ('female',
                                                                          'upper extremity')
  skipped = _skipped(isic_2020)
  assert skipped == {
      'jpeg/train/ISIC_0001007.jpg': 'train.csv line 8: duplicate of ISIC_0001002 '
                                     '(ISIC_2020_Training_Duplicates.csv)',
      'jpeg/train/ISIC_0001008.jpg': 'train.csv line 9: duplicate of ISIC_0001002 '
                                     '(ISIC_2020_Training_Duplicates.csv)',
      'jpeg/train/ISIC_0001009.jpg': "train.csv line 10: diagnosis 'nevus' disagrees with target 1",
      'jpeg/train/ISIC_0001010.jpg': skipped['jpeg/train/ISIC_0001010.jpg'],
  }
  assert skipped['jpeg/train/ISIC_0001010.jpg'].startswith(
      "train.csv line 11: unknown label 'dysplastic thing'")


def test_duplicate_sets_keep_their_first_image():
  rows = [tables.Row(2, {'image_name_1': a, 'image_name_2': b})
          for a, b in (('c', 'd'), ('a', 'b'), ('d', 'b'), ('x', 'y'))]
  owners = isic2020.duplicate_owners(rows, ['b', 'd', 'c', 'a', 'y', 'x'])
  assert owners == {'a': 'b', 'b': 'b', 'c': 'b', 'd': 'b', 'x': 'y', 'y': 'y'}


# --- Vocabulary -------------------------------------------------------------------------


def test_every_source_label_maps_to_a_common_class():
  for table in vocabulary.SOURCE_LABELS.values():
    assert set(table.values()) <= set(vocabulary.COMMON_CLASSES)
  # The counts published in DATASETS.md name these labels; none may be missing.
  assert set(vocabulary.HAM10000) == {'akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc'}
  assert set(vocabulary.ISIC2020) == {
      'unknown', 'nevus', 'melanoma', 'seborrheic keratosis', 'lentigo NOS',
      'lichenoid keratosis', 'solar lentigo', 'cafe-au-lait macule',
      'atypical melanocytic proliferation'}
  assert vocabulary.common_classes(['nevus', 'melanoma']) == ('melanoma', 'nevus')


# --- Preparation ------------------------------------------------------------------------


def test_parallel_map_keeps_order_and_bounds_work_in_flight():
  started = []

  def work(i):
    started.append(i)
    return i * i

  results = preparation.parallel_map(work, range(100), threads=2)
  assert [next(results) for _ in range(3)] == [0, 1, 4]
  assert len(started) <= 3 + 4 * 2  # Not all 100 submitted at once.
  assert list(results) == [i * i for i in range(3, 100)]


def test_stored_pixels_are_the_decoded_pixels(tmp_path):
  """The PNG bytes written in worker threads decode to exactly `decode_image`'s pixels."""
  field_fixtures.jpeg(tmp_path / 'a.jpg', seed=3)
  pixels = preprocessing.decode_image(tmp_path / 'a.jpg', 16).pixels
  feature = tfds.features.Image(shape=(16, 16, 3), encoding_format='png')
  np.testing.assert_array_equal(
      feature.decode_example_np(preparation.encode_png(pixels)), pixels)


_KILLED_PREPARATION = '''
import sys, time
import tensorflow_datasets as tfds
from melanoma_jax.datasets import isic2020, preparation
decode = preparation.decode_image
def slow(path, size, *options):
  time.sleep(0.5)
  return decode(path, size, *options)
preparation.decode_image = slow
builder = tfds.builder('isic2020', data_dir=sys.argv[1],
                       config=preparation.FolderConfig(name='8px', image_size=8))
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=sys.argv[2]))
'''


def test_killed_preparation_restarts_cleanly(isic_2020, tmp_path, monkeypatch):
  """kill -9 mid-preparation; the next preparation removes what it left, decodes only the
  images the killed one had not, and completes."""
  import os, signal, subprocess, sys, time  # pylint: disable=import-outside-toplevel,multiple-imports
  manual_dir = isic_2020.preparation_report()['root']
  process = subprocess.Popen([sys.executable, '-c', _KILLED_PREPARATION, str(tmp_path), manual_dir],
                             env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  config_dir = tmp_path / 'isic2020' / '8px'
  cached = lambda: [p for p in config_dir.glob(f'{preparation_cache.FOLDER_PREFIX}*/*/*')
                    if '.' not in p.name]  # Not the temporary files.
  deadline = time.time() + 120
  while not (list(config_dir.glob('incomplete.*/preparing.json')) and cached()) and time.time() < deadline:
    assert process.poll() is None, 'the preparation ended before it could be killed'
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert len(list(config_dir.glob('incomplete.*'))) == 1
  kept = len(cached())
  decode, calls = preparation.decode_image, []
  monkeypatch.setattr(preparation, 'decode_image',
                      lambda path, *args: calls.append(path) or decode(path, *args))
  _prepare('isic2020', tmp_path / 'uninterrupted', pathlib.Path(manual_dir))
  decoded_uninterrupted = len(calls)
  calls.clear()
  # Leftovers of a live process or of another host are not touched.
  alive = config_dir / 'incomplete.ALIVE0_1.0.0'
  alive.mkdir()
  (alive / 'preparing.json').write_text(f'{{"host": "{os.uname().nodename}", "pid": {os.getpid()}}}')
  builder = _prepare('isic2020', tmp_path, pathlib.Path(manual_dir))
  assert 1 <= kept and len(calls) == decoded_uninterrupted - kept
  assert builder.info.splits['train'].num_examples == 6
  assert sorted(p.name for p in config_dir.iterdir()) == ['1.0.0', alive.name]
  assert not list((config_dir / '1.0.0').glob('*preparing*'))


# --- Combined datasets ------------------------------------------------------------------


@pytest.fixture
def combined(isic_2019, isic_2020, monkeypatch, tiny_config):
  """A tiny-run config on 'isic2019+isic2020', served by the fixtures' prepared builders."""
  builders = {'isic2019': isic_2019, 'isic2020': isic_2020}
  monkeypatch.setattr(input_pipeline, 'prepared_builder',
                      lambda config, dataset=None: builders[dataset or config.dataset])
  config = tiny_config.copy_and_resolve_references()
  config.dataset = 'isic2019+isic2020'
  config.source_weights = 'isic2019:3,isic2020:1'
  config.val_fraction = config.test_fraction = 0.25
  config.batch_size = 4
  return config


def test_combined_classes_labels_and_sources(combined, isic_2019, isic_2020):
  data = input_pipeline.load_data(combined)
  assert data.class_names == vocabulary.COMMON_CLASSES  # 2019's 8 and 2020's unknown.
  assert data.sources == ('isic2019', 'isic2020')
  names = {}
  for source, builder in enumerate((isic_2019, isic_2020)):
    for key, ex in _examples(builder, 'train').items():
      names[key] = (source, ex['label'])
  for split in (data.train, data.val, data.test):
    for file_name, label, source in zip(split.file_names, split.labels, split.extras['source']):
      assert names[pathlib.PurePath(file_name).stem] == (source, data.class_names[label])
  assert sum(map(len, (data.train, data.val, data.test))) == len(names) == 16
  assert set(data.train.extras) == {'age', 'sex', 'site', 'source'}


def test_combined_datasets_stream_what_they_hold_in_memory(combined):
  held = input_pipeline.load_data(combined)
  combined.streaming = True
  streamed = input_pipeline.load_data(combined)
  for split in ('train', 'val', 'test'):
    a, b = getattr(held, split), getattr(streamed, split)
    np.testing.assert_array_equal(a.file_names, b.file_names)
    np.testing.assert_array_equal(a.images, np.asarray(b.images))
  num_classes = len(held.class_names)
  for a, b in zip(input_pipeline.train_batches(held.train, combined, num_classes, 1, 3),
                  input_pipeline.train_batches(streamed.train, combined, num_classes, 1, 3), strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_source_weights_set_how_often_each_source_is_drawn(combined):
  data = input_pipeline.load_data(combined)
  stream = input_pipeline._source_index_stream(data.train, combined, seed=5)  # pylint: disable=protected-access
  drawn = np.array(list(stream.take(4000).as_numpy_iterator()))
  from_2019 = np.mean(data.train.extras['source'][drawn] == 0)
  assert abs(from_2019 - 0.75) < 0.03  # 3:1; binomial sd 0.007.
  combined.source_weights = 'isic2019:1'
  with pytest.raises(errors.DataError, match="weight >= 0 to each of"):
    input_pipeline.source_weights(combined)


def test_combined_datasets_train_with_metadata(combined, tmp_path):
  from melanoma_jax import train  # pylint: disable=import-outside-toplevel
  combined.num_epochs = 1
  combined.model.metadata = True
  result = train.train_and_evaluate(combined, str(tmp_path))
  assert 0 <= result['test_balanced_accuracy'] <= 1


def test_images_in_two_datasets_are_kept_once(ham, isic_2019, combined, monkeypatch):
  """ISIC 2019 contains HAM10000: an image id seen in an earlier source is left out."""
  builders = {'ham10000': ham, 'isic2019': isic_2019}
  monkeypatch.setattr(input_pipeline, 'prepared_builder',
                      lambda config, dataset=None: builders[dataset])
  combined.dataset, combined.source_weights = 'ham10000+isic2019', ''
  data = input_pipeline.load_data(combined)
  stems = [pathlib.PurePath(f).stem.removesuffix('_downsampled') for split in
           (data.train, data.val, data.test) for f in split.file_names]
  assert len(stems) == len(set(stems)) == 8 + 2 + 2  # HAM train + test, 2019's ISIC_0000000 and 9.
  from_2019 = {pathlib.PurePath(f).stem for split in (data.train, data.val, data.test)
               for source, f in zip(split.extras['source'], split.file_names) if source == 1}
  assert from_2019 == {'ISIC_0000000', 'ISIC_0000009_downsampled'}
