"""Tiny copies of HAM10000, ISIC 2019 and SIIM-ISIC 2020 in their published layouts.

File, folder and column names are exactly as published (shared/DATASETS.md);
pixels are made up. Each copy carries the bad rows real downloads have:
missing images, unknown labels, malformed rows, duplicates. Used by the
builder tests, and by hand (a `manual_dir` to try the README's commands):

  python -m tests.field_fixtures DOWNLOADS
"""

import pathlib
import sys

import numpy as np
from PIL import Image

from melanoma_jax.datasets import ham10000
from melanoma_jax.datasets import isic2019
from melanoma_jax.datasets import isic2020
from melanoma_jax.datasets import vocabulary


def jpeg(path: pathlib.Path, seed: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (15, 20, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)


def write_csv(path: pathlib.Path, lines: list[str]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')


HAM_ROWS = [  # lesion_id, image_id, dx, dx_type, age, sex, localization
    'HAM_0000001,ISIC_0000001,mel,histo,55.0,male,back',
    'HAM_0000001,ISIC_0000002,mel,histo,55.0,male,back',  # Same lesion, second image.
    'HAM_0000002,ISIC_0000003,nv,follow_up,,unknown,unknown',  # Missing age, sex, site.
    'HAM_0000003,ISIC_0000004,bcc,histo,70.0,female,face',
    'HAM_0000004,ISIC_0000005,akiec,histo,65.0,female,scalp',
    'HAM_0000005,ISIC_0000006,bkl,consensus,45.0,male,trunk',
    'HAM_0000006,ISIC_0000007,df,histo,30.0,female,lower extremity',
    'HAM_0000007,ISIC_0000008,vasc,consensus,5.0,male,acral',
    'HAM_0000008,ISIC_0000009,xyz,histo,40.0,male,back',  # Unknown label.
    'HAM_0000009,ISIC_0000010,nv,histo,40.0,male,back',  # No image file.
    'HAM_0000010,ISIC_0000011,nv,histo,40.0,male',  # Malformed: a field short.
    'HAM_0000011,ISIC_0000012,nv,histo,40.0,robot,back',  # Unknown sex.
]


def write_ham10000(folder: pathlib.Path) -> pathlib.Path:
  """HAM10000 as Kaggle ships it, plus the ISIC 2018 Task 3 test set.

  The dataset folder is inside `folder`, and each image folder is there
  twice, once in lower case.
  """
  root = folder / 'skin-cancer-mnist-ham10000'
  write_csv(root / ham10000.METADATA_CSV,
            ['lesion_id,image_id,dx,dx_type,age,sex,localization', *HAM_ROWS])
  for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 99):  # 99: not in the CSV.
    part = ham10000.IMAGE_FOLDERS[i % 2]
    jpeg(root / part / f'ISIC_{i:07d}.jpg', seed=i)
    jpeg(root / part.lower() / f'ISIC_{i:07d}.jpg', seed=i)
  (root / ham10000.TEST_IMAGES / 'LICENSE.txt').parent.mkdir()
  (root / ham10000.TEST_IMAGES / 'LICENSE.txt').write_text('CC-BY-NC')
  for i in (101, 102, 103):
    jpeg(root / ham10000.TEST_IMAGES / f'ISIC_{i:07d}.jpg', seed=i)
  write_csv(root / ham10000.TEST_GROUND_TRUTH, [
      'image,MEL,NV,BCC,AKIEC,BKL,DF,VASC',
      'ISIC_0000101,1.0,0.0,0.0,0.0,0.0,0.0,0.0',
      'ISIC_0000102,0.0,0.0,0.0,0.0,0.0,0.0,1.0',
      'ISIC_0000103,1.0,1.0,0.0,0.0,0.0,0.0,0.0',  # Two labels.
  ])
  return root


def write_isic2019(folder: pathlib.Path, clean_per_class: int = 0) -> pathlib.Path:
  """ISIC 2019 training data, images nested twice, some `_downsampled`.

  `clean_per_class` more lesions of each class, one image each, make it big
  enough to split into train, validation and test.
  """
  root = folder / 'isic2019'
  images = root / isic2019.IMAGE_FOLDER / isic2019.IMAGE_FOLDER  # Nested twice, as some copies are.
  classes = list(vocabulary.ISIC2019)  # AK BCC BKL DF MEL NV SCC VASC

  def one_hot(hot: str) -> str:
    return ','.join('1.0' if c == hot else '0.0' for c in [*classes, 'UNK'])

  rows = [f'ISIC_{i:07d},{one_hot(c)}' for i, c in enumerate(classes)]
  rows += [
      'ISIC_0000008_downsampled,' + one_hot('MEL'),  # File name ends in _downsampled too.
      'ISIC_0000009,' + one_hot('NV'),  # File named ISIC_0000009_downsampled.jpg.
      'ISIC_0000010,' + one_hot('UNK'),
      'ISIC_0000011,' + one_hot('NV').replace('1.0', 'yes'),
      'ISIC_0000012,' + one_hot('NV'),  # No image file.
  ]
  clean = [(100 + 10 * c + k, name) for c, name in enumerate(classes) for k in range(clean_per_class)]
  rows += [f'ISIC_{i:07d},{one_hot(name)}' for i, name in clean]
  write_csv(root / isic2019.GROUND_TRUTH_CSV, ['image,' + ','.join([*classes, 'UNK']), *rows])
  for i in [*range(12), *(i for i, _ in clean)]:
    suffix = '_downsampled' if i in (8, 9) else ''
    jpeg(images / f'ISIC_{i:07d}{suffix}.jpg', seed=i)
  (images / 'ATTRIBUTION.txt').write_text('see ISIC')
  write_csv(root / isic2019.METADATA_CSV, [
      'image,age_approx,anatom_site_general,lesion_id,sex',
      'ISIC_0000000,55.0,anterior torso,BCN_0000001,male',
      'ISIC_0000001,55.0,posterior torso,BCN_0000001,male',
      'ISIC_0000002,,,,',  # All blank, no lesion id.
      'ISIC_0000003,30.0,head/neck,BCN_0000003,female',
      'ISIC_0000004,30.0,lateral torso,BCN_0000004,female',
      'ISIC_0000005,30.0,palms/soles,BCN_0000005,female',
      'ISIC_0000006,30.0,oral/genital,BCN_0000006,female',
      'ISIC_0000007,30.0,upper extremity,BCN_0000007,female',
      'ISIC_0000008_downsampled,70.0,lower extremity,MSK4_0001,male',
      # No metadata row for ISIC_0000009.
      *(f'ISIC_{i:07d},50.0,torso,BCN_{i:07d},female' for i, _ in clean),
  ])
  return root


ISIC2020_ROWS = [  # image_name, patient_id, sex, age_approx, site, diagnosis, benign_malignant, target
    'ISIC_0001001,IP_001,male,45.0,head/neck,melanoma,malignant,1',
    'ISIC_0001002,IP_001,male,45.0,torso,nevus,benign,0',
    'ISIC_0001003,IP_002,female,,,unknown,benign,0',
    'ISIC_0001004,IP_003,female,60.0,upper extremity,seborrheic keratosis,benign,0',
    'ISIC_0001005,IP_003,female,60.0,lower extremity,solar lentigo,benign,0',
    'ISIC_0001006,IP_004,male,35.0,palms/soles,cafe-au-lait macule,benign,0',
    'ISIC_0001007,IP_005,male,35.0,torso,nevus,benign,0',  # Duplicate of 2 ...
    'ISIC_0001008,IP_006,male,35.0,torso,nevus,benign,0',  # ... and of 7: keep only 2.
    'ISIC_0001009,IP_007,male,35.0,torso,nevus,malignant,1',  # Target disagrees.
    'ISIC_0001010,IP_007,male,35.0,torso,dysplastic thing,benign,0',  # Unknown diagnosis.
]


def write_isic2020(folder: pathlib.Path, clean_per_class: int = 0) -> pathlib.Path:
  """SIIM-ISIC 2020 as Kaggle ships it, plus the ISIC site's duplicates list.

  `clean_per_class` more patients of each class, one image each, make it big
  enough to split into train, validation and test.
  """
  root = folder / 'siim-isic-melanoma-classification'
  diagnoses = ('melanoma', 'nevus', 'solar lentigo', 'unknown')
  clean = [(1100 + 10 * d + k, name) for d, name in enumerate(diagnoses)
           for k in range(clean_per_class)]
  write_csv(root / isic2020.TRAIN_CSV, [','.join(isic2020.COLUMNS), *ISIC2020_ROWS, *(
      f'ISIC_{i:07d},IP_{i},male,40.0,torso,{name},x,{int(name == "melanoma")}'
      for i, name in clean)])
  for i, _ in clean:
    jpeg(root / 'jpeg' / 'train' / f'ISIC_{i:07d}.jpg', seed=i)
  for i in range(1, 11):
    jpeg(root / 'jpeg' / 'train' / f'ISIC_{1000 + i:07d}.jpg', seed=i)
  (root / 'train').mkdir()
  (root / 'train' / 'ISIC_0001001.dcm').write_bytes(b'DICM')  # Kaggle's DICOM copies: not read.
  write_csv(root / isic2020.DUPLICATES_CSV, ['image_name_1,image_name_2',
                                             'ISIC_0001008,ISIC_0001007',
                                             'ISIC_0001007,ISIC_0001002'])
  return root


def write_downloads(folder: pathlib.Path) -> pathlib.Path:
  """All three side by side, as one `manual_dir` for every builder, big enough to train."""
  write_ham10000(folder)
  write_isic2019(folder, clean_per_class=3)
  write_isic2020(folder, clean_per_class=3)
  return folder


if __name__ == '__main__':
  print(write_downloads(pathlib.Path(sys.argv[1])))
