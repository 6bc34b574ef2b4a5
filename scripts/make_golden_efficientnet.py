"""Writes the timm tf_efficientnet golden fixture for tests/test_efficientnet.py.

Run by hand, in a separate environment with torch and timm (never a
dependency of melanoma_jax):

  /work/torchenv/bin/python scripts/make_golden_efficientnet.py

A reduced tf_efficientnet_b0 (channel multiplier 0.25, depth 0.5: every kind
of block, a few kB of weights) with random weights and randomised BatchNorm
statistics, in eval mode, on deterministic uint8 images normalised as timm's
pretrained_cfg for tf_efficientnet_b0 says. The image side is odd so the
stride-2 "same" padding takes its symmetric branch (the Keras test uses an
even side).
"""

from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
import torch.library


def _skip_torchvision_ops(register):
  """`register` that ignores torchvision's own C++ ops.

  torchvision from PyPI is a CUDA build: beside the CPU torch wheel its C++
  ops cannot load, yet its import still registers fake/autograd kernels for
  them and fails. timm (which imports torchvision) needs none of those ops.
  """
  def lenient(op, *args, **kwargs):
    if isinstance(op, str) and op.startswith('torchvision::') and not hasattr(
        torch.ops.torchvision, op.split('::')[1]):
      return (lambda fn: fn) if not args else None
    return register(op, *args, **kwargs)
  return lenient


torch.library.register_fake = _skip_torchvision_ops(torch.library.register_fake)
torch.library.register_autograd = _skip_torchvision_ops(torch.library.register_autograd)
import timm  # noqa: E402  (after the patch above)
from timm.models import efficientnet  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / 'tests' / 'fixtures'
WIDTH, DEPTH, NUM_CLASSES, SIZE = 0.25, 0.5, 5, 57


def main() -> None:
  torch.manual_seed(0)
  model = efficientnet._gen_efficientnet(  # pylint: disable=protected-access
      'tf_efficientnet_b0', channel_multiplier=WIDTH, depth_multiplier=DEPTH,
      bn_eps=efficientnet.BN_EPS_TF_DEFAULT, pad_type='same', num_classes=NUM_CLASSES)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        shape = module.running_mean.shape
        module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
        module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
  model.eval()

  cfg = timm.create_model('tf_efficientnet_b0', pretrained=False).pretrained_cfg
  mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
  std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
  images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  with torch.no_grad():
    logits = model((x - mean) / std).numpy()

  weights = {k: v.numpy() for k, v in model.state_dict().items()}
  FIXTURES.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(weights, FIXTURES / 'tf_efficientnet_reduced.safetensors')
  np.savez(FIXTURES / 'tf_efficientnet_reduced_golden.npz', images=images, logits=logits,
           width=WIDTH, depth=DEPTH, mean=np.array(cfg['mean']), std=np.array(cfg['std']))
  print(f'{sum(v.size for v in weights.values())} numbers; mean {cfg["mean"]} std {cfg["std"]}; '
        f'max |logit| {np.abs(logits).max():.3f}; timm {timm.__version__}')


if __name__ == '__main__':
  main()
