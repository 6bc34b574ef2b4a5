"""Preparing a scanned tree as a TFDS dataset: the base builder of the real-data builders.

`FolderBuilder` decodes (`melanoma_jax.preprocessing`, shared with
prediction), resizes and PNG-encodes the images of a `folder_layout.FolderTree`
on threads, and writes a preparation report next to the prepared files.
"""

import abc
import collections
from concurrent import futures
import dataclasses
import functools
import json
import os
import socket
import struct
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from melanoma_jax import preprocessing
from melanoma_jax.datasets import preparation_cache
from melanoma_jax.datasets.features import LocalDatasetInfo, lesion_features
from melanoma_jax.datasets.folder_layout import FolderTree, ImageRecord, Skipped
from melanoma_jax.datasets.groups_csv import match_groups, read_groups_csv
from melanoma_jax.errors import UnreadableImageError
from melanoma_jax.preprocessing import DecodedImage, decode_image

DEFAULT_IMAGE_SIZE = 256
REPORT_FILE_NAME = 'preparation_report.json'
# Images decoded, resized and PNG-encoded at once during preparation: Pillow
# releases the GIL while it decodes, resizes and compresses, so threads scale
# with cores without copying pixels between processes.
PREPARE_THREADS = max(2, os.cpu_count() or 1)
# Written into a preparation's temporary folder, so a later preparation can
# tell the leftovers of a killed one from a preparation still running.
_PREPARING_FILE_NAME = 'preparing.json'


class PreparationReport:
  """What a preparation read, skipped and converted, for the user to audit."""

  def __init__(self, dataset: str, tree: FolderTree, image_size: int,
               groups_csv: str | None):
    self._header = {'dataset': dataset, 'root': str(tree.root), 'image_size': image_size,
                    'class_names': list(tree.class_names)}
    self._counts = {split: dict.fromkeys(tree.class_names, 0) for split in tree.splits}
    self._conversions = collections.Counter()
    self._skipped = list(tree.skipped)
    self._groups = None if groups_csv is None else {
        'csv': str(groups_csv), 'images_in_csv': 0, 'images_not_in_csv': 0}

  def add(self, split: str, class_name: str, conversions: Sequence[str],
          in_groups_csv: bool) -> None:
    """Counts one written image."""
    self._counts[split][class_name] += 1
    self._conversions.update(conversions)
    if self._groups is not None:
      self._groups['images_in_csv' if in_groups_csv else 'images_not_in_csv'] += 1

  def skip(self, file_name: str, reason: str) -> None:
    """Records a file that could not be decoded."""
    self._skipped.append(Skipped(file_name, reason))

  def as_dict(self) -> dict[str, Any]:
    """The report as written to `REPORT_FILE_NAME`."""
    return {
        **self._header,
        'counts': self._counts,
        'totals': {split: sum(c.values()) for split, c in self._counts.items()},
        'conversions': dict(sorted(self._conversions.items())),
        'skipped': [dataclasses.asdict(s) for s in self._skipped],
        'groups': self._groups,
    }

  def summary(self) -> str:
    """One line per split, conversion and skipped file, for the log."""
    report = self.as_dict()
    lines = [f'{split}: {n} images' for split, n in report['totals'].items()]
    lines += [f'{n} {what}' for what, n in report['conversions'].items()]
    lines += [f'skipped {s["file_name"]}: {s["reason"]}' for s in report['skipped']]
    return '\n'.join(lines)


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Stored resolution and optional groups CSV; the name must tell configs apart."""
  image_size: int = DEFAULT_IMAGE_SIZE
  groups_csv: str | None = None
  preprocess: preprocessing.Preprocess = preprocessing.Preprocess()


@functools.cache
def _preprocessed_config(name: str) -> 'FolderConfig | None':
  """The config a `Preprocess.config_name` with options names (one object per name, as TFDS
  wants); None for other names, so FolderConfig(name='224px', ...) stays the user's own."""
  parsed = preprocessing.parse_config_name(name)
  if parsed is None or not parsed[1].tag:
    return None
  size, options = parsed
  return FolderConfig(name=name, image_size=size, preprocess=options,
                      description=f'Images stored at {size}x{size}, preprocessed: {options}.')


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
  """Lossless 8-bit RGB PNG of a uint8 [H, W, 3] image, as the `image` feature stores it.

  Every row takes PNG's 'Up' filter (its difference to the row above, in
  numpy) and the result is deflated Huffman-only: for photographs that is
  several times faster than libpng's per-row filter search with level-6
  deflate (TensorFlow's `encode_png`), for files of about the same size.
  """
  height, width, _ = pixels.shape
  rows = np.ascontiguousarray(pixels, np.uint8).reshape(height, width * 3)
  filtered = np.empty((height, width * 3 + 1), np.uint8)
  filtered[:, 0] = 2  # Filter type 'Up' (the first row's 'above' is zeros).
  filtered[0, 1:] = rows[0]
  np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # Wraps modulo 256, as PNG wants.
  deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
  data = deflate.compress(filtered.tobytes()) + deflate.flush()
  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace.
  return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', header) + _png_chunk(b'IDAT', data)
          + _png_chunk(b'IEND', b''))


