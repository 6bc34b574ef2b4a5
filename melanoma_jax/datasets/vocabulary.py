"""One class and metadata vocabulary for the field's datasets, so they can be combined.

Every dataset names its diagnoses its own way (HAM10000 `mel`, ISIC 2019 `MEL`,
SIIM-ISIC 2020 `melanoma`). Builders map them here, once, to `COMMON_CLASSES`;
every merge of source labels into one common class is listed in the tables
below (and in README.md), none is implicit. A source label missing from its
table is an unknown label: the builder skips the row and lists it.

Metadata get the same treatment: sex is 'female', 'male' or '' (unknown), age
in years or `MISSING_AGE`, and the anatomical site one of `SITES` or ''
(unknown): the 8 sites of ISIC 2019 and the 15 of HAM10000 are coarsened to
the 6 of SIIM-ISIC 2020, the only level all three datasets can give.
"""

from collections.abc import Mapping, Sequence

ACTINIC_KERATOSIS = 'actinic keratosis'
BASAL_CELL_CARCINOMA = 'basal cell carcinoma'
BENIGN_KERATOSIS = 'benign keratosis'
DERMATOFIBROMA = 'dermatofibroma'
MELANOMA = 'melanoma'
NEVUS = 'nevus'
SQUAMOUS_CELL_CARCINOMA = 'squamous cell carcinoma'
UNKNOWN = 'unknown'
VASCULAR_LESION = 'vascular lesion'

# Sorted, as image_folder sorts its class names; a dataset's classes are the
# subset it has, in this order.
COMMON_CLASSES = (
    ACTINIC_KERATOSIS,
    BASAL_CELL_CARCINOMA,
    BENIGN_KERATOSIS,
    DERMATOFIBROMA,
    MELANOMA,
    NEVUS,
    SQUAMOUS_CELL_CARCINOMA,
    UNKNOWN,
    VASCULAR_LESION,
)

# HAM10000 `dx` (also the ISIC 2018 Task 3 ground-truth columns, upper case).
# akiec includes intraepidermal carcinoma (Bowen's disease, a squamous cell
# carcinoma in situ): HAM10000 does not tell them apart.
HAM10000 = {
    'akiec': ACTINIC_KERATOSIS,
    'bcc': BASAL_CELL_CARCINOMA,
    'bkl': BENIGN_KERATOSIS,  # Seborrheic keratosis, solar lentigo, lichen-planus-like keratosis.
    'df': DERMATOFIBROMA,
    'mel': MELANOMA,
    'nv': NEVUS,
    'vasc': VASCULAR_LESION,
}

# ISIC 2019 ground-truth columns. UNK has no training images and is not mapped.
ISIC2019 = {
    'AK': ACTINIC_KERATOSIS,
    'BCC': BASAL_CELL_CARCINOMA,
    'BKL': BENIGN_KERATOSIS,
    'DF': DERMATOFIBROMA,
    'MEL': MELANOMA,
    'NV': NEVUS,
    'SCC': SQUAMOUS_CELL_CARCINOMA,
    'VASC': VASCULAR_LESION,
}

# SIIM-ISIC 2020 `diagnosis`. The keratoses and lentigines go to benign
# keratosis (as the 2020 winner did); 'unknown' and the two one-image benign
# diagnoses go to unknown, a benign class of no specific diagnosis.
ISIC2020 = {
    'atypical melanocytic proliferation': UNKNOWN,
    'cafe-au-lait macule': UNKNOWN,
    'lentigo NOS': BENIGN_KERATOSIS,
    'lichenoid keratosis': BENIGN_KERATOSIS,
    'melanoma': MELANOMA,
    'nevus': NEVUS,
    'seborrheic keratosis': BENIGN_KERATOSIS,
    'solar lentigo': BENIGN_KERATOSIS,
    'unknown': UNKNOWN,
}

# The 9-class ISIC archive (isic_skin_cancer) folder names.
ISIC_ARCHIVE = {
    'actinic keratosis': ACTINIC_KERATOSIS,
    'basal cell carcinoma': BASAL_CELL_CARCINOMA,
    'dermatofibroma': DERMATOFIBROMA,
    'melanoma': MELANOMA,
    'nevus': NEVUS,
    'pigmented benign keratosis': BENIGN_KERATOSIS,
    'seborrheic keratosis': BENIGN_KERATOSIS,
    'squamous cell carcinoma': SQUAMOUS_CELL_CARCINOMA,
    'vascular lesion': VASCULAR_LESION,
}

