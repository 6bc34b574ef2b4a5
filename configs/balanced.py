"""The course's final recipe: class balancing + augmentation + reduce-on-plateau.

Balancing samples every class equally often on the fly (no copies written to
disk, so no copy of a validation image can reach training), and the learning
rate halves when the validation loss stalls.

  python launch.py --config=configs/balanced.py --workdir=runs/balanced
  python launch.py --config=configs/balanced.py:synthetic --workdir=runs/balanced_synthetic
"""

import ml_collections
from configs import augmented


def get_config(variant: str = 'isic') -> ml_collections.ConfigDict:
  config = augmented.get_config(variant)
  config.balance_classes = True
  config.plateau.enabled = True
  return config
