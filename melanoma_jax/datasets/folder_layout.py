"""Reading `ROOT/<split>/<class>/<image>` trees: finding the root, the split and class folders.

Plain Python, testable without TFDS. All file access goes through
`etils.epath`, so trees may live on `gs://` or other remote file systems.
"""

import dataclasses
import os
import re
import stat
from typing import Any, Mapping, Sequence

from etils import epath

from melanoma_jax.errors import DatasetLayoutError

IMAGE_EXTENSIONS = ('.bmp', '.jpeg', '.jpg', '.png')

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
