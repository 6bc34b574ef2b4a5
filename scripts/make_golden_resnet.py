"""Writes the golden ResNet fixtures: reduced-width timm ResNets and timm's own logits.

Run by hand, with torch and timm (never a dependency of melanoma_jax):

  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install /opt/wheels/torch-*.whl timm safetensors numpy
  /work/torchenv/bin/python scripts/make_golden_resnet.py

For each fixture, tests/fixtures/<name>.safetensors holds the state dict
(timm's names are torchvision's) and <name>_golden.npz the uint8 images and
the logits timm computes for them in eval mode. The weights, BatchNorm
statistics included, are random (seeded) so every tensor matters; the
widths are reduced so the files stay small. tests/test_resnet.py compares
our logits with these.
"""

import os

import numpy as np
import torch

# torchvision wheels from PyPI may lack the compiled ops of a CPU-only torch;
# timm imports torchvision, whose import then fails registering fakes for two
# of them. Declaring their schemas lets it import; they are never run.
try:
  import torchvision  # noqa: F401  pylint: disable=unused-import
except RuntimeError:
  _STUBS = torch.library.Library('torchvision', 'DEF')  # pylint: disable=invalid-name
  _STUBS.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  _STUBS.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')
import safetensors.torch  # pylint: disable=g-import-not-at-top
from timm.data import constants  # pylint: disable=g-import-not-at-top
from timm.models import resnet  # pylint: disable=g-import-not-at-top

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures')
IMAGE_SIZE = 70  # odd feature-map sizes after the stride-2 stages: 35, 18, 9, 5, 3
NUM_CLASSES = 10
# name: (block, blocks per stage, stage widths); the stem keeps its 64 channels.
MODELS = {
    'resnet50_w8': (resnet.Bottleneck, (3, 4, 6, 3), (8, 16, 32, 64)),
    'resnet18_w4': (resnet.BasicBlock, (2, 2, 2, 2), (4, 8, 16, 32)),
}


def _randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
  """Random weights and BatchNorm statistics, so no layer is an identity."""
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('running_var') or (name.endswith('weight') and tensor.ndim == 1):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
      elif tensor.ndim == 1:
        tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
      else:
        fan_in = tensor[0].numel()
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5)


def main() -> None:
  os.makedirs(FIXTURES, exist_ok=True)
  images = np.random.default_rng(0).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = (x - torch.tensor(constants.IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(
      constants.IMAGENET_DEFAULT_STD)[:, None, None]
  for seed, (name, (block, layers, channels)) in enumerate(MODELS.items()):
    model = resnet.ResNet(block, layers, num_classes=NUM_CLASSES, channels=channels,
                          zero_init_last=False)
    _randomise(model, torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
      logits = model(x).numpy()
    safetensors.torch.save_file(model.state_dict(), os.path.join(FIXTURES, f'{name}.safetensors'))
    np.savez_compressed(os.path.join(FIXTURES, f'{name}_golden.npz'), images=images, logits=logits)
    print(f'{name}: {sum(p.numel() for p in model.parameters())} parameters, '
          f'max |logit| {np.abs(logits).max():.3f}')


if __name__ == '__main__':
  main()
