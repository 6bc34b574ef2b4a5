"""The seed model matches the Keras original and its head matches the labels."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from melanoma_jax import models, train


def _count(num_classes, size=180):
  variables = jax.eval_shape(lambda: models.SeedCNN(num_classes).init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.uint8), train=False))
  return sum(x.size for x in jax.tree.leaves(variables))


def test_parameter_counts_match_keras():
  assert _count(1) == 26_318_689
  assert _count(9) == 26_322_793


def test_rescales_inside():
  model = models.SeedCNN(num_classes=3, dropout_rate=0.0)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  variables = model.init(jax.random.key(0), images, train=False)
  as_uint8 = model.apply(variables, images, train=False)
  as_float = model.apply(variables, images.astype(np.float32), train=False)
  np.testing.assert_allclose(as_uint8, as_float, rtol=1e-6)
  assert as_uint8.shape == (2, 3)


@pytest.mark.parametrize('task,num_classes,expected', [
    ('multiclass', 9, 9), ('melanoma_vs_rest', 2, 1)])
def test_head_follows_the_label_space(task, num_classes, expected):
  config = default.get_config('synthetic')
  config.task = task
  assert train.num_outputs(config, num_classes) == expected


@pytest.mark.parametrize('requested,num_classes', [(1, 9), (9, 2), (5, 9)])
def test_mismatched_head_is_refused(requested, num_classes):
  config = default.get_config('synthetic')
  config.model.num_outputs = requested
  with pytest.raises(train.ConfigError, match='cannot match'):
    train.num_outputs(config, num_classes)
