"""TFDS builder for HAM10000 (Tschandl et al. 2018), manual download, as published.

    builder = tfds.builder('ham10000', data_dir=DATA_DIR)  # Config '256px'.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=HAM_DIR))

Labels (`dx`) map to the common vocabulary (`vocabulary.HAM10000`), groups are
the `lesion_id`s, and age, sex and site are stored per example. The `train`
split is HAM10000; `test` is the ISIC 2018 Task 3 test set when its images
and ground truth are in the manual folder too, else there is no `test` split
and training carves one from `train` by lesion (see input_pipeline).
"""

from etils import epath
import tensorflow_datasets as tfds

from melanoma_jax import errors
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import tables
from melanoma_jax.datasets import vocabulary

METADATA_CSV = 'HAM10000_metadata.csv'
IMAGE_FOLDERS = ('HAM10000_images_part_1', 'HAM10000_images_part_2')
TEST_IMAGES = 'ISIC2018_Task3_Test_Images'
TEST_GROUND_TRUTH = 'ISIC2018_Task3_Test_GroundTruth.csv'
COLUMNS = ('lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization')


class Ham10000(tables.CsvBuilder):
  """HAM10000: 10,015 dermoscopic images of 7 diagnoses, with lesion ids and patient metadata."""

  HOMEPAGE = 'https://doi.org/10.7910/DVN/DBW86T'
  VOCABULARY = vocabulary.HAM10000
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
HAM10000 is a manual download: Harvard Dataverse (doi:10.7910/DVN/DBW86T) or
Kaggle ("kmader/skin-cancer-mnist-ham10000"). Extract it and give the folder
as the manual_dir (the dataset folder or one containing it; local or gs://):
  MANUAL_DIR/
    {METADATA_CSV}   (columns {', '.join(COLUMNS)})
    {IMAGE_FOLDERS[0]}/   ISIC_0024306.jpg ...
    {IMAGE_FOLDERS[1]}/
Optional, for a Test split, the ISIC 2018 Task 3 test set (challenge.isic-archive.com):
    {TEST_IMAGES}/   ISIC_0034524.jpg ...
    {TEST_GROUND_TRUTH}   (columns image, MEL, NV, BCC, AKIEC, BKL, DF, VASC)
"""

  def _scan(self, dl_manager: tfds.download.DownloadManager) -> folder_layout.FolderTree:
    help_text = self.MANUAL_DOWNLOAD_INSTRUCTIONS
    metadata_csv = tables.find_main_csv(dl_manager, METADATA_CSV, help_text)
    root = metadata_csv.parent
    images, skipped = tables.index_folders(root, IMAGE_FOLDERS, help_text, depth=1)
    rows, malformed = tables.read_csv(metadata_csv, COLUMNS)

    def record(row: tables.Row, path: epath.Path, file_name: str) -> folder_layout.ImageRecord:
      values = row.values
      return folder_layout.ImageRecord(
          path, file_name, tables.label(values['dx'], vocabulary.HAM10000),
          group_id=values['lesion_id'],
          metadata=tables.metadata(values['age'], values['sex'], values['localization'],
                                   source='ham10000'))

    train, unmatched = tables.match_rows(rows, 'image_id', images, METADATA_CSV, record)
    skipped += malformed + unmatched + tables.unlisted(images, METADATA_CSV)
    splits = {'train': tuple(train)}
    test = self._scan_test(root, help_text, skipped)
    if test:
      splits['test'] = tuple(test)
    return folder_layout.FolderTree(root, self._class_names(), splits, tuple(skipped))

  def _scan_test(self, root: epath.Path, help_text: str,
                 skipped: list[folder_layout.Skipped]) -> list[folder_layout.ImageRecord]:
    """The ISIC 2018 Task 3 test set, if both its parts are there."""
    folder = tables.find(root, TEST_IMAGES, help_text, want_dir=True, required=False)
    ground_truth = tables.find(root, TEST_GROUND_TRUTH, help_text, required=False)
    if folder is None and ground_truth is None:
      return []
    if folder is None or ground_truth is None:
      missing = TEST_IMAGES + '/' if folder is None else TEST_GROUND_TRUTH
      raise errors.DatasetLayoutError(
          f'{root} has half of the ISIC 2018 Task 3 test set: {missing} is missing. Add it for a '
          f'Test split, or remove the other part to carve Test from HAM10000.\n{help_text}')
    images, test_skipped = tables.index_images([folder], root)
    columns = {dx.upper(): name for dx, name in vocabulary.HAM10000.items()}
    rows, malformed = tables.read_csv(ground_truth, ('image', *columns))

    def record(row: tables.Row, path: epath.Path, file_name: str) -> folder_layout.ImageRecord:
      return folder_layout.ImageRecord(path, file_name, tables.one_hot(row, columns), group_id='',
                                       metadata=tables.MISSING_METADATA)

    test, unmatched = tables.match_rows(rows, 'image', images, TEST_GROUND_TRUTH, record)
    skipped += test_skipped + malformed + unmatched + tables.unlisted(images, TEST_GROUND_TRUTH)
    return test
