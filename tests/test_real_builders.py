"""Tests of the folder-reading logic and the isic_skin_cancer / image_folder builders."""

import os
import pathlib
import struct
import tempfile
import zlib

from etils import epath
from etils.epath import gpath
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from melanoma_jax import errors, preprocessing
from melanoma_jax.datasets import ISIC_CLASSES
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import groups_csv
from melanoma_jax.datasets import isic_skin_cancer
from melanoma_jax.datasets import preparation
from melanoma_jax.datasets import preparation_cache

SIZE = 8  # Stored resolution in these tests: small keeps them fast.
UNICODE_NAME = 'naevus Zürich ünïcode.jpg'


def _png16(path: pathlib.Path, pixels: np.ndarray) -> None:
  """Writes a 16-bit PNG (gray or RGB) by hand: PIL cannot save 16-bit RGB."""
  height, width = pixels.shape[:2]
  color_type = 2 if pixels.ndim == 3 else 0
  rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in pixels)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def _rgb(path: pathlib.Path, seed: int = 0) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (15, 20, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def _tree(root: pathlib.Path, splits: dict[str, int], classes, ext: str = '.jpg') -> None:
  """Writes `n` small RGB images per class for each split folder name."""
  for split, n in splits.items():
    for c, name in enumerate(classes):
      for i in range(n):
        _rgb(root / split / name / f'img_{c}_{i}{ext}', seed=c * 10 + i)


# File name -> the start of its skip reason (None: it decodes).
SPECIAL_FILES = {
    'gray.jpg': None, 'rgba.png': None, 'cmyk.jpg': None, 'palette.bmp': None,
    'gray16.png': None, 'rgb16.png': None, 'UPPER.JPG': None, UNICODE_NAME: None,
    'corrupt.jpg': 'corrupt, truncated', 'truncated.png': 'corrupt, truncated',
    'text.jpg': 'not an image file', 'notes.txt': 'unsupported extension',
}
DECODABLE = sum(reason is None for reason in SPECIAL_FILES.values())


def _write_special_files(folder: pathlib.Path) -> None:
  """Writes every awkward case of `SPECIAL_FILES` into `folder`, plus a .DS_Store."""
  folder.mkdir(parents=True, exist_ok=True)
  Image.new('L', (20, 15), 90).save(folder / 'gray.jpg')
  Image.new('RGBA', (20, 15), (255, 0, 0, 0)).save(folder / 'rgba.png')
  Image.new('CMYK', (20, 15), (0, 255, 0, 0)).save(folder / 'cmyk.jpg')
  noise = np.random.default_rng(1).integers(0, 256, (15, 20, 3), dtype=np.uint8)
  Image.fromarray(noise).quantize(16).save(folder / 'palette.bmp')
  _png16(folder / 'gray16.png', np.full((15, 20), 51400, np.uint16))
  _png16(folder / 'rgb16.png', np.full((15, 20, 3), [65535, 32896, 257], np.uint16))
  _rgb(folder / 'UPPER.JPG', seed=7)
  _rgb(folder / UNICODE_NAME, seed=8)
  (folder / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + np.random.default_rng(0).bytes(300))
  _rgb(folder / 'truncated.png', seed=9)
  (folder / 'truncated.png').write_bytes((folder / 'truncated.png').read_bytes()[:60])
  (folder / 'text.jpg').write_text('not an image')
  (folder / 'notes.txt').write_text('a stray note')
  (folder / '.DS_Store').write_bytes(b'\0\1')


def _isic_archive(parent: pathlib.Path) -> pathlib.Path:
  """A tiny copy of the ISIC archive: 2 Train and 1 Test image per class, plus special files."""
  archive = parent / isic_skin_cancer.ARCHIVE_NAME
  _tree(archive, {'Train': 2, 'Test': 1}, ISIC_CLASSES)
  _write_special_files(archive / 'Train' / 'melanoma')
  return archive


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir=None) -> tfds.core.DatasetBuilder:
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _small_config(name: str = f'{SIZE}px', groups_csv=None) -> preparation.FolderConfig:
  return preparation.FolderConfig(name=name, image_size=SIZE, groups_csv=groups_csv)


