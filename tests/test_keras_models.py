"""The benchmarks compare like with like: their Keras seed model is ours, layer for layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import pytest

from benchmarks import keras_models
from melanoma_jax import models


@pytest.mark.parametrize('size,classes', [(64, 9), (40, 1)])
def test_keras_seed_model_has_our_parameter_count(size, classes):
  keras_model = keras_models.MODELS['seed_cnn'](keras, (size, size, 3), classes)
  variables = jax.eval_shape(lambda: models.SeedCNN(num_classes=classes).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8), train=False))
  ours = sum(leaf.size for leaf in jax.tree.leaves(variables))
  assert keras_model.count_params() == ours


def test_conv_benchmark_times_the_seed_models_convolutions():
  """benchmarks/conv_layers.py times each convolution of the seed model at its input shape."""
  from benchmarks import conv_layers  # pylint: disable=g-import-not-at-top
  seen = []

  def record(next_fun, args, kwargs, context):
    # nn.Conv, or its fused form with the ReLU (oneDNN), named as nn.Conv would be.
    if (context.module.name or '').startswith('conv') and context.method_name == '__call__':
      seen.append((context.module.name, args[0].shape[1], args[0].shape[3], context.module.features))
    return next_fun(*args, **kwargs)

  for size in (180, 64):
    seen.clear()
    with nn.intercept_methods(record):
      jax.eval_shape(lambda: models.SeedCNN(num_classes=9).init(  # pylint: disable=cell-var-from-loop
          jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8), train=False))
    assert seen == conv_layers._layers(size)  # pylint: disable=protected-access
