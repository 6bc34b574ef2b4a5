"""Reading `ROOT/<split>/<class>/<image>` trees, shared by the real-data builders.

The scanning and grouping functions are plain Python so they can be tested
without TFDS (decoding is `melanoma_jax.preprocessing`, shared with prediction); `FolderBuilder` wires them into a TFDS builder that also
writes a preparation report next to the prepared files. All file access goes
through `etils.epath`, so trees and CSVs may live on `gs://` or other remote
file systems.
"""

import abc
import collections
from concurrent import futures
import csv
import dataclasses
import functools
import io
import json
import os
import pathlib
import re
import socket
import stat
import struct
import unicodedata
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from melanoma_jax import preprocessing
from melanoma_jax.datasets import lesion_features, preparation_cache
from melanoma_jax.errors import DatasetLayoutError  # noqa: F401  (importable from here too)
# Decoding is shared with prediction; re-exported for the builders and their users.
from melanoma_jax.preprocessing import DecodedImage, UnreadableImageError, decode_image  # noqa: F401

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png')
DEFAULT_IMAGE_SIZE = 256
REPORT_FILE_NAME = 'preparation_report.json'
# Images decoded, resized and PNG-encoded at once during preparation: Pillow
# releases the GIL while it decodes, resizes and compresses, so threads scale
# with cores without copying pixels between processes.
PREPARE_THREADS = max(2, os.cpu_count() or 1)
# Written into a preparation's temporary folder, so a later preparation can
# tell the leftovers of a killed one from a preparation still running.
_PREPARING_FILE_NAME = 'preparing.json'
# Candidate columns of a groups CSV (ISIC archive, ISIC 2019/2020, HAM10000).
IMAGE_COLUMNS = ('image', 'image_id', 'image_name', 'isic_id', 'file_name', 'filename')
# Coarsest first: one patient's lesions share skin and camera, so grouping by
# patient is the safer guard against train/validation leakage.
GROUP_COLUMNS = ('patient_id', 'lesion_id')

