"""TFDS builders for skin-lesion data, by name, and the contract every builder follows.

Every builder yields the same features, so the input pipeline never needs to
know which dataset it reads:

- ``image``: uint8 RGB, square, stored at the builder's resolution;
- ``label``: ClassLabel over the dataset's class names;
- ``file_name``: the source file (or synthetic id), for traceability;
- ``group_id``: the lesion or patient the image belongs to ("" when unknown),
  so train/validation splits can keep a group on one side.

Builders of datasets with patient metadata (HAM10000, ISIC 2019, SIIM-ISIC
2020) add, in the vocabulary of `datasets.vocabulary`:

- ``age``: float32 years, -1 when unknown;
- ``sex``: 'female', 'male' or '' (unknown);
- ``site``: the anatomical site, one of `vocabulary.SITES` or '' (unknown).
"""

# The contract, importable as `datasets.X`.
from melanoma_jax.datasets.features import (  # noqa: F401
    ISIC_CLASSES, ISIC_TRAIN_COUNTS, MELANOMA, METADATA_FEATURES, lesion_features)
from melanoma_jax.datasets import (ham10000, isic2019, isic2020, isic_skin_cancer, synthetic_lesions,
                                   user_folder)

# config.dataset names (before any '/config') -> builder class. A new dataset is a
# builder module in this package (see `preparation.FolderBuilder`) and one entry here.
BUILDERS = {
    'ham10000': ham10000.Ham10000,
    'image_folder': user_folder.ImageFolder,
    'isic2019': isic2019.Isic2019,
    'isic2020': isic2020.Isic2020,
    'isic_skin_cancer': isic_skin_cancer.IsicSkinCancer,
    'synthetic_lesions': synthetic_lesions.SyntheticLesions,
}