# --- Decoding ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def special(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp('special')
  _write_special_files(folder)
  return folder


@pytest.mark.parametrize('name', [n for n in SPECIAL_FILES if not n.endswith('.txt')])
def test_decode_gives_uint8_rgb_square_or_a_reason(special, name):
  reason = SPECIAL_FILES[name]
  if reason is None:
    pixels = preprocessing.decode_image(special / name, SIZE).pixels
    assert (pixels.dtype, pixels.shape) == (np.uint8, (SIZE, SIZE, 3))
  else:
    with pytest.raises(errors.UnreadableImageError, match=reason):
      preprocessing.decode_image(special / name, SIZE)


@pytest.mark.parametrize('name, rgb, conversion', [
    ('gray16.png', (200, 200, 200), '16-bit grayscale -> 8-bit RGB'),  # 51400 / 257, not clipped.
    ('rgb16.png', (255, 128, 1), None),
    ('rgba.png', (255, 255, 255), 'RGBA -> RGB (alpha composited on white)'),
    ('cmyk.jpg', (255, 0, 255), 'CMYK -> RGB'),
    ('gray.jpg', (90, 90, 90), 'grayscale -> RGB'),
])
def test_decode_converts_modes(special, name, rgb, conversion):
  decoded = preprocessing.decode_image(special / name, SIZE)
  np.testing.assert_allclose(decoded.pixels.reshape(-1, 3), [rgb] * SIZE * SIZE, atol=2)
  assert conversion is None or conversion in decoded.conversions


# --- Scanning and layout errors ---------------------------------------------------------


def test_scan_reads_tree_and_ignores_hidden_files(tmp_path):
  _tree(tmp_path, {'Train': 2, 'val': 1}, ['b', 'a'])
  (tmp_path / 'Train' / 'a' / '.DS_Store').write_text('x')
  (tmp_path / 'Train' / 'stray.jpg').write_text('x')
  tree = folder_layout.scan_tree(tmp_path)
  assert tree.class_names == ('a', 'b')
  assert {s: len(r) for s, r in tree.splits.items()} == {'train': 4, 'val': 2}
  assert [s.file_name for s in tree.skipped] == ['Train/stray.jpg']


def _no_root(root: pathlib.Path) -> None:
  del root


def _empty_root(root: pathlib.Path) -> None:
  root.mkdir()


def _no_test_folder(root: pathlib.Path) -> None:
  _tree(root, {'Train': 1}, ['a'])


def _extra_test_class(root: pathlib.Path) -> None:
  _tree(root, {'Train': 1, 'Test': 1}, ['a', 'b'])
  _tree(root, {'Test': 1}, ['c'])


def _empty_class(root: pathlib.Path) -> None:
  _tree(root, {'Train': 1, 'Test': 1}, ['a'])
  for split in ('Train', 'Test'):
    (root / split / 'b').mkdir()


def _images_without_class_folder(root: pathlib.Path) -> None:
  _rgb(root / 'Train' / 'image.jpg')
  (root / 'Test').mkdir()


@pytest.mark.parametrize('make, match', [
    (_no_root, r'does not exist\.\nExpected layout:\nROOT/\n  Train/'),
    (_empty_root, r'is empty\.\nExpected layout'),
    (_no_test_folder, r"lacks Test/ \(any case\); it holds \['Train'\]"),
    (_extra_test_class, r"differ between splits: Train lacks \['c'\]\.$"),
    (_empty_class, r"without images .*: \['Train/b', 'Test/b'\]"),
    (_images_without_class_folder, 'Train has no class folders.*one level too deep'),
])
def test_scan_layout_errors(tmp_path, make, match):
  root = tmp_path / 'root'
  make(root)
  with pytest.raises(errors.DatasetLayoutError, match=match):
    folder_layout.scan_tree(root, splits=('train', 'test'))


def test_scan_names_unexpected_and_missing_classes(tmp_path):
  _tree(tmp_path, {'Train': 1, 'Test': 1}, ['a', 'melanoma'])
  with pytest.raises(errors.DatasetLayoutError,
                     match=r"unexpected \['a'\], missing \['nevus'\]"):
    folder_layout.scan_tree(tmp_path, class_names=('melanoma', 'nevus'))


