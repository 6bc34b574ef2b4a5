"""EfficientNet reproduces Keras' and timm's own forward passes from their weight files."""

import functools
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from melanoma_jax import models
from melanoma_jax.models import efficientnet, keras_h5

FIXTURES = Path(__file__).parent / 'fixtures'
SIZE = 64  # even: Keras' correct_pad takes its asymmetric branch (the timm fixture is odd)


def _max_error(ours, theirs):
  return np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()


def _randomise_batch_norm(model, rng):
  """Moving statistics away from (0, 1), so that a wrong mapping shows in the logits."""
  import keras  # pylint: disable=g-import-not-at-top
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      shape = layer.gamma.shape
      layer.set_weights([rng.uniform(0.5, 1.5, shape), rng.normal(0, 0.1, shape),
                         rng.normal(0, 0.1, shape), rng.uniform(0.5, 1.5, shape)])


def _save(model, directory):
  """The model as a Keras 3 .weights.h5, a legacy weights .h5 (keras.applications' format)
  and a legacy whole-model .h5."""
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  paths = {'weights.h5': directory / 'b0.weights.h5', 'h5': directory / 'b0.h5',
           'model.h5': directory / 'b0_model.h5'}
  model.save_weights(paths['weights.h5'])
  with h5py.File(paths['h5'], 'w') as file:
    legacy_h5_format.save_weights_to_hdf5_group(file, model)
  legacy_h5_format.save_model_to_hdf5(model, paths['model.h5'], include_optimizer=False)
  return paths


@pytest.fixture(scope='module')
def keras_b0(tmp_path_factory):
  """A random Keras EfficientNetB0, its weight files, images and Keras' logits."""
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  model = keras.applications.EfficientNetB0(
      weights=None, input_shape=(SIZE, SIZE, 3), classes=7, classifier_activation=None)
  _randomise_batch_norm(model, rng)
  images = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  logits = np.asarray(model(images.astype(np.float32), training=False))
  return _save(model, tmp_path_factory.mktemp('keras')), images, logits


@functools.cache
def _jitted_apply(num_classes, width, depth):
  model = efficientnet.EfficientNet(num_classes=num_classes, width=width, depth=depth)
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def _forward(variables, images, num_classes, width=1.0, depth=1.0):
  return _jitted_apply(num_classes, width, depth)(variables, images)


@pytest.mark.parametrize('file_format', ['h5', 'weights.h5', 'model.h5'])
def test_keras_logits_equal(keras_b0, file_format):
  paths, images, logits = keras_b0
  module, variables = models.load_pretrained('efficientnet_b0', paths[file_format])
  assert module == efficientnet.EfficientNet(num_classes=7, dropout_rate=0.0)
  assert _max_error(_forward(variables, images, 7), logits) <= 1e-4


def test_keras_imagenet_normalisation(tmp_path, monkeypatch):
  """Keras' ImageNet files store the std as the Normalization variance; Keras adds a Rescaling.

  A reduced network keeps it fast: only the input normalisation is at stake.
  """
  import keras  # pylint: disable=g-import-not-at-top
  from keras.src.applications import efficientnet as keras_efficientnet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  width, depth = 0.25, 0.5
  source = keras_efficientnet.EfficientNet(width, depth, SIZE, weights=None,
                                           input_shape=(SIZE, SIZE, 3))
  _randomise_batch_norm(source, rng)
  normalization = [layer for layer in source.layers
                   if isinstance(layer, keras.layers.Normalization)]
  normalization[0].set_weights([np.array(efficientnet.IMAGENET_MEAN),
                                np.array(efficientnet.IMAGENET_STD), np.array(0)])
  path = _save(source, tmp_path)['h5']
  # keras.applications with weights='imagenet', reading our file instead of downloading.
  monkeypatch.setattr(keras_efficientnet.file_utils, 'get_file', lambda *args, **kwargs: path)
  imagenet = keras_efficientnet.EfficientNet(
      width, depth, SIZE, weights='imagenet', weights_name='b0', classifier_activation=None)
  images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  logits = np.asarray(imagenet(images.astype(np.float32), training=False))
  variables = efficientnet.convert_keras(keras_h5.read_keras_h5(path))
  np.testing.assert_allclose(variables['batch_stats']['input_std'], efficientnet.IMAGENET_STD,
                             rtol=1e-6)
  assert _max_error(_forward(variables, images, 1000, width, depth), logits) <= 1e-4


def test_timm_golden_logits_equal():
  """A reduced tf_efficientnet_b0 (scripts/make_golden_efficientnet.py) against timm's logits."""
  golden = np.load(FIXTURES / 'tf_efficientnet_reduced_golden.npz')
  arrays = safetensors.numpy.load_file(FIXTURES / 'tf_efficientnet_reduced.safetensors')
  coefficients = float(golden['width']), float(golden['depth'])
  variables = efficientnet.convert_timm(arrays, coefficients=coefficients)
  logits = _forward(variables, golden['images'], golden['logits'].shape[1], *coefficients)
  assert _max_error(logits, golden['logits']) <= 1e-4


