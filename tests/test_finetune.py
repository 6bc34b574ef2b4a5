"""Fine-tuning: schedule, frozen / slower backbone, AdamW's decay mask, init_from and Grad-CAM."""

import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from melanoma_jax import models, optim, saliency, steps, train
from melanoma_jax.errors import ConfigError
from melanoma_jax.models import resnet, weight_files

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'resnet18_w4.safetensors')


def _config(**overrides):
  config = default.get_config('synthetic')
  config.num_epochs = 4
  config.learning_rate = 0.1
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for k in path:
      node = node[k]
    node[last] = value
  return config


def test_warmup_cosine_schedule_equals_the_formula():
  config = _config(**{'schedule.name': 'warmup_cosine', 'schedule.warmup_epochs': 1.0,
                      'schedule.final_fraction': 0.1})
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
  for step in (0, 5, 10, 25, 40):
    if step < 10:
      expected = 0.1 * step / 10
    else:
      expected = 0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * (step - 10) / 30))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
  longer = optim.learning_rate_schedule(_config(**{'schedule.name': 'warmup_cosine',
                                                   'schedule.warmup_epochs': 6.0}), 10)
  assert float(longer(20)) == pytest.approx(0.1 * 20 / 40)  # the run only warms up
  with pytest.raises(ConfigError, match='warmup_epochs'):
    optim.learning_rate_schedule(_config(**{'schedule.name': 'warmup_cosine',
                                            'schedule.warmup_epochs': -1.0}), 10)


def _sgd_updates(config, steps_per_epoch, num_steps):
  """SGD (no momentum) updates of unit gradients, step by step: -lr for each parameter."""
  tx = optim.make_optimizer(config, steps_per_epoch)
  params = {'head': {'kernel': jnp.ones((2, 2))}, 'conv': {'kernel': jnp.ones((3, 3))}}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  history = []
  for _ in range(num_steps):
    updates, state = tx.update(grads, state, params)
    history.append({k: float(v['kernel'][0, 0]) for k, v in updates.items()})
  return history


def test_frozen_then_slower_backbone():
  config = _config(optimizer='sgd', momentum=0.0, **{'backbone.frozen_epochs': 1,
                                                     'backbone.lr_multiplier': 0.25})
  history = _sgd_updates(config, steps_per_epoch=2, num_steps=4)
  assert [h['head'] for h in history] == pytest.approx([-0.1] * 4)
  assert [h['conv'] for h in history] == pytest.approx([0.0, 0.0, -0.025, -0.025])


def test_adamw_decays_matrices_not_biases_or_scales():
  config = _config(optimizer='adamw', weight_decay=0.5)
  tx = optim.make_optimizer(config)
  params = {'head': {'kernel': jnp.full((2, 2), 2.0), 'bias': jnp.full((2,), 2.0)}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1 * 0.5 * 2.0)
  np.testing.assert_allclose(updates['head']['bias'], 0.0)


@pytest.fixture
def tiny_resnet(monkeypatch):
  """'resnet18_w4': the golden fixture's reduced-width ResNet-18, registered for these tests."""
  constructor = functools.partial(resnet.ResNet18, widths=(4, 8, 16, 32))
  monkeypatch.setitem(models.MODELS, 'resnet18_w4', resnet.spec(constructor))
  return 'resnet18_w4'


def test_init_from_keeps_backbone_replaces_head_and_resume_wins(tiny_config, tiny_resnet, tmp_path):
  config = ml_collections.ConfigDict(tiny_config.to_dict())
  weights = tmp_path / 'weights.safetensors'
  shutil.copy(FIXTURE, weights)
  config.model.name, config.model.init_from, config.num_epochs = tiny_resnet, str(weights), 1
  arrays = weight_files.read_safetensors(weights)

  fresh = train.build_state(config, 9)
  state = train._init_from_pretrained(fresh, config)  # pylint: disable=protected-access
  np.testing.assert_array_equal(state.params['layer3_0']['downsample_conv']['kernel'],
                                arrays['layer3.0.downsample.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(state.model_state['batch_stats']['layer4_1']['bn2']['mean'],
                                arrays['layer4.1.bn2.running_mean'])
  np.testing.assert_array_equal(state.params['head']['kernel'], fresh.params['head']['kernel'])
  assert state.params['head']['kernel'].shape == (32, 9)

  workdir = tmp_path / 'run'
  first = train.train_and_evaluate(config, str(workdir))
  weights.unlink()  # resuming (here: only the final evaluation is left) never reads init_from again
  assert train.train_and_evaluate(config, str(workdir))['test_loss'] == pytest.approx(first['test_loss'])
  with pytest.raises(ConfigError, match='init_from=.*not found'):
    train.train_and_evaluate(config, str(tmp_path / 'other_run'))


def test_grad_cam_of_resnet_follows_the_head(tiny_resnet):
  """After global average pooling into a Dense head, the class score's gradient
  at every feature pixel is the head's column over h*w: Grad-CAM is then the
  feature map weighted by that column."""
  del tiny_resnet
  module = resnet.ResNet18(num_classes=3, widths=(4, 8, 16, 32))
  state = steps.create_train_state(jax.random.key(0), module, optim.make_optimizer(_config()), (64, 64, 3))
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  features, gradients = saliency._features_and_gradients(  # pylint: disable=protected-access
      state, jnp.asarray(image), jnp.asarray(2))
  _, captured = module.apply(state.variables, image[None], train=False, capture_intermediates=True)
  np.testing.assert_allclose(features, captured['intermediates']['layer4_1']['__call__'][0][0], rtol=1e-6)
  column = state.params['head']['kernel'][:, 2]
  np.testing.assert_allclose(gradients, np.broadcast_to(column / 4, (2, 2, 32)), rtol=1e-5, atol=1e-8)
  cam = saliency.grad_cam(state, image, jnp.asarray(2))
  assert cam.shape == (64, 64) and float(cam.max()) == pytest.approx(1.0)
