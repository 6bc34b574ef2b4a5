"""Out-of-distribution refusal: scores against direct computations, and a trained model that
refuses photographs that are not lesions while passing the Test lesions."""

import csv
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import special
from scipy.spatial import distance
from sklearn import covariance as sk_covariance, datasets as sk_datasets

from melanoma_jax import calibration, clinical_report, inference, ood, steps, train


class _OtherModel(nn.Module):
  """Any architecture: the classifier is a Dense named `head`."""

  @nn.compact
  def __call__(self, images, *, train):
    del train
    x = nn.Dense(6, name='body')(jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255)
    return nn.Dense(3, name='head')(jnp.tanh(x))


class _Headless(nn.Module):

  @nn.compact
  def __call__(self, images, *, train):
    del train
    return nn.Dense(3, name='classifier')(jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1))


def _state(model):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3), jnp.uint8), train=False)
  return steps.TrainState(step=jnp.asarray(0), params=variables['params'], model_state={},
                          opt_state=None, rng=None, model=model, tx=None)


def test_features_are_the_input_of_any_models_head():
  state = _state(_OtherModel())
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), np.uint8)
  features, logits = jax.jit(ood.features_and_logits)(state, images)
  params = state.params
  hidden = np.tanh(images.reshape(5, -1) / 255 @ params['body']['kernel'] + params['body']['bias'])
  np.testing.assert_allclose(features, hidden, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, hidden @ params['head']['kernel'] + params['head']['bias'],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no Dense layer named 'head'"):
    ood.features_and_logits(_state(_Headless()), images)


def test_scores_and_shrinkage_match_direct_computations():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(60, 8)) * rng.random(8) * 3
  labels = rng.integers(0, 3, 60)
  means, precision = ood.fit_class_gaussians(features, labels)
  centred = features - means[labels]
  expected = sk_covariance.ledoit_wolf(centred, assume_centered=True)[0]
  np.testing.assert_allclose(ood.ledoit_wolf(centred), expected, rtol=1e-10)
  np.testing.assert_allclose(np.linalg.inv(precision), expected, rtol=1e-5)
  queries = rng.normal(size=(4, 8)) * 2
  direct = [min(distance.mahalanobis(q, m, precision) ** 2 for m in means) for q in queries]
  np.testing.assert_allclose(ood.mahalanobis(queries, means, precision), direct, rtol=1e-4)
  logits = rng.normal(size=(4, 3))
  np.testing.assert_allclose(ood.energy(jnp.asarray(logits)), -special.logsumexp(logits, axis=1), rtol=1e-6)
  np.testing.assert_allclose(ood.energy(jnp.asarray(logits[:, :1])),
                             -np.logaddexp(0, logits[:, 0]), rtol=1e-6)  # 1-unit head: [0, z]


@pytest.mark.parametrize('n', [20, 46, 101])
def test_threshold_passes_the_fraction_and_no_lower_one_does(n):
  scores = np.random.default_rng(n).normal(size=n)
  for fraction in (0.95, ood.PASS_FRACTION):
    threshold = ood.pass_threshold(scores, fraction)
    assert np.mean(scores <= threshold) >= fraction
    assert np.mean(scores < threshold) < fraction


def _write_photos(folder):
  """scikit-learn's two sample photographs, whole and cropped at two scales: not lesions."""
  folder.mkdir()
  for name, photo in zip(('china', 'flower'), sk_datasets.load_sample_images().images):
    h, w = photo.shape[:2]
    Image.fromarray(photo).save(folder / f'{name}.jpg')
    for side in (h // 2, h // 3):
      for y in (0, h - side):
        for x in (0, (w - side) // 2, w - side):
          Image.fromarray(photo[y:y + side, x:x + side]).save(folder / f'{name}_{side}_{y}_{x}.jpg')


@pytest.fixture(scope='module')
def lesion_run(tiny_config, tmp_path_factory):
  """A model trained on synthetic lesions, with enough validation and Test images to measure rates."""
  workdir = tmp_path_factory.mktemp('ood_run')
  config = tiny_config.copy_and_resolve_references()
  config.dataset = 'synthetic_lesions/small'
  config.val_fraction = 0.3
  config.batch_size = 16
  config.num_epochs = 3
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_photographs_are_refused_and_test_lesions_pass(lesion_run, tmp_path):
  report = json.loads((lesion_run / clinical_report.REPORT_JSON).read_text())
  summary = report['out_of_distribution']
  assert summary['method'] == 'mahalanobis'
  assert summary['val_pass_rate'] >= 0.95
  assert summary['test_pass_rate'] >= 0.90
  _write_photos(tmp_path / 'photos')
  output = tmp_path / 'preds.csv'
  inference.main(['--workdir', str(lesion_run), '--output', str(output), '--threshold', '0',
                  str(tmp_path / 'photos')])
  with output.open() as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 26
  for row in rows:
    assert row['in_distribution'] == 'no', row
    assert row['melanoma_alert'] == '' and 'no melanoma alert' in row['refused']  # even at threshold 0
    assert float(row['ood_score']) > ood.read(lesion_run)['threshold']


def test_inference_applies_the_runs_temperature(lesion_run, tmp_path):
  stored = calibration.read(lesion_run)
  assert stored == json.loads((lesion_run / clinical_report.REPORT_JSON).read_text())['calibration']
  image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  output = tmp_path / 'preds.csv'
  inference.main(['--workdir', str(lesion_run), '--output', str(output), '--json', str(tmp_path / 'x.png')])
  row = json.loads(output.with_suffix('.json').read_text())['predictions'][0]
  state, config, meta = train.restore_for_inference(str(lesion_run))
  [(_, raw, _, _)] = inference.predict_files(state, [tmp_path / 'x.png'], config.image_size)
  expected = special.softmax(np.log(raw) / stored['temperature'])
  np.testing.assert_allclose([row['probabilities'][c] for c in meta['class_names']], expected, rtol=1e-4)

