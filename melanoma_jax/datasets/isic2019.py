"""TFDS builder for the ISIC 2019 challenge training set, manual download, as published.

    builder = tfds.builder('isic2019', data_dir=DATA_DIR)  # Config '256px'.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ISIC2019_DIR))

Labels are the one-hot ground-truth columns mapped to the common vocabulary
(`vocabulary.ISIC2019`; a row with UNK set is skipped and listed), groups are
the metadata's `lesion_id` (an image without one is its own group), and age,
sex and site are stored per example. The challenge's test labels are not
published with it: only a `train` split is prepared, and training carves Test
from it by lesion (see input_pipeline).
"""

from etils import epath
import tensorflow_datasets as tfds

from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import tables
from melanoma_jax.datasets import vocabulary

IMAGE_FOLDER = 'ISIC_2019_Training_Input'
GROUND_TRUTH_CSV = 'ISIC_2019_Training_GroundTruth.csv'
METADATA_CSV = 'ISIC_2019_Training_Metadata.csv'
METADATA_COLUMNS = ('image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex')


class Isic2019(tables.CsvBuilder):
  """ISIC 2019 training set: 25,331 dermoscopic images of 8 diagnoses, with lesion ids and metadata."""

  HOMEPAGE = 'https://challenge.isic-archive.com/data/#2019'
  VOCABULARY = vocabulary.ISIC2019
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
ISIC 2019 is a manual download from https://challenge.isic-archive.com/data/#2019
(Training Data, Training Metadata, Training Ground Truth). Extract the images and
put the two CSVs next to them; give that folder (or one containing it, local or
gs://) as the manual_dir:
  MANUAL_DIR/
    {IMAGE_FOLDER}/   ISIC_0000000.jpg ... (may hold {IMAGE_FOLDER}/ again)
    {GROUND_TRUTH_CSV}   (columns image, {', '.join(vocabulary.ISIC2019)}, UNK)
    {METADATA_CSV}   (columns {', '.join(METADATA_COLUMNS)})
"""

  def _scan(self, dl_manager: tfds.download.DownloadManager) -> folder_layout.FolderTree:
    help_text = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    ground_truth = tables.find_main_csv(dl_manager, GROUND_TRUTH_CSV, help_text)
    root = ground_truth.parent
    metadata_csv = tables.find(root, METADATA_CSV, help_text, depth=0)
    images, skipped = tables.index_folders(root, [IMAGE_FOLDER], help_text, depth=0)
    label_rows, malformed = tables.read_csv(ground_truth, ('image', *vocabulary.ISIC2019, 'UNK'))
    metadata_rows, malformed_metadata = tables.read_csv(metadata_csv, METADATA_COLUMNS)
    metadata = {}
    for row in metadata_rows:
      metadata.setdefault(tables.image_key(row.values['image']), row)

    def record(row: tables.Row, path: epath.Path, file_name: str) -> folder_layout.ImageRecord:
      label = tables.one_hot(row, vocabulary.ISIC2019)
      meta = metadata.get(tables.image_key(row.values['image']))
      if meta is None:
        return folder_layout.ImageRecord(path, file_name, label, group_id='',
                                         metadata=tables.MISSING_METADATA)
      values = meta.values
      return folder_layout.ImageRecord(
          path, file_name, label, group_id=values['lesion_id'],
          metadata=tables.metadata(values['age_approx'], values['sex'],
                                   values['anatom_site_general'], source='isic2019'))

    train, unmatched = tables.match_rows(label_rows, 'image', images, GROUND_TRUTH_CSV, record)
    skipped += malformed + malformed_metadata + unmatched + tables.unlisted(images, GROUND_TRUTH_CSV)
    return folder_layout.FolderTree(root, self._class_names(), {'train': tuple(train)},
                                    tuple(skipped))