_IGNORED_NAMES = ('__MACOSX',)  # macOS zip resource forks.
_SPLIT_NAME = re.compile(r'^[\w-]+$')  # What TFDS split slicing ('train[:80%]') accepts.


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One candidate image file found by `scan_tree` (or a builder's table)."""
  path: epath.Path
  file_name: str  # Relative to the root, '/'-separated.
  class_name: str
  group_id: str | None = None  # The lesion or patient; None: from the groups CSV, if any.
  metadata: Mapping[str, Any] | None = None  # Extra features (age, sex, site), if the builder has them.


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file left out of the dataset, with the reason to show the user."""
  file_name: str
  reason: str


@dataclasses.dataclass(frozen=True)
class FolderTree:
  """The images of a tree, per TFDS split name."""
  root: epath.Path
  class_names: tuple[str, ...]
  splits: Mapping[str, tuple[ImageRecord, ...]]
  skipped: tuple[Skipped, ...]


def layout_diagram(root_name: str = 'ROOT',
                   split_dirs: Sequence[str] = ('Train', 'Test'),
                   class_dirs: Sequence[str] = ('<class A>', '<class B>')) -> str:
  """Draws the expected folder tree, so errors show what to fix."""
  first, *others = split_dirs
  lines = [f'{root_name}/', f'  {first}/']
  for i, name in enumerate(class_dirs):
    lines.append(f'    {name}/')
    if i == 0:
      lines.append('      <images: .jpg .jpeg .png .bmp, any case>')
  lines += [f'  {split}/   (the same class folders as {first}/)' for split in others]
  return '\n'.join(lines)


def split_name(folder_name: str) -> str:
  """TFDS split name of a split folder: 'Train' -> 'train'."""
  name = folder_name.lower()
  if not _SPLIT_NAME.match(name) or name == 'all':
    raise DatasetLayoutError(
        f'Split folder {folder_name!r} cannot be a TFDS split name: rename it using only '
        "letters, digits, '_' or '-' (and not 'all').")
  return name


def absolute_path(path: epath.PathLike) -> epath.Path:
  """`path` made absolute; epath's own `absolute()` mangles URIs such as gs://."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def _visible(folder: epath.Path) -> list[epath.Path]:
  """Sorted entries of a folder, without hidden files and zip artifacts."""
  return sorted(p for p in folder.iterdir()
                if not p.name.startswith('.') and p.name not in _IGNORED_NAMES)


def _is_special(entry: epath.Path) -> bool:
  """A FIFO, socket or device (reading a FIFO blocks forever); remote paths have none."""
  if '://' in str(entry):
    return False
  try:
    return not stat.S_ISREG(os.stat(entry).st_mode)
  except OSError:
    return False  # a broken symlink: decoding reports it


def _has_split_dirs(folder: epath.Path, splits: Sequence[str]) -> bool:
  return any(p.is_dir() and p.name.lower() in splits for p in _visible(folder))


def find_root(path: epath.PathLike, splits: Sequence[str]) -> epath.Path:
  """Returns `path`, or its only subfolder holding split folders.

  Users point at the archive folder or at the folder they extracted it into;
  both work.
  """
  path = epath.Path(path)
  if not path.is_dir() or _has_split_dirs(path, splits):
    return path
  candidates = [p for p in _visible(path) if p.is_dir() and _has_split_dirs(p, splits)]
  if len(candidates) > 1:
    raise DatasetLayoutError(
        f'{path} holds several dataset folders: {[p.name for p in candidates]}; '
        'point at the one to use.')
  return candidates[0] if candidates else path


def _split_dirs(root: epath.Path, splits: Sequence[str] | None,
                help_text: str) -> dict[str, epath.Path]:
  """Maps TFDS split names to their folders under `root`."""
  entries = _visible(root)
  if not entries:
    raise DatasetLayoutError(f'Dataset folder {root} is empty.\n{help_text}')
  found = {}
  for folder in (p for p in entries if p.is_dir()):
    if splits is not None and folder.name.lower() not in splits:
      continue
    name = split_name(folder.name)
    if name in found:
      raise DatasetLayoutError(
          f'Folders {found[name].name!r} and {folder.name!r} in {root} are both split '
          f'{name!r}; keep one.')
    found[name] = folder
  missing = [s for s in splits or () if s not in found]
  if missing or not found:
    wanted = ', '.join(f'{s.capitalize()}/' for s in missing) or 'one folder per split'
    raise DatasetLayoutError(
        f'Dataset folder {root} lacks {wanted} (any case); it holds '
        f'{[p.name for p in entries]}.\n{help_text}')
  return found if splits is None else {s: found[s] for s in splits}


def _class_dirs(split_dir: epath.Path, root: epath.Path, help_text: str,
                skipped: list[Skipped]) -> dict[str, epath.Path]:
  """Class folders of one split; stray files go to `skipped`."""
  classes = {}
  for entry in _visible(split_dir):
    if entry.is_dir():
      classes[entry.name] = entry
    else:
      skipped.append(Skipped(entry.relative_to(root).as_posix(), 'not inside a class folder'))
  if not classes:
    raise DatasetLayoutError(
        f'Split folder {split_dir} has no class folders; if it holds the images directly, '
        f'the dataset folder is one level too deep.\n{help_text}')
  return classes


def _check_classes(classes_per_split: Mapping[str, Sequence[str]],
                   expected: Sequence[str] | None) -> tuple[str, ...]:
  """Returns the sorted class names; they must agree across splits."""
  union = set().union(*classes_per_split.values())
  lacking = {split: sorted(union - set(names))
             for split, names in classes_per_split.items() if union - set(names)}
  if lacking:
    details = '; '.join(f'{split} lacks {names}' for split, names in lacking.items())
    raise DatasetLayoutError(f'Class folders differ between splits: {details}.')
  if expected is not None and union != set(expected):
    raise DatasetLayoutError(
        f'Class folders do not match the expected classes: unexpected '
        f'{sorted(union - set(expected))}, missing {sorted(set(expected) - union)}.')
  return tuple(sorted(union))


def scan_tree(root: epath.PathLike, *, splits: Sequence[str] | None = None,
              class_names: Sequence[str] | None = None,
              help_text: str | None = None) -> FolderTree:
  """Lists the images of a `ROOT/<split>/<class>/<image>` tree, checking its layout.

  Args:
    root: the dataset folder.
    splits: TFDS split names to read (folders match in any case); None reads
      every folder.
    class_names: the classes the folders must name; None takes them from the
      folders.
    help_text: what layout errors show the user (expected tree, data source).

  Returns:
    The tree; non-image entries in class folders are listed as skipped.

  Raises:
    DatasetLayoutError: with what to fix.
  """
  root = absolute_path(root)
  help_text = help_text or f'Expected layout:\n{layout_diagram()}'
  if not root.is_dir():
    raise DatasetLayoutError(f'Dataset folder {root} does not exist.\n{help_text}')
  skipped = []
  split_dirs = _split_dirs(root, splits, help_text)
  class_dirs = {split: _class_dirs(folder, root, help_text, skipped)
                for split, folder in split_dirs.items()}
  names = _check_classes({split_dirs[s].name: list(c) for s, c in class_dirs.items()},
                         class_names)
  records = {}
  empty = []
  for split, classes in class_dirs.items():
    records[split] = []
    for class_name, folder in classes.items():
      images = []
      for entry in _visible(folder):
        file_name = entry.relative_to(root).as_posix()
        # One query per entry: on remote file systems each is a round trip.
        if entry.is_dir():
          skipped.append(Skipped(file_name, 'folder inside a class folder (not read)'))
        elif _is_special(entry):
          skipped.append(Skipped(file_name, 'not a regular file (FIFO, socket or device)'))
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
          images.append(ImageRecord(entry, file_name, class_name))
        else:
          skipped.append(Skipped(file_name, f'unsupported extension {entry.suffix!r}'))
      records[split] += images
      if not images:
        empty.append(folder.relative_to(root).as_posix())
  if empty:
    raise DatasetLayoutError(
        f'Class folders without images ({", ".join(IMAGE_EXTENSIONS)}) in {root}: {empty}. '
        'Add images or remove the folders from every split.')
  return FolderTree(root, names, {s: tuple(r) for s, r in records.items()}, tuple(skipped))


def group_key(file_name: str) -> str:
  """An image path as the groups CSV is matched on: '/'-separated folders and stem, NFC.

  'Train\\nevus/img000.PNG' -> 'Train/nevus/img000'; a bare 'img000.jpg' -> 'img000'.
  """
  name = unicodedata.normalize('NFC', file_name.strip().replace('\\', '/'))  # macOS stores NFD.
  parts = [part for part in name.split('/') if part not in ('', '.')]
  if parts and pathlib.PurePath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS:
    parts[-1] = pathlib.PurePath(parts[-1]).stem
  return '/'.join(parts)


def _best_key(file_name: str, groups: Mapping[str, str]) -> str | None:
  """The most specific CSV key naming the image: its path from the root, from the
  split folder, ..., down to its bare name; None when the CSV does not name it."""
  parts = group_key(file_name).split('/')
  return next((key for key in ('/'.join(parts[i:]) for i in range(len(parts))) if key in groups), None)


def read_groups_csv(path: epath.PathLike) -> dict[str, str]:
  """Maps `group_key`s to lesion or patient ids, so splits can keep a group together."""
  path = epath.Path(path)
  if not path.is_file():
    raise DatasetLayoutError(f'Groups CSV {path} not found.')
  # Decoded here: epath's `open` takes neither `newline=''` nor 'utf-8-sig' (Excel's BOM).
  try:
    text = path.read_bytes().decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise DatasetLayoutError(
        f'Groups CSV {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): '
        'save it as UTF-8 (Excel: "CSV UTF-8"; or iconv -f latin1 -t utf-8).') from None
  with io.StringIO(text, newline='') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    image_column = next((c for c in IMAGE_COLUMNS if c in columns), None)
    group_columns = [c for c in GROUP_COLUMNS if c in columns]
    if image_column is None or not group_columns:
      raise DatasetLayoutError(
          f'Groups CSV {path} needs an image column (one of {list(IMAGE_COLUMNS)}) and a '
          f'group column (one of {list(GROUP_COLUMNS)}); it has {columns}.')
    groups = {}
    for row in reader:
      group = next((v for v in ((row.get(c) or '').strip() for c in group_columns) if v), '')
      if not group:
        continue
      key = group_key(row[image_column] or '')
      if groups.setdefault(key, group) != group:
        raise DatasetLayoutError(
            f'Groups CSV {path} gives image {key!r} two groups: {groups[key]!r} and {group!r}.')
  return groups


def group_id(file_name: str, groups: Mapping[str, str] | None) -> str:
  """The image's group: '' without a CSV (unknown, per the contract), else its CSV group.

  An image the CSV lacks is its own group, so a grouped split still works.
  """
  if groups is None:
    return ''
  key = _best_key(file_name, groups)
  return file_name if key is None else groups[key]


def match_groups(file_names: Sequence[str], groups: Mapping[str, str],
                 csv_name: str = 'the groups CSV') -> dict[str, str]:
  """file name -> CSV group, for the images of one split that the CSV names.

  Raises:
    DatasetLayoutError: one CSV entry names several images (the same bare
      name in two class folders), naming them.
  """
  matched, named_by = {}, collections.defaultdict(list)
  for name in file_names:
    key = _best_key(name, groups)
    if key is not None:
      matched[name] = groups[key]
      named_by[key].append(name)
  for key, names in named_by.items():
    if len(names) > 1:
      raise DatasetLayoutError(
          f'{csv_name}: {key!r} names {len(names)} images ({", ".join(sorted(names)[:5])}); '
          'write the path from the split folder (e.g. '
          f'{"/".join(group_key(sorted(names)[0]).split("/")[1:]) or key!r}) to say which.')
  return matched


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
  """Stored resolution, optional groups CSV, preprocessing; the name must tell configs apart."""
  image_size: int = DEFAULT_IMAGE_SIZE
  groups_csv: str | None = None
  preprocess: preprocessing.Preprocess = preprocessing.Preprocess()


@functools.cache
def _preprocessed_config(name: str) -> FolderConfig | None:
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
    return tfds.core.DatasetInfo(
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
    return {split: self._generate_examples(split, records, None if groups is None else match_groups(
        [r.file_name for r in records], groups, f'Groups CSV {config.groups_csv}'))
            for split, records in tree.splits.items()}

  def _generate_examples(self, split: str, records: Sequence[ImageRecord],
                         groups: Mapping[str, str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`groups`: file name -> group of the images the groups CSV names (None: no CSV)."""
    size, preprocess = self.builder_config.image_size, self.builder_config.preprocess
    cache = preparation_cache.PreparationCache.for_builder(self)  # Resumes a killed preparation.
    cache.log_resumption(f'{self.name} {split}')
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
