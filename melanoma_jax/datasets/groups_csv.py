"""The groups CSV: which lesion or patient each image belongs to, so splits keep a group together."""

import collections
import csv
import io
import pathlib
import unicodedata
from typing import Mapping, Sequence

from etils import epath

from melanoma_jax.datasets.folder_layout import IMAGE_EXTENSIONS
from melanoma_jax.errors import DatasetLayoutError

# Candidate columns of a groups CSV (ISIC archive, ISIC 2019/2020, HAM10000).
IMAGE_COLUMNS = ('image', 'image_id', 'image_name', 'isic_id', 'file_name', 'filename')
# Coarsest first: one patient's lesions share skin and camera, so grouping by
# patient is the safer guard against train/validation leakage.
GROUP_COLUMNS = ('patient_id', 'lesion_id')


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
