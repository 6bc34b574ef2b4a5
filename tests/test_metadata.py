"""The metadata branch: encoding, joining any model's pre-head features, feature dropout, CSVs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax import errors
from melanoma_jax import metadata
from melanoma_jax import models
from melanoma_jax.datasets import vocabulary


def test_encode_marks_unknown_values():
  encoded = metadata.encode([55.0, -1.0], ['male', ''], ['torso', ''])
  assert encoded.shape == (2, metadata.NUM_FEATURES)
  sites = list(vocabulary.SITES)
  expected = np.zeros((2, metadata.NUM_FEATURES), np.float32)
  expected[0, [0, 3, 5 + sites.index('torso')]] = [0.55, 1, 1]  # age, male, torso.
  expected[1, [1, 4, 5 + len(sites)]] = 1  # age, sex and site unknown.
  np.testing.assert_allclose(encoded, expected)
  np.testing.assert_array_equal(metadata.unknown(1)[0], expected[1])


@pytest.fixture(scope='module')
def seed_and_joined():
  backbone = models.SeedCNN(num_classes=3, dropout_rate=0.0)
  joined = metadata.MetadataModel(backbone, num_classes=3, feature_dropout=1.0)
  images = jax.random.randint(jax.random.key(1), (2, 32, 32, 3), 0, 256).astype(jnp.uint8)
  return backbone, joined, images


def test_branch_sees_exactly_what_the_backbone_head_sees(seed_and_joined):
  """With the metadata rows of the head zeroed, the joined model is the backbone."""
  backbone, joined, images = seed_and_joined
  reference = backbone.init(jax.random.key(0), images, train=False)
  variables = joined.init(jax.random.key(2), images, train=False)
  assert 'head' not in variables['params']['image_model']  # The backbone's own head is unused.
  params = dict(variables['params'])
  params['image_model'] = {k: v for k, v in reference['params'].items() if k != 'head'}
  kernel = np.zeros_like(params['head']['kernel'])
  kernel[:512] = reference['params']['head']['kernel']
  params['head'] = {'kernel': kernel, 'bias': reference['params']['head']['bias']}
  stats = {'image_model': reference['batch_stats']}
  expected = backbone.apply(reference, images, train=False)
  encoded = jnp.asarray(metadata.encode([30.0, 70.0], ['female', 'male'], ['torso', '']))
  got = joined.apply({'params': params, 'batch_stats': stats}, images, encoded, train=False)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_feature_dropout_hides_metadata_in_training_only(seed_and_joined):
  _, joined, images = seed_and_joined
  variables = joined.init(jax.random.key(2), images, train=False)
  encoded = jnp.asarray(metadata.encode([30.0, 70.0], ['female', 'male'], ['torso', '']))
  run = lambda meta, train: joined.apply(variables, images, meta, train=train,
                                         rngs={'dropout': jax.random.key(3)},
                                         mutable=['batch_stats'])[0]
  np.testing.assert_allclose(run(encoded, True), run(None, True), atol=1e-6)  # p = 1: all hidden.
  assert not np.allclose(run(encoded, False), run(None, False), atol=1e-4)


def test_read_csv(tmp_path):
  path = tmp_path / 'metadata.csv'
  path.write_text('image_id,age,sex,localization\nISIC_1,45,female,back\nISIC_2,,,\n')
  encoded = metadata.read_csv(path)
  np.testing.assert_array_equal(encoded['ISIC_1'], metadata.encode([45.0], ['female'], ['torso'])[0])
  np.testing.assert_array_equal(encoded['ISIC_2'], metadata.unknown(1)[0])
  path.write_text('image,sex\nISIC_1,robot\n')
  with pytest.raises(errors.DatasetLayoutError, match="line 2: unknown sex 'robot'"):
    metadata.read_csv(path)