@pytest.mark.parametrize('size,expected', [
    ('b0', 5_288_548), ('b1', 7_794_184), ('b2', 9_109_994), ('b3', 12_233_232)])
def test_parameter_counts_match_timm_and_keras(size, expected):
  """timm tf_efficientnet_b* parameters == Keras EfficientNetB* trainable weights, 1000 classes."""
  width, depth, image_size = efficientnet.SIZES[size]
  model = efficientnet.EfficientNet(num_classes=1000, width=width, depth=depth)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3), jnp.uint8), train=False))
  assert sum(x.size for x in jax.tree.leaves(variables['params'])) == expected


def test_bad_timm_tensors_are_named():
  arrays = safetensors.numpy.load_file(FIXTURES / 'tf_efficientnet_reduced.safetensors')
  with pytest.raises(ValueError, match='unexpected tensor blocks.0.0.conv_extra.weight'):
    efficientnet.convert_timm({**arrays, 'blocks.0.0.conv_extra.weight': np.zeros((1,))})
  bad = {**arrays, 'conv_stem.weight': arrays['conv_stem.weight'][0]}
  with pytest.raises(ValueError, match=r'conv_stem.weight has shape \(3, 3, 3\)'):
    efficientnet.convert_timm(bad)
  # The reduced fixture is not a B0: its first mismatch is named.
  with pytest.raises(ValueError, match=r'blocks.0.0.bn1.running_mean has shape \(8,\) .*needs \(32,\)'):
    models.load_pretrained('efficientnet_b0', FIXTURES / 'tf_efficientnet_reduced.safetensors')
  coefficients = (0.25, 0.5)
  without = {k: v for k, v in arrays.items() if k != 'blocks.1.0.conv_pw.weight'}
  with pytest.raises(ValueError, match='lack blocks.1.0.conv_pw.weight'):
    efficientnet.convert_timm(without, coefficients=coefficients)
  without = {k: v for k, v in arrays.items() if not k.startswith('blocks.0.0.')}
  with pytest.raises(ValueError, match='lack blocks.0.0.bn1.running_mean'):
    efficientnet.convert_timm(without, coefficients=coefficients)
  extra = {**arrays, **{k.replace('blocks.3.1', 'blocks.3.2'): v
                        for k, v in arrays.items() if k.startswith('blocks.3.1.')}}
  with pytest.raises(ValueError, match='hold blocks.3.2.'):
    efficientnet.convert_timm(extra, coefficients=coefficients)


def test_bad_keras_tensors_are_named(keras_b0):
  arrays = keras_h5.read_keras_h5(keras_b0[0]['weights.h5'])
  with pytest.raises(ValueError, match='unexpected tensor dense_9/0'):
    efficientnet.convert_keras({**arrays, 'dense_9/0': np.zeros((2, 2))})
  without = {k: v for k, v in arrays.items() if k != 'stem_bn/3'}
  with pytest.raises(ValueError, match='missing tensor stem_bn/3'):
    efficientnet.convert_keras(without)


def test_not_a_keras_file_is_refused(tmp_path):
  path = tmp_path / 'x.h5'
  path.write_bytes(b'not hdf5')
  with pytest.raises(ValueError, match='not a readable HDF5'):
    keras_h5.read_keras_h5(path)
  with h5py.File(path, 'w') as file:
    file.create_dataset('x', data=np.zeros(2))
  with pytest.raises(ValueError, match='neither a legacy Keras'):
    keras_h5.read_keras_h5(path)


def test_grad_cam_features_are_the_last_map_before_pooling():
  """d logit_c / d features = head kernel[:, c] / (h * w) everywhere: pooling, then the head."""
  golden = np.load(FIXTURES / 'tf_efficientnet_reduced_golden.npz')
  arrays = safetensors.numpy.load_file(FIXTURES / 'tf_efficientnet_reduced.safetensors')
  variables = efficientnet.convert_timm(arrays)
  model = efficientnet.EfficientNet(num_classes=golden['logits'].shape[1], width=0.25, depth=0.5)
  images = golden['images'][:1]
  _, marked = jax.jit(lambda v: model.apply(v, images, train=False, mutable=[
      'intermediates', 'perturbations']))(variables)
  features = marked['intermediates'][models.FEATURES][0]
  gradient = jax.jit(jax.grad(lambda p: model.apply({**variables, 'perturbations': p}, images,
                                                    train=False)[0, 2]))(marked['perturbations'])
  h, w = features.shape[1:3]
  assert (h, w) == (2, 2)  # 57 px / 32, rounded up by "same" padding
  expected = np.broadcast_to(variables['params']['head']['kernel'][:, 2] / (h * w), features.shape)
  np.testing.assert_allclose(gradient[models.FEATURES], expected, rtol=1e-5, atol=1e-8)