# Per source dataset (TFDS name): its label -> common class. Datasets with
# their own folder-named classes (image_folder) are absent: they combine only
# if their names already are common classes.
SOURCE_LABELS: Mapping[str, Mapping[str, str]] = {
    'ham10000': HAM10000,
    'isic2019': ISIC2019,
    'isic2020': ISIC2020,
    'isic_skin_cancer': ISIC_ARCHIVE,
    'synthetic_lesions': ISIC_ARCHIVE,
}

SEXES = ('female', 'male')
MISSING_AGE = -1.0

TORSO = 'torso'
SITES = ('head/neck', 'lower extremity', 'oral/genital', 'palms/soles', TORSO, 'upper extremity')

# ISIC 2019 `anatom_site_general` and SIIM-ISIC 2020
# `anatom_site_general_challenge` (which already says 'torso').
_GENERAL_SITES = {
    **{site: site for site in SITES},
    'anterior torso': TORSO,
    'lateral torso': TORSO,
    'posterior torso': TORSO,
}
# HAM10000 `localization`.
_HAM10000_SITES = {
    'abdomen': TORSO,
    'acral': 'palms/soles',
    'back': TORSO,
    'chest': TORSO,
    'ear': 'head/neck',
    'face': 'head/neck',
    'foot': 'lower extremity',
    'genital': 'oral/genital',
    'hand': 'upper extremity',
    'lower extremity': 'lower extremity',
    'neck': 'head/neck',
    'scalp': 'head/neck',
    'trunk': TORSO,
    'upper extremity': 'upper extremity',
}
_UNKNOWN_VALUES = ('', 'unknown', 'nan', 'na', 'n/a', 'none')


class UnknownValueError(ValueError):
  """A metadata value outside the vocabulary; the builder skips the row."""


def common_classes(names: Sequence[str]) -> tuple[str, ...]:
  """`names` (common classes) in vocabulary order, so every dataset agrees on it."""
  unknown = sorted(set(names) - set(COMMON_CLASSES))
  if unknown:
    raise ValueError(f'{unknown} are not common classes {COMMON_CLASSES}.')
  return tuple(c for c in COMMON_CLASSES if c in set(names))


def to_common(dataset: str, class_name: str) -> str:
  """The common class of a prepared dataset's class name (`dataset` as in config.dataset)."""
  if class_name in COMMON_CLASSES:
    return class_name
  table = SOURCE_LABELS.get(dataset.split('/')[0].split(':')[0], {})
  if class_name not in table:
    raise ValueError(f'{dataset} class {class_name!r} is not in the common vocabulary '
                     f'{COMMON_CLASSES} and has no mapping to it: rename its class folder to a '
                     'common class to combine it with other datasets.')
  return table[class_name]


def _unknown(value: str) -> bool:
  return value.strip().lower() in _UNKNOWN_VALUES


def sex(value: str) -> str:
  """'female', 'male' or '' (unknown)."""
  if _unknown(value):
    return ''
  normalized = value.strip().lower()
  if normalized not in SEXES:
    raise UnknownValueError(f'unknown sex {value!r} (expected one of {SEXES} or blank)')
  return normalized


def age(value: str) -> float:
  """Age in years, or `MISSING_AGE`."""
  if _unknown(value):
    return MISSING_AGE
  try:
    years = float(value)
  except ValueError:
    raise UnknownValueError(f'age {value!r} is not a number') from None
  if not 0 <= years <= 120:
    raise UnknownValueError(f'age {value!r} is outside 0-120')
  return years


def site(value: str, source: str) -> str:
  """One of `SITES` or '' (unknown), from a `source` dataset's site name."""
  if _unknown(value):
    return ''
  table = _HAM10000_SITES if source == 'ham10000' else _GENERAL_SITES
  normalized = value.strip().lower()
  if normalized not in table:
    raise UnknownValueError(f'unknown anatomical site {value!r}')
  return table[normalized]
