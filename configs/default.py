"""Defaults shared by every experiment; the experiment files override a few.

Not an experiment itself: run `configs/baseline.py`, `configs/augmented.py`
or `configs/balanced.py`. Each takes a dataset variant after a colon:
`isic` (the default: the 9-class ISIC archive, prepared from `manual_dir`)
or `synthetic` (the bundled procedural dataset, smaller images for a CPU).
"""

import ml_collections
from ml_collections import config_dict

DATASET_VARIANTS = ('isic', 'synthetic')


def get_config(variant: str = 'isic') -> ml_collections.ConfigDict:
  """The course's first model (no augmentation, no balancing, constant LR)."""
  if variant not in DATASET_VARIANTS:
    raise ValueError(f'Unknown dataset variant {variant!r}; choose one of {DATASET_VARIANTS}, '
                     'e.g. --config=configs/balanced.py:synthetic')
  config = ml_collections.ConfigDict()

  # Data. `dataset` is a TFDS name, optionally with a builder config
  # ('synthetic_lesions/tiny'); `data_dir` holds prepared datasets (TFDS'
  # default when unset); `manual_dir` holds a manual download.
  config.dataset = 'isic_skin_cancer'
  config.data_dir = config_dict.placeholder(str)
  config.manual_dir = config_dict.placeholder(str)
  # Optional CSV mapping image file names to lesion_id or patient_id: the
  # train/validation split then keeps each lesion or patient on one side.
  config.groups_csv = config_dict.placeholder(str)
  config.task = 'multiclass'  # or 'melanoma_vs_rest' (1-unit sigmoid head)
  config.image_size = 180
  # Images held in memory (False) or read from the prepared files on the fly
  # (True: host memory does not grow with the dataset); None streams
  # datasets too large for memory. Batches are the same either way.
  config.streaming = config_dict.placeholder(bool)
  config.val_fraction = 0.2
  # Datasets published without test labels (isic2019, isic2020, ham10000
  # without the ISIC 2018 test set) carve Test from train, by group.
  config.test_fraction = 0.15
  # Several datasets combine with '+' ('isic2019+isic2020'): labels in the
  # common vocabulary, classes their union. Each training example is drawn
  # from a source with these weights ('isic2019:1,isic2020:0.5'); '' draws
  # from the union as one dataset.
  config.source_weights = ''
  # Grouped, stratified k-fold cross-validation: with num_folds=K (>= 2),
  # validation is fold `fold` (0..K-1) of Train instead of val_fraction of
  # it; `launch.py --all_folds` trains every fold. 0: no folds.
  config.num_folds = 0
  config.fold = 0
  config.balance_classes = False

  # What preparation does to each image file before storing it, and
  # prediction to each new file (melanoma_jax.preprocessing): crop_border
  # crops a dermoscope's dark circular border to the lit field;
  # color_constancy is Shades-of-Gray with Minkowski norm shades_of_gray_p (6,
  # as the ISIC 2019 and 2020 winners); aspect makes the stored square by
  # 'squash' (stretch), 'center_crop' (cut the long side) or 'pad' (black
  # bars). Other options prepare the dataset anew, in a folder of their own.
  config.preprocess = ml_collections.ConfigDict()
  config.preprocess.crop_border = False
  config.preprocess.color_constancy = False
  config.preprocess.shades_of_gray_p = 6
  config.preprocess.aspect = 'squash'

  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = False
  config.augment.flips = True          # both axes: lesions have no orientation
  config.augment.rotation_degrees = 180.0  # +- this; 180 is the full circle
  config.augment.zoom = 0.1            # scale in [1 - zoom, 1 + zoom]
  config.augment.brightness = 0.05     # +- added, images in [0, 1]
  config.augment.contrast = 0.1        # factor in [1 - x, 1 + x]
  config.augment.saturation = 0.1      # factor in [1 - x, 1 + x]
  config.augment.hue = 0.02            # +- fraction of the hue circle

  # The model: a name in melanoma_jax.models.MODELS, the fields every model
  # reads (num_outputs, dropout_rate, bn_momentum, dtype, init_from) and the
  # fields of particular models (conv_impl: seed_cnn's).
  config.model = ml_collections.ConfigDict()
  config.model.name = 'seed_cnn'
  # A weight file to start from (head replaced for the dataset's classes),
  # e.g. a timm ResNet .safetensors; resuming a checkpoint wins over it.
  config.model.init_from = config_dict.placeholder(str)
  config.model.num_outputs = config_dict.placeholder(int)  # None: from task
  config.model.dropout_rate = 0.5
  # None: the model's own choice; seed_cnn derives it from steps per epoch so
  # evaluation statistics track the weights (models.seed_cnn.derive_bn_momentum;
  # Keras' default would be 0.99).
  config.model.bn_momentum = config_dict.placeholder(float)
  # How convolutions and poolings are lowered: 'auto' picks the fastest for
  # the platform; 'native', 'padded' and 'mixed' compute the same function
  # with the same parameters, so checkpoints move between them.
  config.model.conv_impl = 'auto'
  # Compute dtype. 'bfloat16' is mixed precision for GPU and TPU: parameters,
  # optimizer state and the loss stay float32. Slow on most CPUs.
  config.model.dtype = 'float32'
  # Age, sex and anatomical site joined to the image features (datasets that
  # have them: ham10000, isic2019, isic2020; unknown elsewhere). In training
  # an example's metadata is hidden with probability metadata_dropout.
  config.model.metadata = False
  config.model.metadata_dropout = 0.3

  # Optimisation. batch_size is global: split evenly over all devices.
  config.batch_size = 32
  config.num_epochs = 20
  config.optimizer = 'adam'  # or 'adamw' (with weight_decay), 'sgd' (with momentum)
  config.learning_rate = 1e-3
  config.momentum = 0.9  # sgd only
  config.weight_decay = 0.0  # adamw only; not on biases and normalisation scales
  config.seed = 123

  # Learning rate by step: 'constant', or 'warmup_cosine' (linear warmup from
  # 0 over warmup_epochs, then cosine decay to final_fraction x the rate).
  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'constant'
  config.schedule.warmup_epochs = 0.0
  config.schedule.final_fraction = 0.0

  # Everything but the head: lr_multiplier x the learning rate, and none for
  # the first frozen_epochs (fine-tuning a pretrained model).
  config.backbone = ml_collections.ConfigDict()
  config.backbone.lr_multiplier = 1.0
  config.backbone.frozen_epochs = 0

  # Training loss: 'cross_entropy', 'weighted_cross_entropy' (inverse class
  # frequency of the training split) or 'focal' (focal_gamma). Validation and
  # Test losses are always plain cross-entropy.
  config.loss = ml_collections.ConfigDict()
  config.loss.name = 'cross_entropy'
  config.loss.label_smoothing = 0.0
  config.loss.focal_gamma = 2.0

  # Keras ReduceLROnPlateau(monitor='val_loss') semantics, once per epoch.
  config.plateau = ml_collections.ConfigDict()
  config.plateau.enabled = False
  config.plateau.factor = 0.5
  config.plateau.patience = 3
  config.plateau.min_delta = 1e-4
  config.plateau.cooldown = 0
  config.plateau.min_lr = 1e-5

  # The melanoma alert threshold is the highest on p(melanoma) that still
  # catches this fraction of validation melanomas; reported on Test.
  config.target_sensitivity = 0.90

  config.log_every_steps = 20
  config.checkpoints_to_keep = 3
  # Also checkpoint every N steps within an epoch (0: only at epoch ends and
  # on SIGTERM). A resumed run continues exactly where the checkpoint was.
  config.checkpoint_every_steps = 0
  # A non-finite loss or gradient stops the run (False) or skips the step.
  config.skip_nonfinite_steps = False

  if variant == 'synthetic':
    config.dataset = 'synthetic_lesions'
    config.image_size = 64
  return config
