"""Fine-tune an ImageNet-pretrained backbone (EfficientNet-B0 by default).

  python launch.py --config=configs/finetune.py --workdir=runs/finetune \
      --config.model.init_from=weights/efficientnetb0.h5
  python launch.py --config=configs/finetune.py --config.model.name=resnet50 \
      --config.model.init_from=weights/resnet50.safetensors --workdir=runs/finetune_r50
  python launch.py --config=configs/finetune.py:synthetic --config.model.name=resnet18 --workdir=runs/r18

The head is replaced for the dataset's classes and trained alone for the
first epoch (the backbone frozen), then everything trains under AdamW with a
linear warmup and cosine decay, label smoothing, class balancing and
augmentation. `:synthetic` starts from random weights (no file needed).
"""

import ml_collections
from configs import augmented


def get_config(variant: str = 'isic') -> ml_collections.ConfigDict:
  config = augmented.get_config(variant)
  config.balance_classes = True

  config.model.name = 'efficientnet_b0'
  # Keras applications' own file (see README "Fine-tune a pretrained backbone").
  config.model.init_from = 'weights/efficientnetb0.h5'
  config.model.dropout_rate = 0.2
  config.image_size = 224

  config.optimizer = 'adamw'
  config.learning_rate = 3e-4
  config.weight_decay = 1e-2
  config.num_epochs = 15
  config.schedule.name = 'warmup_cosine'
  config.schedule.warmup_epochs = 2.0
  config.schedule.final_fraction = 0.01
  config.backbone.frozen_epochs = 1
  config.backbone.lr_multiplier = 1.0
  config.loss.label_smoothing = 0.1
  config.plateau.enabled = False  # selectable instead of (or on top of) the schedule

  if variant == 'synthetic':
    config.model.init_from = None
    config.image_size = 64
    config.num_epochs = 3
  return config
