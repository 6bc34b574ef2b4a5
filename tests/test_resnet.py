"""ResNet equals timm's forward pass on its weights; the converter refuses bad files."""

import os

import jax
import numpy as np
import pytest

from melanoma_jax import models, steps
from melanoma_jax.models import resnet, weight_files

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
# The reduced-width timm models of scripts/make_golden_resnet.py.
GOLDEN = {
    'resnet50_w8': resnet.ResNet50(num_classes=10, widths=(8, 16, 32, 64)),
    'resnet18_w4': resnet.ResNet18(num_classes=10, widths=(4, 8, 16, 32)),
}


def _fixture(name):
  arrays = weight_files.read_safetensors(os.path.join(FIXTURES, f'{name}.safetensors'))
  with np.load(os.path.join(FIXTURES, f'{name}_golden.npz')) as golden:
    return arrays, golden['images'], golden['logits']


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_logits_equal_timm(name):
  arrays, images, expected = _fixture(name)
  module = GOLDEN[name]
  logits = module.apply(resnet.convert_torch(arrays, module), images, train=False)
  assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected))


@pytest.mark.parametrize('name, constructor, expected', [
    ('resnet18', resnet.ResNet18, 11_689_512), ('resnet34', resnet.ResNet34, 21_797_672),
    ('resnet50', resnet.ResNet50, 25_557_032)])
def test_parameter_counts_equal_torchvision(name, constructor, expected):
  shapes = resnet.variable_shapes(constructor(num_classes=1000))
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == expected
  assert name in models.MODELS


@pytest.mark.parametrize('change, message', [
    (lambda a: a.pop('layer2.0.downsample.1.running_var'), 'lack layer2.0.downsample.1.running_var'),
    (lambda a: a.update({'layer1.0.conv1.weight': np.zeros((8, 8, 3, 3), np.float32)}),
     'layer1.0.conv1.weight has shape'),
    (lambda a: a.update({'layer5.0.conv1.weight': np.zeros(1, np.float32)}), 'hold layer5.0.conv1.weight'),
])
def test_converter_names_the_first_bad_tensor(change, message):
  arrays, _, _ = _fixture('resnet50_w8')
  change(arrays)
  with pytest.raises(ValueError, match=message):
    resnet.convert_torch(arrays, GOLDEN['resnet50_w8'])


def test_load_pretrained_refuses_other_widths_and_missing_files(tmp_path):
  # A full-width ResNet-18 cannot take the reduced fixture's tensors.
  with pytest.raises(ValueError, match=r'layer1\.0\.\S+ has shape \(4,'):
    models.load_pretrained('resnet18', os.path.join(FIXTURES, 'resnet18_w4.safetensors'))
  with pytest.raises(FileNotFoundError, match='never downloaded'):
    models.load_pretrained('resnet18', tmp_path / 'resnet18.safetensors')
  with pytest.raises(ValueError, match=r'it takes \.safetensors'):
    models.load_pretrained('resnet18', tmp_path / 'resnet18.npz')


def test_fit_pretrained_keeps_backbone_and_statistics_and_replaces_head():
  arrays, _, _ = _fixture('resnet18_w4')
  pretrained = resnet.convert_torch(arrays, GOLDEN['resnet18_w4'])
  module = resnet.ResNet18(num_classes=3, widths=(4, 8, 16, 32))
  template = steps.init_variables(module, jax.random.key(1), (32, 32, 3))
  fitted = models.fit_pretrained('resnet18', pretrained, template)
  np.testing.assert_array_equal(fitted['params']['head']['kernel'], template['params']['head']['kernel'])
  np.testing.assert_array_equal(fitted['params']['layer4_1']['conv2']['kernel'],
                                arrays['layer4.1.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(fitted['batch_stats']['bn1']['var'], arrays['bn1.running_var'])
  wider = resnet.ResNet18(num_classes=3, widths=(8, 8, 16, 32))
  template = steps.init_variables(wider, jax.random.key(1), (32, 32, 3))
  with pytest.raises(ValueError, match='batch_stats/layer1_0/bn1/mean has shape'):
    models.fit_pretrained('resnet18', pretrained, template)
