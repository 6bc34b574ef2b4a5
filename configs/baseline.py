"""The course's first model: no augmentation, no class balancing, constant LR.

  python launch.py --config=configs/baseline.py --workdir=runs/baseline
  python launch.py --config=configs/baseline.py:synthetic --workdir=runs/baseline_synthetic
"""

import ml_collections
from configs import default


def get_config(variant: str = 'isic') -> ml_collections.ConfigDict:
  return default.get_config(variant)
