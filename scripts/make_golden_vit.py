"""Writes the golden ViT fixtures of tests/test_vit.py: weights and timm's own logits.

A reduced ViT (width 48, depth 2, 3 heads, MLP 96, 16-pixel patches at
48 px, 5 classes) gets random weights written as two `.npz` files, one per
checkpoint layout:
  vit_golden_augreg.npz      the vision_transformer / AugReg layout
                             (`Transformer/posembed_input/pos_embedding` with
                             the class token's entry; blocks numbered 1/3/2),
  vit_golden_big_vision.npz  big_vision's layout (top-level `pos_embedding`
                             without it, the class token's entry folded into
                             `cls`; blocks numbered 0/0/1): the same function.
timm's `VisionTransformer` loads each with its own npz loader
(`load_pretrained`, i.e. `_load_weights`) and computes the logits of a few
deterministic uint8 images with its AugReg preprocessing (mean = std = 0.5),
with the tanh GELU the JAX code bases use and with timm's default erf GELU;
vit_golden_reference.npz keeps images and logits, and
vit_golden_timm.safetensors timm's state dict of that model (fused `attn.qkv`).

Needs torch and timm, so it is run by hand, never by the tests:
  /work/torchenv/bin/python scripts/make_golden_vit.py
"""

import os
import sys
import types

import numpy as np

# PyPI's torchvision wheels are CUDA builds; with the CPU torch its C
# operators are missing and importing it fails in `_meta_registrations`,
# which registers fakes for them. timm uses none of them.
sys.modules['torchvision._meta_registrations'] = types.ModuleType('torchvision._meta_registrations')
import safetensors.torch  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402
import torch  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests', 'fixtures')
WIDTH, DEPTH, HEADS, MLP_DIM, PATCH, IMAGE_SIZE, CLASSES = 48, 2, 3, 96, 16, 48, 5
# vision_transformer numbering of a block's submodules (big_vision: 0, 0, 1).
ATTENTION, MLP, NORM2 = 'MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2'


def augreg_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random weights in the vision_transformer layout, scaled so every tensor matters."""
  def kernel(*shape, fan_in):
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)

  def small(*shape):
    return rng.normal(0.0, 0.1, shape)

  head_dim = WIDTH // HEADS
  grid = (IMAGE_SIZE // PATCH) ** 2
  w = {
      'embedding/kernel': kernel(PATCH, PATCH, 3, WIDTH, fan_in=PATCH * PATCH * 3),
      'embedding/bias': small(WIDTH),
      'cls': rng.normal(0.0, 0.5, (1, 1, WIDTH)),
      'Transformer/posembed_input/pos_embedding': rng.normal(0.0, 0.5, (1, 1 + grid, WIDTH)),
      'Transformer/encoder_norm/scale': 1.0 + small(WIDTH),
      'Transformer/encoder_norm/bias': small(WIDTH),
      'head/kernel': kernel(WIDTH, CLASSES, fan_in=WIDTH),
      'head/bias': small(CLASSES),
  }
  for i in range(DEPTH):
    b = f'Transformer/encoderblock_{i}/'
    for norm in ('LayerNorm_0', NORM2):
      w[f'{b}{norm}/scale'] = 1.0 + small(WIDTH)
      w[f'{b}{norm}/bias'] = small(WIDTH)
    for name in ('query', 'key', 'value'):
      w[f'{b}{ATTENTION}/{name}/kernel'] = kernel(WIDTH, HEADS, head_dim, fan_in=WIDTH)
      w[f'{b}{ATTENTION}/{name}/bias'] = small(HEADS, head_dim)
    w[f'{b}{ATTENTION}/out/kernel'] = kernel(HEADS, head_dim, WIDTH, fan_in=WIDTH)
    w[f'{b}{ATTENTION}/out/bias'] = small(WIDTH)
    w[f'{b}{MLP}/Dense_0/kernel'] = kernel(WIDTH, MLP_DIM, fan_in=WIDTH)
    w[f'{b}{MLP}/Dense_0/bias'] = small(MLP_DIM)
    w[f'{b}{MLP}/Dense_1/kernel'] = kernel(MLP_DIM, WIDTH, fan_in=MLP_DIM)
    w[f'{b}{MLP}/Dense_1/bias'] = small(WIDTH)
  return {k: v.astype(np.float32) for k, v in w.items()}


def big_vision_weights(augreg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The same function in big_vision's layout (its `fix_old_checkpoints` in reverse)."""
  renames = {ATTENTION: 'MultiHeadDotProductAttention_0', MLP: 'MlpBlock_0', NORM2: 'LayerNorm_1'}
  out = {}
  for name, value in augreg.items():
    for old, new in renames.items():
      name = name.replace(f'/{old}/', f'/{new}/')
    out[name] = value
  pos = out.pop('Transformer/posembed_input/pos_embedding')
  out['pos_embedding'] = pos[:, 1:]
  out['cls'] = out['cls'] + pos[:, :1]
  return out