def test_find_root_accepts_either_level(tmp_path):
  archive = tmp_path / 'Some archive name'
  _tree(archive, {'Train': 1, 'Test': 1}, ['a'])
  assert folder_layout.find_root(archive, ('train', 'test')) == archive
  assert folder_layout.find_root(tmp_path, ('train', 'test')) == archive


def test_groups_csv(tmp_path):
  csv_path = tmp_path / 'meta.csv'
  csv_path.write_text('\ufeffimage_id,lesion_id,patient_id\n'
                      'img_0_0,L1,P1\nimg_1_0.jpg,L2,\nnaevus Zürich ünïcode,L3,P3\n',
                      encoding='utf-8')
  groups = groups_csv.read_groups_csv(csv_path)
  assert groups_csv.group_id('Train/a/img_0_0.png', groups) == 'P1'  # patient_id first.
  assert groups_csv.group_id('img_1_0.jpg', groups) == 'L2'  # Falls back to lesion_id.
  assert groups_csv.group_id(f'x/{UNICODE_NAME}', groups) == 'P3'
  assert groups_csv.group_id('Train/a/other.jpg', groups) == 'Train/a/other.jpg'
  assert groups_csv.group_id('Train/a/other.jpg', None) == ''
  (tmp_path / 'bad.csv').write_text('name,dx\nx,nv\n')
  with pytest.raises(errors.DatasetLayoutError, match='needs an image column'):
    groups_csv.read_groups_csv(tmp_path / 'bad.csv')


# --- isic_skin_cancer -------------------------------------------------------------------


@pytest.fixture(scope='module')
def isic_archive(tmp_path_factory) -> pathlib.Path:
  archive = _isic_archive(tmp_path_factory.mktemp('isic'))
  (archive.parent / 'groups.csv').write_text(
      'image,lesion_id\nimg_3_0,lesion_a\nimg_3_1.jpg,lesion_a\n', encoding='utf-8')
  return archive


@pytest.fixture(scope='module')
def isic_builder(isic_archive, tmp_path_factory):
  config = _small_config('small_groups', groups_csv=str(isic_archive.parent / 'groups.csv'))
  # manual_dir one level up: the folder the archive was extracted into.
  builder = tfds.builder('isic_skin_cancer', data_dir=tmp_path_factory.mktemp('data'),
                         config=config)
  return _prepare(builder, manual_dir=isic_archive.parent)


def test_isic_counts_and_report(isic_builder, isic_archive):
  assert isic_builder.info.splits['train'].num_examples == 2 * 9 + DECODABLE
  assert isic_builder.info.splits['test'].num_examples == 9
  report = isic_builder.preparation_report()
  assert report['root'] == str(isic_archive)
  assert report['counts']['train']['melanoma'] == 2 + DECODABLE
  assert report['counts']['test'] == dict.fromkeys(ISIC_CLASSES, 1)
  skipped = {s['file_name'].removeprefix('Train/melanoma/'): s['reason'] for s in report['skipped']}
  assert set(skipped) == {name for name, reason in SPECIAL_FILES.items() if reason}  # No .DS_Store.
  for name, reason in skipped.items():
    assert reason.startswith(SPECIAL_FILES[name])
  assert report['conversions'] == {
      '16-bit grayscale -> 8-bit RGB': 1,
      'CMYK -> RGB': 1,
      'RGBA -> RGB (alpha composited on white)': 1,
      'grayscale -> RGB': 1,
      'palette -> RGB': 1,
  }
  # img_3_0 is in Train/melanoma and Test/melanoma, img_3_1 in Train/melanoma.
  assert report['groups']['images_in_csv'] == 3
  assert report['groups']['images_not_in_csv'] == 2 * 9 + DECODABLE + 9 - 3


