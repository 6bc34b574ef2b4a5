"""Metadata CSVs matched to image files: the shared part of the HAM10000, ISIC 2019 and 2020 builders.

Those datasets ship their labels, lesion or patient ids and patient metadata
in a CSV next to folders of `<image id>.jpg`. This module finds the files,
reads the CSV with clear errors for a file that is not the expected one, and
turns rows into `folder_layout.ImageRecord`s, listing every row or file it
leaves out (image missing, unknown label, malformed row, file not in the CSV)
as `folder_layout.Skipped`, so the preparation report accounts for all.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import csv
import dataclasses
import io

from etils import epath
import tensorflow_datasets as tfds

from melanoma_jax import errors
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import groups_csv
from melanoma_jax.datasets import preparation
from melanoma_jax.datasets import vocabulary

DOWNSAMPLED_SUFFIX = '_downsampled'  # Some ISIC 2019 file names end in it.


@dataclasses.dataclass(frozen=True)
class Row:
  """One CSV data row; `line` is 1-based, the header being line 1."""
  line: int
  values: Mapping[str, str]


class SkipRow(ValueError):
  """A row the builder leaves out; the message says why."""


class CsvBuilder(preparation.FolderBuilder, skip_registration=True):
  """A published dataset whose CSV gives labels, groups and patient metadata.

  Its classes are the common ones its `VOCABULARY` (source label -> common
  class) maps to; where it ships no test labels, training carves Test from
  train by group.
  """
  METADATA = True
  TEST_FROM_TRAIN = True
  VOCABULARY: Mapping[str, str]  # Source label -> common class.

  def _class_names(self) -> tuple[str, ...]:
    return vocabulary.common_classes(self.VOCABULARY.values())


def manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The manual download folder, with TFDS' assertion turned into a layout error."""
  try:
    return dl_manager.manual_dir
  except AssertionError as error:  # How TFDS reports a missing or empty manual_dir.
    raise errors.DatasetLayoutError(str(error)) from error


def find_main_csv(dl_manager: tfds.download.DownloadManager, name: str, help_text: str) -> epath.Path:
  """The dataset's main CSV `name`, in the manual download folder or two levels below.

  Its folder is the dataset's root: the other files are looked for there and
  image file names are relative to it.
  """
  return find(manual_dir(dl_manager), name, help_text)


def index_folders(root: epath.Path, names: Iterable[str], help_text: str, *, depth: int
                  ) -> tuple[dict[str, tuple[epath.Path, str]], list[folder_layout.Skipped]]:
  """`index_images` of the image folders `names`, each in `root` or up to `depth` levels below."""
  return index_images([find(root, name, help_text, want_dir=True, depth=depth) for name in names], root)


def _search(folder: epath.Path, name: str, depth: int, want_dir: bool) -> list[epath.Path]:
  found = []
  for entry in folder_layout._visible(folder):  # pylint: disable=protected-access
    if entry.name.lower() == name.lower() and entry.is_dir() == want_dir:
      found.append(entry)
    elif depth > 0 and entry.is_dir():
      found += _search(entry, name, depth - 1, want_dir)
  return found


def find(folder: epath.PathLike, name: str, help_text: str, *, want_dir: bool = False,
         depth: int = 2, required: bool = True) -> epath.Path | None:
  """The file (or folder) `name` in `folder` or up to `depth` levels below.

  Names match in any case, the exact case first: Kaggle's HAM10000 holds
  each image folder twice, once in lower case.
  """
  folder = folder_layout.absolute_path(folder)
  if not folder.is_dir():
    raise errors.DatasetLayoutError(f'Dataset folder {folder} does not exist.\n{help_text}')
  found = _search(folder, name, depth, want_dir)
  exact = [p for p in found if p.name == name]
  found = exact or found
  if len({str(p.parent) for p in found}) > 1:
    raise errors.DatasetLayoutError(
        f'{folder} holds several {name}: {[str(p) for p in found]}; point at the dataset to use.')
  if not found:
    if not required:
      return None
    raise errors.DatasetLayoutError(
        f'{folder} has no {name} (searched {depth} folder levels down).\n{help_text}')
  return found[0]


def image_key(name: str) -> str:
  """Matches an image id in a CSV to a file: no folder, extension or `_downsampled`."""
  return groups_csv.group_key(name).rsplit('/', 1)[-1].removesuffix(DOWNSAMPLED_SUFFIX)


def index_images(folders: Iterable[epath.Path], root: epath.Path
                 ) -> tuple[dict[str, tuple[epath.Path, str]], list[folder_layout.Skipped]]:
  """Image files under `folders` (any depth) by `image_key`: (path, name relative to root)."""
  images, skipped = {}, []
  pending = list(folders)
  while pending:
    folder = pending.pop(0)
    for entry in folder_layout._visible(folder):  # pylint: disable=protected-access
      file_name = entry.relative_to(root).as_posix()
      if entry.is_dir():
        pending.append(entry)
      elif entry.suffix.lower() not in folder_layout.IMAGE_EXTENSIONS:
        skipped.append(folder_layout.Skipped(file_name, f'unsupported extension {entry.suffix!r}'))
      elif image_key(entry.name) in images:
        other = images[image_key(entry.name)][1]
        skipped.append(folder_layout.Skipped(file_name, f'same image id as {other}'))
      else:
        images[image_key(entry.name)] = (entry, file_name)
  return images, skipped


