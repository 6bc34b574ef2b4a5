"""ViT against timm's own forward pass on big_vision / AugReg `.npz` and timm `.safetensors` weights.

The golden fixtures (scripts/make_golden_vit.py) hold a reduced ViT's random
weights in both npz checkpoint layouts and as timm's state dict, and the
logits timm computes after loading them with its own npz loader.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from melanoma_jax import models, saliency, steps
from melanoma_jax.models import vit, weight_files

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
REFERENCE = np.load(os.path.join(FIXTURES, 'vit_golden_reference.npz'))
GRID = 3  # 48-pixel images, 16-pixel patches


# The architecture of the fixtures (make_golden_vit.py).
REDUCED = functools.partial(vit.ViT, patch_size=16, width=48, depth=2, num_heads=3, mlp_dim=96)


def reduced(gelu_approximate: bool = True) -> vit.ViT:
  return REDUCED(num_classes=5, gelu_approximate=gelu_approximate)


def read(layout: str) -> dict[str, np.ndarray]:
  return weight_files.read_npz(os.path.join(FIXTURES, f'vit_golden_{layout}.npz'))


def assert_logits_equal(logits: np.ndarray, expected: np.ndarray) -> None:
  assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-4 * np.max(np.abs(expected))


def _with_prefix(arrays, prefix):
  """A whole training checkpoint: parameters under `prefix`, optimizer state beside them."""
  return {**{prefix + k: v for k, v in arrays.items()}, 'opt/state/step': np.zeros(())}


def _scanned(arrays):
  """Blocks stacked along a leading depth axis, as big_vision's scanned encoder stores them."""
  out = {k: v for k, v in arrays.items() if not k.startswith('Transformer/encoderblock_')}
  for name in {k.split('/', 2)[2] for k in arrays if k.startswith('Transformer/encoderblock_0/')}:
    out[f'Transformer/encoderblock/{name}'] = np.stack(
        [arrays[f'Transformer/encoderblock_{i}/{name}'] for i in range(2)])
  return out


@pytest.mark.parametrize('layout, transform', [
    ('augreg', lambda a: a),
    ('big_vision', lambda a: a),
    ('augreg', lambda a: _with_prefix(a, 'opt/target/')),
    ('big_vision', lambda a: _with_prefix(a, 'params/')),
    ('big_vision', _scanned),
], ids=['augreg', 'big_vision', 'opt_target_prefix', 'params_prefix', 'scanned'])
def test_logits_equal_timm(layout, transform):
  module = reduced()
  variables = vit.convert_big_vision(transform(read(layout)), module)
  logits = module.apply(variables, REFERENCE['images'], train=False)
  assert logits.dtype == jnp.float32
  assert_logits_equal(logits, REFERENCE['logits_gelu_tanh'])


def test_erf_gelu_logits_equal_timm_default():
  module = reduced(gelu_approximate=False)
  logits = module.apply(vit.convert_big_vision(read('augreg'), module), REFERENCE['images'], train=False)
  assert_logits_equal(logits, REFERENCE['logits_gelu_erf'])


def test_timm_safetensors_logits_equal_timm():
  module = reduced(gelu_approximate=False)
  arrays = weight_files.read_safetensors(os.path.join(FIXTURES, 'vit_golden_timm.safetensors'))
  logits = module.apply(vit.convert_timm(arrays, module), REFERENCE['images'], train=False)
  assert_logits_equal(logits, REFERENCE['logits_gelu_erf'])


@pytest.mark.parametrize('edit, message', [
    (lambda a: a.pop('blocks.1.mlp.fc2.bias'), 'lack blocks.1.mlp.fc2.bias'),
    (lambda a: a.update({'blocks.0.attn.qkv.weight': np.zeros((144, 40), np.float32)}),
     r'blocks.0.attn.qkv.weight has shape \(40, 3, 16\) in flax layout; expected \(48, 3, 16\)'),
    (lambda a: a.update({'blocks.0.ls1.gamma': np.ones(48, np.float32)}), 'hold blocks.0.ls1.gamma'),
])
def test_bad_timm_weights_name_the_tensor(edit, message):
  arrays = weight_files.read_safetensors(os.path.join(FIXTURES, 'vit_golden_timm.safetensors'))
  edit(arrays)
  with pytest.raises(ValueError, match=message):
    vit.convert_timm(arrays, reduced())


@pytest.mark.parametrize('file, expected', [('vit_golden_augreg.npz', 'logits_gelu_tanh'),
                                            ('vit_golden_timm.safetensors', 'logits_gelu_erf')])