def images() -> np.ndarray:
  """Noise, a colour ramp, a checkerboard and a bright disc: uint8 [4, H, W, 3]."""
  rng = np.random.default_rng(1)
  y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] / (IMAGE_SIZE - 1)
  ramp = np.stack([x, y, 1 - x * y], axis=-1) * 255
  checker = ((np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] // 8).sum(0) % 2)[..., None] * np.array([230, 40, 120])
  disc = ((x - 0.4) ** 2 + (y - 0.6) ** 2 < 0.08)[..., None] * np.array([250, 200, 180]) + 20
  noise = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3))
  return np.stack([noise, ramp, checker, disc]).round().clip(0, 255).astype(np.uint8)


def timm_model(weights_path: str, act_layer: str, no_embed_class: bool) -> torch.nn.Module:
  """timm's ViT of the fixture's size, loaded by timm's own npz loader."""
  model = timm_vit.VisionTransformer(
      img_size=IMAGE_SIZE, patch_size=PATCH, num_classes=CLASSES, embed_dim=WIDTH, depth=DEPTH,
      num_heads=HEADS, mlp_ratio=MLP_DIM / WIDTH, act_layer=act_layer, no_embed_class=no_embed_class)
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float('nan'))
  model.load_pretrained(weights_path)
  missing = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
  assert not missing, f'timm did not load {missing}'
  return model.eval()


def logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
  # timm's AugReg preprocessing: /255, then mean = std = 0.5.
  x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
  with torch.no_grad():
    return model(x).numpy()


def main() -> None:
  os.makedirs(FIXTURES, exist_ok=True)
  augreg = augreg_weights(np.random.default_rng(0))
  paths = {layout: os.path.join(FIXTURES, f'vit_golden_{layout}.npz') for layout in ('augreg', 'big_vision')}
  np.savez(paths['augreg'], **augreg)
  np.savez(paths['big_vision'], **big_vision_weights(augreg))
  pixels = images()
  timm_erf = timm_model(paths['augreg'], 'gelu', False)
  safetensors.torch.save_file(timm_erf.state_dict(), os.path.join(FIXTURES, 'vit_golden_timm.safetensors'))
  reference = {
      'images': pixels,
      'logits_gelu_tanh': logits(timm_model(paths['augreg'], 'gelu_tanh', False), pixels),
      'logits_gelu_erf': logits(timm_erf, pixels),
      'logits_big_vision_gelu_tanh': logits(timm_model(paths['big_vision'], 'gelu_tanh', True), pixels),
  }
  np.savez(os.path.join(FIXTURES, 'vit_golden_reference.npz'), **reference)
  scale = np.abs(reference['logits_gelu_tanh']).max()
  for name, values in reference.items():
    if name.startswith('logits'):
      print(f'{name}: max |logit| {np.abs(values).max():.4f}, max diff to logits_gelu_tanh '
            f'{np.abs(values - reference["logits_gelu_tanh"]).max() / scale:.2e} x max |logit|')


if __name__ == '__main__':
  main()
