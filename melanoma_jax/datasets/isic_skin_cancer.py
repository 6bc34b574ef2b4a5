"""TFDS builder for the 9-class ISIC skin-cancer archive (manual download).

    builder = tfds.builder('isic_skin_cancer', data_dir=DATA_DIR)  # Config '256px'.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ARCHIVE_DIR))

Another stored size or a groups CSV is another config, named to tell it apart:
`config=preparation.FolderConfig(name='224px_lesions', image_size=224, groups_csv=CSV)`.
"""

import tensorflow_datasets as tfds

from melanoma_jax import errors
from melanoma_jax.datasets.features import ISIC_CLASSES
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import preparation

ARCHIVE_NAME = 'Skin cancer ISIC The International Skin Imaging Collaboration'
SPLITS = ('train', 'test')  # From the archive's Train/ and Test/ folders.


class IsicSkinCancer(preparation.FolderBuilder):
  """Dermoscopic images of 9 skin-lesion classes (ISIC), Train/ and Test/ folders as shipped."""

  HOMEPAGE = 'https://www.isic-archive.com'
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
This dataset is the 9-class ISIC archive '{ARCHIVE_NAME}' (about 2,357
dermoscopic JPEGs: 2,239 in Train/, 118 in Test/), usually downloaded by hand,
e.g. from Kaggle (dataset "nodoubttome/skin-cancer9-classesisic").
Extract it and give its location as the manual_dir:
  tfds.download.DownloadConfig(manual_dir=...)  (default: <data_dir>/downloads/manual/)
manual_dir may be the archive folder itself (the one holding Train/ and Test/)
or the folder that contains it, on local disk or a remote file system
(gs://bucket/...). Expected layout:
{folder_layout.layout_diagram(ARCHIVE_NAME, ('Train', 'Test'), ISIC_CLASSES)}
"""

  def _class_names(self) -> tuple[str, ...]:
    return ISIC_CLASSES

  def _scan(self, dl_manager: tfds.download.DownloadManager) -> folder_layout.FolderTree:
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as error:  # How TFDS reports a missing or empty manual_dir.
      raise errors.DatasetLayoutError(str(error)) from error
    return folder_layout.scan_tree(
        folder_layout.find_root(manual_dir, SPLITS), splits=SPLITS,
        class_names=ISIC_CLASSES, help_text=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