def read_csv(path: epath.Path, required: Sequence[str]
             ) -> tuple[list[Row], list[folder_layout.Skipped]]:
  """Data rows of a CSV that must have the `required` columns.

  Rows with more or fewer fields than the header are listed as skipped;
  a file that is not UTF-8 CSV with those columns is an error.
  """
  try:
    text = path.read_bytes().decode('utf-8-sig')
  except UnicodeDecodeError as error:
    raise errors.DatasetLayoutError(
        f'{path} is not a UTF-8 CSV file ({error}); use the file as published.') from None
  reader = csv.DictReader(io.StringIO(text, newline=''), restkey=None, restval=None)
  try:
    columns = [c.strip() for c in reader.fieldnames or []]
  except csv.Error as error:
    raise errors.DatasetLayoutError(f'{path} is not a CSV file: {error}.') from None
  missing = [c for c in required if c not in columns]
  if missing:
    raise errors.DatasetLayoutError(
        f'{path} lacks the column(s) {missing}; it has {columns}. Use the file as published '
        f'(columns {list(required)}).')
  reader.fieldnames = columns
  rows, skipped = [], []
  try:
    for values in reader:
      line = reader.line_num
      where = f'{path.name} line {line}'
      extra = values.pop(None, None) or []  # Fields beyond the header's.
      present = sum(v is not None for v in values.values())  # Short rows get None.
      if extra or present < len(columns):
        skipped.append(folder_layout.Skipped(
            where, f'malformed row: {present + len(extra)} fields, the header has {len(columns)}'))
        continue
      rows.append(Row(line, {k: v.strip() for k, v in values.items()}))
  except csv.Error as error:
    raise errors.DatasetLayoutError(
        f'{path} line {reader.line_num} is not valid CSV: {error}.') from None
  if not rows:
    raise errors.DatasetLayoutError(f'{path} has no usable data rows.')
  return rows, skipped


def one_hot(row: Row, columns: Mapping[str, str]) -> str:
  """The label of a one-hot row: the column holding 1 (`columns` maps column -> class).

  Raises:
    SkipRow: not exactly one 1 among 0s, or the 1 in a column that is not a class.
  """
  hot = []
  for column, value in row.values.items():
    if column in columns or column == 'UNK':
      try:
        number = float(value)
      except ValueError:
        raise SkipRow(f'label column {column} holds {value!r}, not a number') from None
      if number not in (0.0, 1.0):
        raise SkipRow(f'label column {column} holds {value!r}, not 0 or 1')
      if number == 1.0:
        hot.append(column)
  if len(hot) != 1:
    raise SkipRow(f'one-hot label with {len(hot)} ones ({hot})')
  if hot[0] not in columns:
    raise SkipRow(f'label {hot[0]} is not a class of this dataset')
  return columns[hot[0]]


def label(value: str, table: Mapping[str, str]) -> str:
  """The common class of a source label; unknown labels skip the row."""
  if value not in table:
    raise SkipRow(f'unknown label {value!r} (known: {sorted(table)})')
  return table[value]


def metadata(age: str = '', sex: str = '', site: str = '', *, source: str) -> dict[str, object]:
  """The `age`, `sex`, `site` features of a row; a value outside the vocabulary skips it."""
  try:
    return {'age': vocabulary.age(age), 'sex': vocabulary.sex(sex),
            'site': vocabulary.site(site, source)}
  except vocabulary.UnknownValueError as error:
    raise SkipRow(str(error)) from None


MISSING_METADATA = {'age': vocabulary.MISSING_AGE, 'sex': '', 'site': ''}


def match_rows(rows: Iterable[Row], image_column: str, images: dict[str, tuple[epath.Path, str]],
               csv_name: str, make_record: Callable[[Row, epath.Path, str], folder_layout.ImageRecord]
               ) -> tuple[list[folder_layout.ImageRecord], list[folder_layout.Skipped]]:
  """Records of the rows whose image is in `images`, which loses the matched ones.

  Rows without an image, repeated rows and rows `make_record` rejects
  (`SkipRow`) are listed as skipped.
  """
  records, skipped, seen = [], [], set()
  for row in rows:
    name = row.values[image_column]
    where = f'{csv_name} line {row.line} ({name})'
    key = image_key(name)
    if not key:
      skipped.append(folder_layout.Skipped(where, 'no image id'))
    elif key in seen:
      skipped.append(folder_layout.Skipped(where, 'image listed again'))
    elif key not in images:
      skipped.append(folder_layout.Skipped(where, 'image file not found'))
    else:
      seen.add(key)
      path, file_name = images.pop(key)
      try:
        records.append(make_record(row, path, file_name))
      except SkipRow as error:
        skipped.append(folder_layout.Skipped(file_name, f'{csv_name} line {row.line}: {error}'))
  return records, skipped


def unlisted(images: Mapping[str, tuple[epath.Path, str]], csv_name: str
             ) -> list[folder_layout.Skipped]:
  """The image files no CSV row named."""
  return [folder_layout.Skipped(file_name, f'not listed in {csv_name}')
          for _, file_name in sorted(images.values(), key=lambda x: x[1])]