def _decode_and_encode(path: epath.Path, image_size: int,
                       preprocess: preprocessing.Preprocess = preprocessing.Preprocess()
                       ) -> tuple[DecodedImage, bytes] | UnreadableImageError:
  try:
    decoded = decode_image(path, image_size, preprocess)
  except UnreadableImageError as error:
    return error
  return decoded, encode_png(decoded.pixels)


_END = object()


def parallel_map(function: Callable[[Any], Any], items: Iterable[Any],
                 threads: int) -> Iterator[Any]:
  """`map(function, items)` on `threads` threads, in order, with few items in flight.

  Unlike `Executor.map`, it does not submit every item at once, so memory
  stays bounded however many images a split holds.
  """
  items = iter(items)
  with futures.ThreadPoolExecutor(threads, thread_name_prefix='prepare') as pool:
    pending = collections.deque(pool.submit(function, item)
                                for _, item in zip(range(4 * threads), items))
    try:
      while pending:
        result = pending.popleft().result()
        following = next(items, _END)
        if following is not _END:
          pending.append(pool.submit(function, following))
        yield result
    finally:
      for future in pending:
        future.cancel()


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_preparations(data_path: epath.Path) -> list[str]:
  """Deletes the temporary folders of preparations killed on this host.

  TFDS prepares into `incomplete.XXXXXX_<version>/` next to the final folder
  and renames it when done; a process killed meanwhile (SIGKILL, power cut)
  leaves it behind. A folder whose preparing process still runs, or that
  another host wrote, is left alone.
  """
  parent = data_path.parent
  if not parent.is_dir():
    return []
  removed = []
  for folder in parent.glob(f'incomplete.*_{data_path.name}'):
    marker = folder / _PREPARING_FILE_NAME
    try:
      owner = json.loads(marker.read_text())
    except (OSError, ValueError):
      owner = None  # Killed before it wrote the marker: it cannot be running long.
    if owner is not None and (owner.get('host') != socket.gethostname()
                              or _process_alive(int(owner.get('pid', 0)))):
      continue
    folder.rmtree()
    removed.append(folder.name)
  return removed


class FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder reading a `ROOT/<split>/<class>/<image>` tree into `lesion_features`.

  Images are decoded, resized and PNG-encoded on `PREPARE_THREADS` threads;
  TFDS shows the progress bar. A preparation that was killed is started over
  cleanly by the next one (TFDS cannot resume one half-way).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [FolderConfig(
      name=f'{DEFAULT_IMAGE_SIZE}px',
      description=f'Images stored at {DEFAULT_IMAGE_SIZE}x{DEFAULT_IMAGE_SIZE}, no groups CSV.')]
  HOMEPAGE: str | None = None
  METADATA = False  # Whether examples carry age, sex and site (see `lesion_features`).
  # Whether training may carve Test from train when no test split was prepared.
  TEST_FROM_TRAIN = False
  # Whether the constructor takes the tree (manual_dir=) to know its class names.
  TREE_AT_CONSTRUCTION = False

  @abc.abstractmethod
  def _class_names(self) -> tuple[str, ...]:
    """The label names, needed before preparation."""

  @abc.abstractmethod
  def _scan(self, dl_manager: tfds.download.DownloadManager) -> FolderTree:
    """Finds and checks the tree to prepare."""

  @classmethod
  def get_builder_config(cls, name: str, version: Any = None) -> FolderConfig | None:
    """Also '<size>px[_<options>]', a stored size with `preprocessing.Preprocess` options."""
    return super().get_builder_config(name, version) or _preprocessed_config(name)

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self,
        description=self.__doc__,
        features=lesion_features(self._class_names(), self.builder_config.image_size,
                                 metadata=self.METADATA),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    tree = self._scan(dl_manager)
    config = self.builder_config
    groups = None if config.groups_csv is None else read_groups_csv(config.groups_csv)
    self._report = PreparationReport(self.name, tree, config.image_size, config.groups_csv)
    preparation_cache.PreparationCache.for_builder(self).log_resumption(self.name)
    return {split: self._generate_examples(split, records, None if groups is None else match_groups(
        [r.file_name for r in records], groups, f'Groups CSV {config.groups_csv}'))
            for split, records in tree.splits.items()}

  def _generate_examples(self, split: str, records: Sequence[ImageRecord],
                         groups: Mapping[str, str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`groups`: file name -> group of the images the groups CSV names (None: no CSV)."""
    size, preprocess = self.builder_config.image_size, self.builder_config.preprocess
    cache = preparation_cache.PreparationCache.for_builder(self)  # Resumes a killed preparation.
    results = parallel_map(lambda record: cache.get(record.path, lambda: _decode_and_encode(
        record.path, size, preprocess)), records, PREPARE_THREADS)
    for record, result in zip(records, results):
      if isinstance(result, UnreadableImageError):
        self._report.skip(record.file_name, str(result))
        continue
      conversions, png = result
      in_csv = groups is not None and record.file_name in groups
      self._report.add(split, record.class_name, conversions, in_csv)
      yield record.file_name, {
          'image': png,
          'label': record.class_name,
          'file_name': record.file_name,
          'group_id': (('' if groups is None else groups.get(record.file_name, record.file_name))
                       if record.group_id is None else record.group_id),
          **(record.metadata or {}),
      }

  def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
    if not self.is_prepared():
      removed = remove_stale_preparations(epath.Path(self.data_path))
      if removed:
        logging.info('Removed %d folder(s) left by interrupted preparations: %s',
                     len(removed), removed)
    super().download_and_prepare(*args, **kwargs)
    preparation_cache.PreparationCache.for_builder(self).clear()  # Prepared: nothing to resume.

  def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                            download_config: tfds.download.DownloadConfig) -> None:
    # Runs inside TFDS's temporary dir, so the report lands with the data or not at all.
    self._report = None
    (epath.Path(self.data_path) / _PREPARING_FILE_NAME).write_text(
        json.dumps({'host': socket.gethostname(), 'pid': os.getpid()}))
    super()._download_and_prepare(dl_manager, download_config)
    if self._report is not None:  # None when max_examples_per_split=0 skipped generation.
      (self.data_path / REPORT_FILE_NAME).write_text(
          json.dumps(self._report.as_dict(), indent=2, ensure_ascii=False), encoding='utf-8')
      logging.info('Prepared %s:\n%s', self.name, self._report.summary())
    (epath.Path(self.data_path) / _PREPARING_FILE_NAME).unlink()

  def preparation_report(self) -> dict[str, Any]:
    """The report written by `download_and_prepare`: counts, skips, conversions."""
    return json.loads((self.data_path / REPORT_FILE_NAME).read_text(encoding='utf-8'))
