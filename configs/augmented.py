"""The baseline plus on-the-fly augmentation (flips, full-circle rotation, zoom).

  python launch.py --config=configs/augmented.py --workdir=runs/augmented
  python launch.py --config=configs/augmented.py:synthetic --workdir=runs/augmented_synthetic
"""

import ml_collections
from configs import default


def get_config(variant: str = 'isic') -> ml_collections.ConfigDict:
  config = default.get_config(variant)
  config.augment.enabled = True
  return config