def test_isic_examples(isic_builder):
  dataset = tfds.as_numpy(isic_builder.as_dataset('train'))
  examples = {ex['file_name'].decode(): ex for ex in dataset}
  melanoma = ISIC_CLASSES.index('melanoma')
  for name in ('UPPER.JPG', UNICODE_NAME, 'rgb16.png', 'gray16.png', 'img_3_1.jpg'):
    example = examples[f'Train/melanoma/{name}']
    assert example['image'].dtype == np.uint8 and example['image'].shape == (SIZE, SIZE, 3)
    assert example['label'] == melanoma
  assert examples['Train/melanoma/gray16.png']['image'].min() == 200  # Scaled, not clipped.
  assert examples['Train/melanoma/img_3_1.jpg']['group_id'] == b'lesion_a'
  assert examples['Train/nevus/img_4_0.jpg']['group_id'] == b'Train/nevus/img_4_0.jpg'
  assert isic_builder.info.features['label'].names == list(ISIC_CLASSES)


def test_isic_accepts_the_archive_folder_itself(isic_archive, tmp_path):
  builder = tfds.builder('isic_skin_cancer', data_dir=tmp_path, config=_small_config())
  _prepare(builder, manual_dir=isic_archive)
  assert builder.info.splits['test'].num_examples == 9
  assert builder.preparation_report()['groups'] is None


def test_builders_leave_nothing_in_the_temporary_folder(isic_archive, tmp_path, monkeypatch):
  # TFDS' own DatasetInfo made (and kept) a directory there for every builder made before its data was prepared.
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  _prepare(tfds.builder('isic_skin_cancer', data_dir=tmp_path / 'data', config=_small_config()),
           manual_dir=isic_archive)
  tfds.builder('synthetic_lesions/tiny', data_dir=tmp_path / 'data')
  assert not list(scratch.iterdir())


def test_isic_missing_manual_dir_explains_layout_and_source(tmp_path):
  with pytest.raises(errors.DatasetLayoutError,
                     match=r'(?s)does not exist.*Kaggle.*Train/\n    actinic keratosis/'):
    _prepare(tfds.builder('isic_skin_cancer', data_dir=tmp_path, config=_small_config()),
             manual_dir=tmp_path / 'missing')


def test_isic_wrong_classes_are_named(tmp_path):
  classes = [c for c in ISIC_CLASSES if c != 'nevus'] + ['naevus']
  _tree(tmp_path / 'archive', {'Train': 1, 'Test': 1}, classes)
  with pytest.raises(errors.DatasetLayoutError,
                     match=r"unexpected \['naevus'\], missing \['nevus'\]"):
    _prepare(tfds.builder('isic_skin_cancer', data_dir=tmp_path / 'data', config=_small_config()),
             manual_dir=tmp_path)


def test_failed_preparation_leaves_nothing_behind(isic_archive, tmp_path, monkeypatch):
  decode = preparation.decode_image
  train_files = 2 * 9 + len(SPECIAL_FILES) - 1  # All but notes.txt get decoded.
  calls = []

  def decode_then_fail(path, size, *options):
    """Fails in the test split, after train is written and shuffled."""
    calls.append(path)
    if len(calls) > train_files + 3:
      raise RuntimeError('disk on fire')
    return decode(path, size, *options)

  monkeypatch.setattr(preparation, 'decode_image', decode_then_fail)
  builder = tfds.builder('isic_skin_cancer', data_dir=tmp_path, config=_small_config())
  with pytest.raises(RuntimeError, match='disk on fire'):
    _prepare(builder, manual_dir=isic_archive)
  # Decoding runs ahead on threads, so a few more Test images may have been read.
  assert calls[train_files + 3].parent.parent.name == 'Test'
  assert not builder.is_prepared()
  assert not builder.data_path.exists()
  # Only TFDS's default-config marker (written before generation) remains, and the images
  # decoded so far, for the next preparation to resume from (`preparation_cache`).
  left = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*') if p.is_file()
          and preparation_cache.FOLDER_PREFIX not in p.as_posix()]
  assert left == ['isic_skin_cancer/.config/metadata.json']


# --- image_folder -----------------------------------------------------------------------


