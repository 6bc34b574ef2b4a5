"""Flax modules for lesion classification."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from melanoma_jax import layers


class SeedCNN(nn.Module):
  """The course project's Keras CNN, layer for layer.

  Takes uint8 (or [0, 255] float) images and rescales them inside, so a
  caller can never forget the rescaling. Parameter layout matches Keras:
  at 180x180 there are 26,318,689 parameters and statistics with a 1-unit
  head and 26,322,793 with 9 units.

  Attributes:
    num_classes: head units; 1 means a sigmoid (binary) head, >= 2 softmax.
    dropout_rate: dropout before the head.
    bn_momentum: BatchNorm running-statistics momentum; see
      `train.derive_bn_momentum` for why it is not Keras' 0.99 by default.
    axis_name: the device axis BatchNorm averages batch statistics over;
      None outside pmap/shard_map so the same module runs on one device.
    dtype: compute dtype (parameters stay float32).
    conv_impl: how convolutions and poolings are lowered (`layers.resolve`);
      every choice computes the same function with the same parameters.
  """
  num_classes: int
  dropout_rate: float = 0.5
  bn_momentum: float = 0.99
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    x = jnp.asarray(images, self.dtype) / 255.0
    conv = lambda features, name: nn.Conv(
        features, (3, 3), padding='VALID', dtype=self.dtype, name=name,
        conv_general_dilated=layers.conv_general_dilated(self.conv_impl))
    batch_norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=1e-3, axis_name=self.axis_name, dtype=self.dtype, name=name)
    pool = lambda y: layers.max_pool_2x2(y, self.conv_impl)

    x = nn.relu(conv(32, 'conv1')(x))
    x = pool(nn.relu(conv(32, 'conv2')(x)))
    x = nn.relu(conv(64, 'conv3')(x))
    x = pool(batch_norm('bn3')(x))
    x = nn.relu(conv(128, 'conv4')(x))
    x = pool(batch_norm('bn4')(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(512, dtype=self.dtype, name='dense')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)
