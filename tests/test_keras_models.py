"""The benchmarks compare like with like: their Keras seed model is ours, layer for layer."""

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