def test_image_folder_discovers_classes_and_splits(tmp_path):
  root = tmp_path / 'derm'
  _tree(root, {'Train': 2, 'validation': 1, 'Test': 1}, ['nevus', 'melanoma', 'bcc'], '.png')
  _write_special_files(root / 'Train' / 'bcc')
  data_dir = tmp_path / 'data'
  builder = _prepare(tfds.builder('image_folder', manual_dir=root, data_dir=data_dir,
                                  config=_small_config()))
  assert builder.info.features['label'].names == ['bcc', 'melanoma', 'nevus']
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      'train': 6 + 8, 'validation': 3, 'test': 3}
  assert builder.preparation_report()['totals'] == {'test': 3, 'train': 14, 'validation': 3}
  # Loading again needs no tree: the class names come back from the prepared files.
  reloaded = tfds.builder('image_folder', data_dir=data_dir, config=_small_config())
  assert reloaded.info.features['label'].names == ['bcc', 'melanoma', 'nevus']
  labels = [ex['label'] for ex in tfds.as_numpy(reloaded.as_dataset('validation'))]
  assert sorted(labels) == [0, 1, 2]
  other = tmp_path / 'other'
  _tree(other, {'train': 1}, ['bcc', 'melanoma', 'nevus'])
  with pytest.raises(errors.DatasetLayoutError, match='another data_dir or config name'):
    tfds.builder('image_folder', manual_dir=other, data_dir=data_dir, config=_small_config())


def test_image_folder_rejects_a_second_manual_dir(tmp_path):
  _tree(tmp_path / 'derm', {'train': 1}, ['a'])
  builder = tfds.builder('image_folder', manual_dir=tmp_path / 'derm', data_dir=tmp_path / 'data')
  with pytest.raises(errors.DatasetLayoutError, match='differs from the tree'):
    _prepare(builder, manual_dir=tmp_path)


def test_image_folder_needs_a_tree_or_prepared_data(tmp_path):
  with pytest.raises(errors.DatasetLayoutError, match='needs the tree to read'):
    tfds.builder('image_folder', data_dir=tmp_path, config=_small_config())


def test_image_folder_class_mismatch_is_named_at_construction(tmp_path):
  _tree(tmp_path, {'Train': 1, 'Test': 1}, ['a', 'b'])
  _tree(tmp_path, {'Test': 1}, ['c'])
  with pytest.raises(errors.DatasetLayoutError, match=r"Train lacks \['c'\]"):
    tfds.builder('image_folder', manual_dir=tmp_path, data_dir=tmp_path / 'data')


# --- Remote trees -----------------------------------------------------------------------


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> str:
  """`gs://bucket`, served from `tmp_path` through epath only.

  Reading it with bare `open`, `os.path` or `pathlib` finds nothing, as on a
  real bucket.
  """
  # With TensorFlow installed, epath sends gs:// to tf.io.gfile, which epath's mocks bypass.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)

  def local(original, path, *args, **kwargs):
    return original(os.fspath(path).replace('gs://bucket', str(tmp_path), 1), *args, **kwargs)

  calls = ('exists', 'glob', 'isdir', 'listdir', 'open', 'stat', 'walk')
  with epath.testing.mock_epath(**dict.fromkeys(calls, local)):
    yield 'gs://bucket'


def test_builders_read_trees_and_csvs_on_remote_file_systems(bucket, tmp_path):
  _isic_archive(tmp_path / 'isic')
  isic = _prepare(tfds.builder('isic_skin_cancer', data_dir=tmp_path / 'data', config=_small_config()),
                  manual_dir=f'{bucket}/isic')
  assert isic.preparation_report()['root'] == f'{bucket}/isic/{isic_skin_cancer.ARCHIVE_NAME}'
  assert isic.info.splits['train'].num_examples == 2 * 9 + DECODABLE
  _tree(tmp_path / 'derm', {'Train': 2, 'Test': 1}, ['a', 'b'])
  (tmp_path / 'groups.csv').write_text('image,lesion_id\nimg_0_0,L1\n', encoding='utf-8')
  config = _small_config('remote', groups_csv=f'{bucket}/groups.csv')
  folder = _prepare(tfds.builder('image_folder', manual_dir=f'{bucket}/derm',
                                 data_dir=tmp_path / 'data', config=config))
  report = folder.preparation_report()
  assert (report['root'], report['totals']) == (f'{bucket}/derm', {'train': 4, 'test': 2})
  assert report['groups']['images_in_csv'] == 2  # img_0_0 in Train/a and Test/a.
