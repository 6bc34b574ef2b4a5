"""The seed model: the course project's Keras CNN, with its own config rules."""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from melanoma_jax.models import interface, seed_cnn_lowering as lowering

# Four valid 3x3 convolutions and three 2x2 poolings.
MIN_IMAGE_SIZE = 30


class SeedCNN(interface.Classifier):
  """The course project's Keras CNN, layer for layer.

  Takes uint8 (or [0, 255] float) images and rescales them inside, so a
  caller can never forget the rescaling. Parameter layout matches Keras:
  at 180x180 there are 26,318,689 parameters and statistics with a 1-unit
  head and 26,322,793 with 9 units.

  Attributes (besides `interface.Classifier`'s):
    dropout_rate: dropout before the head; the course project's 0.5 by default.
    bn_momentum: BatchNorm running-statistics momentum; see
      `derive_bn_momentum` for why it is not Keras' 0.99 by default.
    conv_impl: how convolutions and poolings are lowered
      (`seed_cnn_lowering.resolve`); every choice computes the same function
      with the same parameters.
  """
  preprocessing: ClassVar[str] = 'rescale'  # x / 255
  # Grad-CAM's maps (conv4's) sit after two 2x2 poolings, centred: valid
  # convolutions trim the border.
  feature_stride: ClassVar[int] = 4

  dropout_rate: float = 0.5
  bn_momentum: float = 0.99
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = jnp.asarray(images, self.dtype) / 255.0
    conv_relu = lambda features, name: lowering.conv_relu(features, self.conv_impl, self.dtype, name)
    batch_norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=1e-3, axis_name=self.axis_name, dtype=self.dtype, name=name)
    pool = lambda y: lowering.max_pool_2x2(y, self.conv_impl)

    x = conv_relu(32, 'conv1')(x)
    x = pool(conv_relu(32, 'conv2')(x))
    x = conv_relu(64, 'conv3')(x)
    x = pool(batch_norm('bn3')(x))
    x = interface.mark_features(self, conv_relu(128, 'conv4')(x))
    x = pool(batch_norm('bn4')(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(512, dtype=self.dtype, name='dense')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


def derive_bn_momentum(steps_per_epoch: int) -> float:
  """A BatchNorm momentum whose running statistics track the current weights.

  With Keras' 0.99 the running statistics average over ~100 steps; on a
  dataset of a few dozen steps per epoch they still carry the random-init
  statistics after the first epochs, and validation accuracy sits near
  chance while training accuracy climbs. An averaging window of a fifth of
  an epoch forgets the initial values within the first epoch.
  """
  return float(np.clip(1.0 - 5.0 / steps_per_epoch, 0.5, 0.99))


def build(model_config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None) -> SeedCNN:
  """SeedCNN from config.model; BatchNorm momentum derived unless set."""
  default = derive_bn_momentum(steps_per_epoch) if steps_per_epoch else 0.99
  return SeedCNN(num_classes=num_classes, dropout_rate=model_config.dropout_rate,
                 bn_momentum=interface.bn_momentum(model_config, default),
                 dtype=jnp.dtype(model_config.get('dtype', 'float32')),
                 conv_impl=model_config.get('conv_impl', 'auto'))


def check(config: ml_collections.ConfigDict) -> None:
  try:
    lowering.resolve(config.model.get('conv_impl', 'auto'))
  except ValueError as e:
    raise ValueError(f'config.model.conv_impl: {e}') from None
  interface.check_min_image_size(config, MIN_IMAGE_SIZE, 'seed_cnn',
                                 'four valid 3x3 convolutions and three 2x2 poolings')


SPEC = interface.ModelSpec(build=build, check=check)
