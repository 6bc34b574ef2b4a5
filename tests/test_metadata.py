"""The metadata branch: encoding, joining any model's pre-head features, feature dropout, CSVs."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import default
from melanoma_jax import ensemble, errors, metadata, preprocessing, steps, train
from melanoma_jax import models
from melanoma_jax.models import resnet, weight_files
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


RESNET_FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'resnet18_w4.safetensors')


def _metadata_config(name: str = 'seed_cnn') -> ml_collections.ConfigDict:
  config = default.get_config('synthetic')
  config.image_size, config.model.name, config.model.metadata = 32, name, True
  return config


def test_init_from_pretrained_fills_the_backbone_of_a_metadata_model(monkeypatch):
  """The joined model with the pretrained head on its image features gives timm's logits."""
  constructor = functools.partial(resnet.ResNet18, widths=(4, 8, 16, 32))
  monkeypatch.setitem(models.MODELS, 'resnet18_w4', resnet.spec(constructor))
  config = _metadata_config('resnet18_w4')
  config.model.init_from = RESNET_FIXTURE
  # A state of zeros, as initialising (compiling) the model would take seconds.
  fresh = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                       jax.eval_shape(lambda: train.build_state(config, 10)))
  state = train._init_from_pretrained(fresh, config)  # pylint: disable=protected-access
  for layer in ('head', 'metadata_dense'):  # New layers keep their initialisation.
    np.testing.assert_array_equal(state.params[layer]['kernel'], fresh.params[layer]['kernel'])
  arrays = weight_files.read_safetensors(RESNET_FIXTURE)
  with np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'resnet18_w4_golden.npz')) as golden:
    images, logits = golden['images'], golden['logits']
  kernel = np.zeros_like(state.params['head']['kernel'])
  kernel[:arrays['fc.weight'].shape[1]] = arrays['fc.weight'].T  # The metadata rows stay 0.
  params = {**state.params, 'head': {'kernel': kernel, 'bias': arrays['fc.bias']}}
  got = state.model.apply({'params': params, **state.model_state}, images,
                          jnp.asarray(metadata.unknown(len(images))), train=False)
  np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)


def test_an_ensemble_passes_each_model_the_metadata(tmp_path, monkeypatch):
  """Inference with an ensemble of metadata models: their probabilities given the CSV's metadata."""
  config = _metadata_config()
  state = train.build_state(config, 3)
  states = [state, state.replace(params=jax.tree.map(lambda x: x * 1.5, state.params))]
  runs = {f'run{i}': state for i, state in enumerate(states)}
  monkeypatch.setattr(train, 'restore_for_inference', lambda workdir, step: (
      runs[workdir], config, {'stored_image_size': 48}))
  files = []
  for i in range(2):
    files.append(tmp_path / f'ISIC_{i}.png')
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), np.uint8)).save(files[-1])
  encoded = metadata.encode([30.0, 80.0], ['female', 'male'], ['torso', 'head/neck'])
  description = {'models': [{'workdir': w, 'step': 0, 'run': w} for w in runs],
                 'combine': 'mean', 'tta': False}
  given = ensemble.predict_files(description, files, batch_size=4,
                                 metadata={f'ISIC_{i}': encoded[i] for i in range(2)})
  pixels = np.stack([preprocessing.model_input(f, 48, 32) for f in files])
  expected = np.mean([steps.predict(s, pixels, encoded) for s in states], axis=0)
  np.testing.assert_allclose(np.stack([scores for _, scores, _ in given]), expected, atol=1e-6)
  unknown = np.mean([steps.predict(s, pixels, metadata.unknown(2)) for s in states], axis=0)
  assert not np.allclose(expected, unknown, atol=1e-4)  # The metadata matters to these models.
