"""The layer table: Keras' own for the seed model, and exact for any flax module."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax import model_summary, models


def _rows(table):
  """(name, output shape, params) of each layer row."""
  lines = table.splitlines()
  first, second = [i for i, line in enumerate(lines) if set(line) == {'='}]
  body = lines[first + 1:second]
  return [re.match(r' (.+? \(\S+\))\s+(\(.*?\)|\?)\s+([\d,]+)$', row).groups() for row in body]


def _totals(table):
  return [int(n.replace(',', '')) for n in re.findall(r'params: ([\d,]+)', table)]


@pytest.mark.parametrize('num_classes', [9, 1])
def test_seed_model_table_is_keras_model_summary(num_classes):
  keras = pytest.importorskip('keras')
  layers = keras.layers
  reference = keras.Sequential([
      keras.Input((180, 180, 3)), layers.Rescaling(1 / 255),
      layers.Conv2D(32, 3, activation='relu'), layers.Conv2D(32, 3, activation='relu'),
      layers.MaxPooling2D(), layers.Conv2D(64, 3, activation='relu'), layers.BatchNormalization(),
      layers.MaxPooling2D(), layers.Conv2D(128, 3, activation='relu'), layers.BatchNormalization(),
      layers.MaxPooling2D(), layers.Flatten(), layers.Dense(512, activation='relu'),
      layers.Dropout(0.5), layers.Dense(num_classes)])
  table = model_summary.layer_table(models.SeedCNN(num_classes), (180, 180, 3), train=False)
  ours = [(shape, params) for _, shape, params in _rows(table) if params != '0']
  theirs = [(str(tuple(layer.output.shape)), f'{layer.count_params():,}') for layer in reference.layers
            if layer.count_params()]
  assert ours == theirs
  trainable = sum(int(np.prod(w.shape)) for w in reference.trainable_weights)
  assert _totals(table) == [reference.count_params(), trainable, reference.count_params() - trainable]
  assert _totals(table)[0] == {9: 26_322_793, 1: 26_318_689}[num_classes]


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(6)(x)))


class _Net(nn.Module):
  """Nested blocks, a module called twice, and a variable of the top module itself."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(4, name='shared')
    x = shared(_Block(name='block1')(x.reshape(x.shape[0], -1)))
    x = shared(_Block(name='block2')(x))
    return x * self.param('scale', nn.initializers.ones, ())


def test_any_module_rows_add_up_to_its_variables():
  table = model_summary.layer_table(_Net(), (3, 5), input_dtype=jnp.float32)
  rows = _rows(table)
  assert [name for name, _, _ in rows] == [
      'block1 (_Block)', 'block1/Dense_0 (Dense)', 'block1/BatchNorm_0 (BatchNorm)', 'shared (Dense)',
      'block2 (_Block)', 'block2/Dense_0 (Dense)', 'block2/BatchNorm_0 (BatchNorm)', 'shared (Dense)',
      '(top) (_Net)']
  assert rows[3][1:] == ('(None, 4)', '28') and rows[7][1:] == ('(None, 4)', '0')
  variables = jax.eval_shape(lambda: _Net().init(jax.random.key(0), jnp.zeros((1, 3, 5))))
  total = sum(x.size for x in jax.tree.leaves(variables))
  trainable = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert sum(int(p.replace(',', '')) for _, _, p in rows) == total
  assert _totals(table) == [total, trainable, total - trainable]
