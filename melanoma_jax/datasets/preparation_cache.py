"""Resumable preparation: each source file's stored square, kept until its dataset is prepared.

TFDS cannot resume a preparation half-way: a killed one leaves an
`incomplete.*` folder, which the next run deletes before generating every
example again. The expensive part of an example is decoding and resizing its
source file, so each result (PNG bytes and the conversions made, or why the
file is unreadable) is also kept in a cache folder next to the dataset's
prepared versions, one file per source, written under a temporary name and
then renamed (a kill never leaves a half-written entry under its real name).
A rerun after a kill takes from the cache what it holds and decodes only the
rest. An entry's key is the source (path, byte size, modification time) and
everything that shapes its pixels (stored size, `preprocessing.Preprocess`
options, the JPEG draft and border settings), so an edited file is decoded
again. The cache is deleted once the dataset is prepared; until then it takes
about as much disk as the prepared dataset.
"""

import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath

from melanoma_jax import preprocessing
from melanoma_jax.errors import UnreadableImageError

FOLDER_PREFIX = 'preparation_cache.'  # + the dataset version, next to its folder.
_FORMAT = 1  # Part of every key: entries of another format are never read.

# What the cache keeps for a source file: (conversions, PNG bytes) or why it cannot be read.
Prepared = tuple[tuple[str, ...], bytes] | UnreadableImageError


def _source_identity(path: epath.Path) -> tuple[int, int] | None:
  """(byte size, modification time in ns) of a file; None when it cannot be stat'ed."""
  try:
    if '://' not in str(path):
      stat = os.stat(path)
      return stat.st_size, stat.st_mtime_ns
    stat = epath.Path(path).stat()
    return stat.length, int(stat.mtime) * 10**9
  except OSError:
    return None


class PreparationCache:
  """The cache of one dataset config and version (`for_builder`); thread-safe."""

  def __init__(self, folder: epath.PathLike, stored_size: int,
               preprocess: preprocessing.Preprocess = preprocessing.Preprocess()):
    self.folder = epath.Path(folder)
    self._settings = [_FORMAT, stored_size, preprocess.tag, preprocessing.DRAFT_MIN_FRACTION,
                      preprocessing.BORDER_DRAFT_SCALE, preprocessing.BORDER_LEVEL,
                      preprocessing.BORDER_LINE_FRACTION, preprocessing.BORDER_MIN_MARGIN,
                      preprocessing.BORDER_MIN_FIELD]

  @classmethod
  def for_builder(cls, builder: Any) -> 'PreparationCache':
    """The cache of a `FolderBuilder`'s config and version, beside its prepared folder."""
    config = builder.builder_config
    data_path = epath.Path(builder.data_path)  # The version folder, or TFDS' incomplete one.
    return cls(data_path.parent / f'{FOLDER_PREFIX}{builder.version}', config.image_size,
               getattr(config, 'preprocess', preprocessing.Preprocess()))

  def _entry(self, path: epath.Path) -> epath.Path | None:
    identity = _source_identity(path)
    if identity is None:
      return None  # Missing or special: decoding says why, every time.
    key = hashlib.sha256(json.dumps([str(path), *identity, *self._settings]).encode()).hexdigest()
    return self.folder / key[:2] / key

  def get(self, path: epath.PathLike,
          compute: Callable[[], tuple[preprocessing.DecodedImage, bytes]
                            | UnreadableImageError]) -> Prepared:
    """What the cache holds for `path`, else `compute()` (decode, resize, encode), then kept."""
    entry = self._entry(epath.Path(path))
    cached = None if entry is None else _read(entry)
    if cached is not None:
      return cached
    result = compute()
    prepared = result if isinstance(result, UnreadableImageError) else (
        result[0].conversions, result[1])
    if entry is not None:
      _write(entry, prepared)
    return prepared

  def size(self) -> int:
    """Entries held (from interrupted preparations)."""
    if not self.folder.exists():
      return 0
    return sum('.' not in entry.name for entry in self.folder.glob('*/*'))  # Not the .tmp files.

  def log_resumption(self, what: str) -> None:
    """Says, before generation, how much an interrupted preparation left to reuse."""
    held = self.size()
    if held:
      logging.info('%s: resuming an interrupted preparation; the %d images it decoded (in %s) '
                   'are not decoded again.', what, held, self.folder)

  def clear(self) -> None:
    """Deletes the cache (once the dataset is prepared)."""
    if self.folder.exists():
      self.folder.rmtree()


def _read(entry: epath.Path) -> Prepared | None:
  """The entry's contents; None when absent or not whole."""
  try:
    data = entry.read_bytes()
  except FileNotFoundError:
    return None
  header, _, png = data.partition(b'\n')
  try:
    meta = json.loads(header)
  except ValueError:
    return None
  if 'error' in meta:
    return UnreadableImageError(meta['error'])
  if meta.get('png_bytes') != len(png):
    return None
  return tuple(meta['conversions']), png


def _write(entry: epath.Path, prepared: Prepared) -> None:
  """Writes the entry under a temporary name, then renames it: never half-written."""
  if isinstance(prepared, UnreadableImageError):
    data = json.dumps({'error': str(prepared)}).encode()
  else:
    conversions, png = prepared
    data = json.dumps({'conversions': list(conversions), 'png_bytes': len(png)}).encode() + b'\n' + png
  entry.parent.mkdir(parents=True, exist_ok=True)
  temporary = entry.parent / f'{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp'
  temporary.write_bytes(data)
  temporary.replace(entry)
