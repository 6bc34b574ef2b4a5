"""TFDS builder `image_folder`: a user's own `ROOT/<split>/<class>/<image>` tree.

Class names come from the folders, and TFDS needs them in `_info`, before any
preparation. So the tree is given to the constructor (`manual_dir=`) and
scanned there; a later load of the prepared data needs no tree, as the names
are read back from the prepared `features.json`:

    builder = tfds.builder('image_folder', manual_dir=ROOT, data_dir=DATA_DIR)
    builder.download_and_prepare()
    ds = tfds.load('image_folder', data_dir=DATA_DIR, split='train')

Split folders become lower-case split names (`Train/` -> `train`). Each tree
needs its own `data_dir` or config name: they share the dataset name.
"""

import os
from typing import Any

from etils import epath
import tensorflow_datasets as tfds

from melanoma_jax import errors
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import preparation


class ImageFolder(preparation.FolderBuilder):
  """Images in ROOT/<split>/<class>/ folders; labels are the class folder names."""

  TREE_AT_CONSTRUCTION = True

  def __init__(self, *, manual_dir: epath.PathLike | None = None, **kwargs: Any):
    self._tree = None if manual_dir is None else folder_layout.scan_tree(manual_dir)
    super().__init__(**kwargs)
    self._original_state['manual_dir'] = manual_dir  # Pickling re-runs __init__.
    if self._tree is not None and self.is_prepared():
      prepared_from = self.preparation_report()['root']
      if prepared_from != str(self._tree.root):
        raise errors.DatasetLayoutError(
            f'{self.data_path} already holds image_folder prepared from {prepared_from}, not '
            f'{self._tree.root}: use another data_dir or config name for this tree.')

  def _needs_tree(self) -> errors.DatasetLayoutError:
    return errors.DatasetLayoutError(
        f'Preparing image_folder in {self.data_path} needs the tree to read: '
        "tfds.builder('image_folder', manual_dir=ROOT, ...). Expected layout:\n"
        f'{folder_layout.layout_diagram()}')

  def _class_names(self) -> tuple[str, ...]:
    if self._tree is not None:
      return self._tree.class_names
    if self.is_prepared():
      return tuple(tfds.features.FeatureConnector.from_config(
          os.fspath(self.data_path))['label'].names)
    raise self._needs_tree()

  def _scan(self, dl_manager: tfds.download.DownloadManager) -> folder_layout.FolderTree:
    del dl_manager  # The tree was scanned in __init__ to know the class names.
    return self._tree

  def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                            download_config: tfds.download.DownloadConfig) -> None:
    if self._tree is None:  # Built from prepared files, then asked to regenerate them.
      raise self._needs_tree()
    given = download_config.manual_dir
    if given is not None and folder_layout.absolute_path(given) != self._tree.root:
      raise errors.DatasetLayoutError(
          f'DownloadConfig(manual_dir={given!s}) differs from the tree this builder was '
          f'made with ({self._tree.root}); pass the tree as manual_dir= to the builder only.')
    super()._download_and_prepare(dl_manager, download_config)
