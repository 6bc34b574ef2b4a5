"""Generated JPEG trees for the benchmarks, in the ISIC archive's image_folder layout.

Kept apart from the benchmarks' flag definitions so that any benchmark can
import them.
"""

import os
import pathlib

import numpy as np
from PIL import Image

from melanoma_jax.datasets import ISIC_CLASSES, synthetic_lesions

FIXTURE_SIZE = (600, 450)  # (width, height) of the ISIC archive's JPEGs.


def write_fixture_tree(root: str, per_class: int) -> None:
  """Writes smooth, noisy JPEGs in the archive's Train/Test class layout.

  Smooth colour fields plus sensor-like noise compress like photographs, so
  decoding costs about what real dermoscopy JPEGs cost.
  """
  rng = np.random.default_rng(0)
  width, height = FIXTURE_SIZE
  for split, count in (('Train', per_class), ('Test', 2)):
    for class_name in ISIC_CLASSES:
      folder = pathlib.Path(root) / split / class_name
      folder.mkdir(parents=True)
      for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(FIXTURE_SIZE, Image.Resampling.BICUBIC), np.int16)
        noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(
            folder / f'ISIC_{i:07d}.jpg', quality=90)


def write_lesion_jpegs(folder: str, count: int) -> list[str]:
  """`count` FIXTURE_SIZE synthetic lesion JPEGs in `folder` (rendered small, enlarged, with sensor noise)."""
  paths = []
  for i in range(count):
    rng = np.random.default_rng(i)
    lesion = synthetic_lesions.render_lesion(rng, ISIC_CLASSES[i % len(ISIC_CLASSES)], 160)
    large = np.asarray(Image.fromarray(lesion).resize(FIXTURE_SIZE, Image.Resampling.BICUBIC))
    noisy = np.clip(large + rng.normal(0, 3, large.shape), 0, 255).astype(np.uint8)
    paths.append(os.path.join(folder, f'ISIC_{i:07d}.jpg'))
    Image.fromarray(noisy).save(paths[-1], quality=90)
  return paths


def write_scale_tree(root: str, count: int, size: int, distinct: int) -> None:
  """`count` Train JPEGs of `size` px (plus a small Test) over the 9 classes, cheaply.

  Each class has `distinct` generated images; the files are hard links to
  them under different names, so the tree costs little disk while
  preparation still decodes, resizes and stores every file.
  """
  rng = np.random.default_rng(0)
  sources = pathlib.Path(root) / 'sources'
  sources.mkdir(parents=True)
  for split, total in (('Train', count), ('Test', 2 * len(ISIC_CLASSES))):
    for c, class_name in enumerate(ISIC_CLASSES):
      folder = pathlib.Path(root) / 'tree' / split / class_name
      folder.mkdir(parents=True)
      for i in range(total // len(ISIC_CLASSES) + (c < total % len(ISIC_CLASSES))):
        source = sources / f'{class_name}_{i % distinct}.jpg'
        if not source.exists():
          coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
          smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
          noise = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
          Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(source, quality=90)
        os.link(source, folder / f'{split}_{class_name}_{i:06d}.jpg')
