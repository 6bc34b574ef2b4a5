"""The scale mode's dataset and config (`python -m benchmarks.input_pipeline --scale=...`).

A config file for launch.py too, so that the scale mode's training phase is
the real training command on the generated dataset:

  python launch.py --config=benchmarks/scale_config.py:512 --config.manual_dir=TREE \
      --config.data_dir=DIR --workdir=RUN

Importing it registers `image_folder_scale`, which launch.py does not know.
"""

import ml_collections

from configs import balanced
from melanoma_jax import datasets
from melanoma_jax.datasets import preparation, user_folder


class ImageFolderScale(user_folder.ImageFolder):
  """image_folder, with the stored sizes scale mode prepares at."""

  BUILDER_CONFIGS = [preparation.FolderConfig(name=f'{size}px', image_size=size)
                     for size in (64, 256, 384, 512, 768)]


datasets.BUILDERS.setdefault('image_folder_scale', ImageFolderScale)


def get_config(stored_size: str = '512') -> ml_collections.ConfigDict:
  """configs/balanced.py on image_folder_scale stored at `stored_size` px, streamed."""
  config = balanced.get_config()
  config.dataset = f'image_folder_scale/{stored_size}px'
  config.streaming = True
  return config
