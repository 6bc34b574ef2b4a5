"""The features and dataset info every builder yields, and the class names of the ISIC archive."""


import numpy as np
import tensorflow_datasets as tfds

ISIC_CLASSES = (
    'actinic keratosis',
    'basal cell carcinoma',
    'dermatofibroma',
    'melanoma',
    'nevus',
    'pigmented benign keratosis',
    'seborrheic keratosis',
    'squamous cell carcinoma',
    'vascular lesion',
)
MELANOMA = 'melanoma'

# Train-folder image counts of the 9-class ISIC archive (see shared/REFERENCE.md).
ISIC_TRAIN_COUNTS = {
    'actinic keratosis': 114,
    'basal cell carcinoma': 376,
    'dermatofibroma': 95,
    'melanoma': 438,
    'nevus': 357,
    'pigmented benign keratosis': 462,
    'seborrheic keratosis': 77,
    'squamous cell carcinoma': 181,
    'vascular lesion': 139,
}


METADATA_FEATURES = ('age', 'sex', 'site')


def lesion_features(class_names: tuple[str, ...], image_size: int,
                    metadata: bool = False) -> tfds.features.FeaturesDict:
  """The feature spec shared by every builder of this package."""
  features = {
      'image': tfds.features.Image(shape=(image_size, image_size, 3), encoding_format='png'),
      'label': tfds.features.ClassLabel(names=list(class_names)),
      'file_name': tfds.features.Text(),
      'group_id': tfds.features.Text(),
  }
  if metadata:
    features.update(age=tfds.features.Scalar(dtype=np.float32), sex=tfds.features.Text(),
                    site=tfds.features.Text())
  return tfds.features.FeaturesDict(features)


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """A DatasetInfo that never looks for this dataset on TFDS' GCS bucket.

  TFDS' own looks there whenever a builder is made before its data is
  prepared, and first makes a temporary directory (in /tmp) for the files it
  would copy, which it never removes: one more for every such builder.
  """

  def initialize_from_bucket(self) -> None:
    """Nothing to fetch: these datasets are built from files on disk only."""
