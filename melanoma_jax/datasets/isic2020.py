"""TFDS builder for the SIIM-ISIC 2020 melanoma training set, manual download, as published.

    builder = tfds.builder('isic2020', data_dir=DATA_DIR)  # Config '256px'.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ISIC2020_DIR))

Labels are `diagnosis` mapped to the common vocabulary (`vocabulary.ISIC2020`;
`target` must agree: 1 for melanoma, 0 otherwise), groups are the
`patient_id`s, and age, sex and site are stored per example. The published
duplicates list is honoured: of each set of duplicate images only the first
(in train.csv order) is kept, the others are listed as skipped, so no image
can sit on both sides of a split. The test images have no public labels: only
a `train` split is prepared, and training carves Test from it by patient.
"""

import collections

from etils import epath
import tensorflow_datasets as tfds

from melanoma_jax import errors
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import tables
from melanoma_jax.datasets import vocabulary

TRAIN_CSV = 'train.csv'
IMAGE_FOLDERS = ('jpeg/train', 'train')  # Kaggle's layout, then the ISIC site's JPEG zip.
DUPLICATES_CSV = 'ISIC_2020_Training_Duplicates.csv'
COLUMNS = ('image_name', 'patient_id', 'sex', 'age_approx', 'anatom_site_general_challenge',
           'diagnosis', 'benign_malignant', 'target')


def duplicate_owners(pairs: list[tables.Row], order: list[str]) -> dict[str, str]:
  """Maps each image of a duplicate set to the one kept: the first in `order` (train.csv)."""
  parent = {}

  def root(name: str) -> str:
    while parent.setdefault(name, name) != name:
      parent[name] = parent[parent[name]]
      name = parent[name]
    return name

  for row in pairs:
    a, b = (tables.image_key(row.values[c]) for c in ('image_name_1', 'image_name_2'))
    parent[root(a)] = root(b)
  rank = {name: i for i, name in enumerate(order)}
  members = collections.defaultdict(list)
  for name in parent:
    members[root(name)].append(name)
  owners = {}
  for group in members.values():
    kept = min(group, key=lambda n: (rank.get(n, len(rank)), n))
    owners.update(dict.fromkeys(group, kept))
  return owners


class Isic2020(tables.CsvBuilder):
  """SIIM-ISIC 2020 training set: 33,126 images, 1.8% melanoma, with patient ids and metadata."""

  HOMEPAGE = 'https://challenge.isic-archive.com/data/#2020'
  VOCABULARY = vocabulary.ISIC2020
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
SIIM-ISIC 2020 is a manual download: Kaggle competition
"siim-isic-melanoma-classification" (train.csv and jpeg/train/ are enough) and,
from https://challenge.isic-archive.com/data/#2020, the duplicates list
{DUPLICATES_CSV}. Give the folder (or one containing it, local or gs://) as
the manual_dir:
  MANUAL_DIR/
    {TRAIN_CSV}   (columns {', '.join(COLUMNS)})
    jpeg/train/   ISIC_2637011.jpg ...   (or train/ with the JPEGs)
    {DUPLICATES_CSV}   (columns image_name_1, image_name_2; optional but recommended)
"""

  def _image_folder(self, root: epath.Path) -> epath.Path:
    for name in IMAGE_FOLDERS:
      folder = root / name
      if folder.is_dir() and any(p.suffix.lower() in ('.jpg', '.jpeg') for p in folder.iterdir()):
        return folder
    raise errors.DatasetLayoutError(
        f'{root} has no JPEG folder {" or ".join(n + "/" for n in IMAGE_FOLDERS)} (DICOM files '
        f'are not read).\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')

  def _scan(self, dl_manager: tfds.download.DownloadManager) -> folder_layout.FolderTree:
    help_text = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    train_csv = tables.find_main_csv(dl_manager, TRAIN_CSV, help_text)
    root = train_csv.parent
    images, skipped = tables.index_images([self._image_folder(root)], root)
    rows, malformed = tables.read_csv(train_csv, COLUMNS)
    duplicates_csv = tables.find(root, DUPLICATES_CSV, help_text, depth=1, required=False)
    owners = {}
    if duplicates_csv is None:
      skipped.append(folder_layout.Skipped(
          DUPLICATES_CSV, 'not found: duplicate images are kept, grouped by patient only'))
    else:
      pairs, malformed_pairs = tables.read_csv(duplicates_csv, ('image_name_1', 'image_name_2'))
      present = [tables.image_key(r.values['image_name']) for r in rows
                 if tables.image_key(r.values['image_name']) in images]
      owners = duplicate_owners(pairs, present)
      skipped += malformed_pairs

    def record(row: tables.Row, path: epath.Path, file_name: str) -> folder_layout.ImageRecord:
      values = row.values
      name = tables.image_key(values['image_name'])
      if owners.get(name, name) != name:
        raise tables.SkipRow(f'duplicate of {owners[name]} ({DUPLICATES_CSV})')
      label = tables.label(values['diagnosis'], vocabulary.ISIC2020)
      if values['target'] not in ('0', '1'):
        raise tables.SkipRow(f'target {values["target"]!r} is not 0 or 1')
      if (values['target'] == '1') != (label == vocabulary.MELANOMA):
        raise tables.SkipRow(f'diagnosis {values["diagnosis"]!r} disagrees with target '
                             f'{values["target"]}')
      return folder_layout.ImageRecord(
          path, file_name, label, group_id=values['patient_id'],
          metadata=tables.metadata(values['age_approx'], values['sex'],
                                   values['anatom_site_general_challenge'], source='isic2020'))

    train, unmatched = tables.match_rows(rows, 'image_name', images, TRAIN_CSV, record)
    skipped += malformed + unmatched + tables.unlisted(images, TRAIN_CSV)
    return folder_layout.FolderTree(root, self._class_names(), {'train': tuple(train)},
                                    tuple(skipped))