def test_load_pretrained_reproduces_each_source(monkeypatch, file, expected):
  """Through the registry: big_vision's tanh GELU for .npz, timm's erf GELU for .safetensors."""
  monkeypatch.setitem(models.MODELS, 'vit_golden', vit.spec(REDUCED))
  module, variables = models.load_pretrained('vit_golden', os.path.join(FIXTURES, file))
  assert_logits_equal(module.apply(variables, REFERENCE['images'], train=False), REFERENCE[expected])


def test_position_embeddings_resampled_like_big_vision():
  """A 3x3 grid checkpoint fine-tuned at 80 px (5x5): bilinear zoom of the grid, class entry kept."""
  module = reduced()
  pretrained = vit.convert_big_vision(read('augreg'), module)
  template = vit.variable_shapes(module, (5, 5))
  adapted = vit.adapt(pretrained, template)

  old = read('augreg')['Transformer/posembed_input/pos_embedding']
  expected_grid = scipy.ndimage.zoom(old[0, 1:].reshape(GRID, GRID, -1), (5 / GRID, 5 / GRID, 1), order=1)
  new = adapted['params']['pos_embedding']
  assert new.shape == template['params']['pos_embedding'].shape == (1, 26, 48)
  np.testing.assert_array_equal(new[:, 0], old[:, 0])
  np.testing.assert_allclose(new[0, 1:].reshape(5, 5, -1), expected_grid, rtol=1e-6, atol=1e-6)
  logits = module.apply(adapted, np.zeros((2, 80, 80, 3), np.uint8), train=False)
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))


@pytest.mark.parametrize('constructor, expected', [(vit.ViTS16, 22_050_664), (vit.ViTB16, 86_567_656)])
def test_parameter_counts_equal_timm(constructor, expected):
  shapes = vit.variable_shapes(constructor(num_classes=1000), (14, 14))  # 224 px
  assert list(shapes) == ['params']  # no BatchNorm statistics
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


@pytest.mark.parametrize('edit, message', [
    (lambda a: a.pop('Transformer/encoderblock_1/LayerNorm_2/bias'),
     'lack Transformer/encoderblock_1/LayerNorm_2/bias'),
    (lambda a: a.update({'head/bias': np.zeros(7, np.float32)}), r'head/bias has shape \(7,\)'),
    (lambda a: a.update({'pre_logits/kernel': np.zeros((48, 48), np.float32)}), 'hold pre_logits/kernel'),
    (lambda a: a.update({'Transformer/encoderblock_2/LayerNorm_0/scale': np.ones(48, np.float32)}),
     'hold Transformer/encoderblock_2/LayerNorm_0/scale'),
])
def test_bad_weights_name_the_tensor(edit, message):
  arrays = read('augreg')
  edit(arrays)
  with pytest.raises(ValueError, match=message):
    vit.convert_big_vision(arrays, reduced())


@pytest.mark.parametrize('file, message', [('vit_golden_augreg.npz', 'cls'),
                                           ('vit_golden_timm.safetensors', 'cls_token')])
def test_load_pretrained_refuses_another_size(file, message):
  expected = fr'{message} has shape \(1, 1, 48\) in flax layout; expected \(1, 1, 384\)'
  with pytest.raises(ValueError, match=expected):
    models.load_pretrained('vit_s16', os.path.join(FIXTURES, file))


@pytest.mark.parametrize('size, ok', [(224, True), (32, True), (180, False), (8, False)])
def test_image_size_must_be_whole_patches(size, ok):
  check = models.MODELS['vit_s16'].check
  config = ml_collections.ConfigDict({'image_size': size})
  if ok:
    check(config)
  else:
    with pytest.raises(ValueError, match=f'image_size={size} is not a multiple'):
      check(config)


def test_grad_cam_explains_the_last_block_input_tokens():
  """Grad-CAM gets a [B, h, w, D] map whose gradient reaches the class token, hence a non-flat map."""
  module = reduced()
  variables = vit.convert_big_vision(read('augreg'), module)
  image = REFERENCE['images'][3]
  _, marked = module.apply(variables, image[None], train=False, mutable=['intermediates'])
  assert marked['intermediates'][models.FEATURES][0].shape == (1, GRID, GRID, 48)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'], model_state={},
                           opt_state=None, rng=jnp.zeros((2,), jnp.uint32), model=module, tx=None)
  cam = np.asarray(saliency.grad_cam(state, image, jnp.asarray(2)))
  assert cam.shape == (48, 48) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
  assert cam.std() > 0.05
