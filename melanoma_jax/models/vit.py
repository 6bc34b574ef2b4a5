"""Vision Transformer (ViT-S/16, ViT-B/16) and its big_vision / AugReg and timm weight converters.

The architecture of Dosovitskiy et al. (2021) as big_vision and Google's
vision_transformer repository (the AugReg checkpoints) define it: a patch
convolution, a class token, learned position embeddings, pre-LayerNorm
encoder blocks (epsilon 1e-6) and a Dense head on the class token. Input
convention 'tf': RGB scaled to [-1, 1] (timm's mean = std = 0.5). GELU is
the tanh approximation both JAX code bases trained with; timm runs the
same weights with the exact (erf) GELU, selectable with
`gelu_approximate=False`.

Parameter names follow big_vision's, without its `Transformer/` scope (the
blocks sit at the top level so Grad-CAM can mark the last block's input).
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage

from melanoma_jax.models import interface, onednn

LAYER_NORM_EPSILON = 1e-6


def tf_preprocessing(images: jax.Array, dtype: Any) -> jax.Array:
  """uint8 (or [0, 255]) RGB -> [-1, 1]."""
  return jnp.asarray(jnp.asarray(images, jnp.float32) / 127.5 - 1.0, dtype)


class _MlpBlock(nn.Module):
  mlp_dim: int
  gelu_approximate: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim, name='Dense_0')(x), approximate=self.gelu_approximate)
    return dense(x.shape[-1], name='Dense_1')(y)


class _EncoderBlock(nn.Module):
  """Pre-LayerNorm self-attention and MLP, each with a residual connection."""
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=self.dtype)
    y = norm(name='LayerNorm_0')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        name='MultiHeadDotProductAttention_0')(y, y, deterministic=True)
    x = x + y
    y = _MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, name='MlpBlock_0')(
        norm(name='LayerNorm_1')(x))
    return x + y


class ViT(interface.Classifier):
  """A ViT with a class token; width/depth/heads/mlp_dim/patch_size set the size.

  Attributes (besides `interface.Classifier`'s, of which `dropout_rate` acts
  on the class token and `axis_name` is unused: there is no BatchNorm):
    patch_size: side of the square patches (also the feature stride).
    width: token dimension.
    depth: encoder blocks.
    num_heads: attention heads (width must be a multiple).
    mlp_dim: hidden units of each block's MLP.
    gelu_approximate: tanh GELU as big_vision (True) or erf GELU as timm.
  """
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  gelu_approximate: bool = True
  preprocessing: ClassVar[str] = 'tf'

  @property
  def feature_stride(self) -> int:
    return self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    x = tf_preprocessing(images, self.dtype)
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='embedding',
                conv_general_dilated=onednn.conv_general_dilated)(x)
    batch, h, w, width = x.shape
    cls = self.param('cls', nn.initializers.zeros, (1, 1, width))
    x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (batch, 1, width)),
                         x.reshape(batch, h * w, width)], axis=1)
    # One embedding per token, the class token's included (the AugReg
    # layout; big_vision's newer checkpoints have none for it: zero here).
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=1 / math.sqrt(width)),
                     (1, 1 + h * w, width))
    x = x + jnp.asarray(pos, self.dtype)
    for i in range(self.depth):
      if i == self.depth - 1:
        # Grad-CAM explains the patch tokens the last block attends over:
        # after it, patch tokens no longer reach the class token (zero gradient).
        patches = interface.mark_features(self, x[:, 1:].reshape(batch, h, w, width))
        x = jnp.concatenate([x[:, :1], patches.reshape(batch, h * w, width)], axis=1)
      x = _EncoderBlock(self.num_heads, self.mlp_dim, self.gelu_approximate, self.dtype,
                        name=f'encoderblock_{i}')(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name='encoder_norm')(x)[:, 0]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Zero-initialised as big_vision's: a fresh head starts from uniform predictions.
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name='head')(x)
    return jnp.asarray(x, jnp.float32)


ViTS16 = functools.partial(ViT, patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536)
ViTB16 = functools.partial(ViT, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)


def variable_shapes(module: ViT, grid: tuple[int, int]) -> dict[str, Any]:
  """The module's variables as shapes only (no compute), for a grid of patches."""
  images = jnp.zeros((1, grid[0] * module.patch_size, grid[1] * module.patch_size, 3), jnp.uint8)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), images, train=False))


# Names inside an encoder block: big_vision (flax numbers submodules per
# type) and the original vision_transformer repository / AugReg files
# (numbered across types). timm's npz loader reads both the same way.
_BLOCK_NAMES = {
    'big_vision': {},
    'vision_transformer': {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                           'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'},
}
# Where checkpoints kept the position embeddings, newest first.
_POS_EMBEDDING_NAMES = ('pos_embedding', 'Transformer/pos_embedding',
                        'Transformer/posembed_input/pos_embedding')
# Prefixes of whole training checkpoints (the rest of the file is optimizer state).
_PREFIXES = ('', 'params/', 'opt/target/')
_SCANNED = 'Transformer/encoderblock/'


def _unscanned(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Blocks stored stacked (`Transformer/encoderblock/...`, depth axis first) as one entry per block."""
  out = {}
  for name, value in arrays.items():
    if name.startswith(_SCANNED):
      for i, block in enumerate(value):
        out[f'Transformer/encoderblock_{i}/{name[len(_SCANNED):]}'] = block
    else:
      out[name] = value
  return out


def _grid_side(tokens: int, name: str) -> int:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f'{name} holds {tokens} grid positions, not a square grid.')
  return side


def convert_big_vision(arrays: Mapping[str, np.ndarray], module: ViT) -> dict[str, Any]:
  """big_vision / vision_transformer (AugReg) `.npz` arrays -> flax variables of `module`.

  Accepts both block naming conventions, the three places position
  embeddings have been kept (with or without an entry for the class token),
  blocks stored stacked, and whole checkpoints under `params/` or
  `opt/target/`. The variables are at the checkpoint's own image size
  (`adapt` resamples the position embeddings for another). Raises ValueError
  naming the first missing, mis-shaped or unexpected tensor.
  """
  prefix = next((p for p in _PREFIXES if f'{p}embedding/kernel' in arrays), None)
  if prefix is None:
    raise ValueError('The weights lack embedding/kernel: not a big_vision / vision_transformer ViT.')
  source = _unscanned({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
  return _to_variables(source, module, lambda name: prefix + name)


def _to_variables(source: Mapping[str, np.ndarray], module: ViT,
                  shown: Callable[[str], str]) -> dict[str, Any]:
  """Arrays under big_vision names (unprefixed, unscanned) -> variables; errors name `shown(name)`."""
  if 'cls' not in source:
    raise ValueError(f'The weights lack {shown("cls")}: a ViT without a class token (e.g. big_vision\'s '
                     "pool_type='gap' or 'map'), which this model does not implement.")
  pos_names = [n for n in _POS_EMBEDDING_NAMES if n in source]
  if len(pos_names) != 1:
    raise ValueError(f'The weights hold {len(pos_names)} learned position embeddings '
                     f'({", ".join(map(shown, pos_names))}); expected one.')
  pos_name = pos_names[0]
  pos = np.asarray(source[pos_name], np.float32)
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ValueError(f'{shown(pos_name)} has shape {pos.shape}; expected (1, tokens, width).')
  if math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
    # big_vision's newer layout: no embedding for the class token, i.e. zero.
    pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  side = _grid_side(pos.shape[1] - 1, shown(pos_name))
  convention = ('vision_transformer' if any(f'/{n}/' in k for k in source
                                            for n in _BLOCK_NAMES['vision_transformer'].values())
                else 'big_vision')

  def source_name(keys: tuple[str, ...]) -> str:
    if keys == ('pos_embedding',):
      return pos_name
    if keys[0].startswith('encoderblock_'):
      keys = ('Transformer', keys[0], _BLOCK_NAMES[convention].get(keys[1], keys[1]), *keys[2:])
    elif keys[0] == 'encoder_norm':
      keys = ('Transformer', *keys)
    return '/'.join(keys)

  params: dict[str, Any] = {}
  used = set()
  shapes = variable_shapes(module, (side, side))['params']
  for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(k.key for k in path)
    name = source_name(keys)
    if name not in source:
      raise ValueError(f'The weights lack {shown(name)} (for params/{"/".join(keys)} {shape.shape}).')
    value = pos if name == pos_name else np.asarray(source[name], np.float32)
    if value.shape != shape.shape:
      raise ValueError(f'{shown(name)} has shape {source[name].shape} in flax layout; expected '
                       f'{shape.shape} for params/{"/".join(keys)} of this ViT.')
    node = params
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
    used.add(name)
  unexpected = sorted(k for k in source if k not in used)
  if unexpected:
    raise ValueError(f'The weights hold {shown(unexpected[0])} {source[unexpected[0]].shape}, which this '
                     f'ViT does not have ({len(unexpected)} unexpected tensors).')
  return {'params': params}


_ATTENTION = 'MultiHeadDotProductAttention_0'
# timm's names -> big_vision's: in encoder block i, and outside the blocks.
_TIMM_BLOCK_NAMES = {
    'norm1.weight': ('LayerNorm_0/scale',), 'norm1.bias': ('LayerNorm_0/bias',),
    'attn.qkv.weight': tuple(f'{_ATTENTION}/{n}/kernel' for n in ('query', 'key', 'value')),
    'attn.qkv.bias': tuple(f'{_ATTENTION}/{n}/bias' for n in ('query', 'key', 'value')),
    'attn.proj.weight': (f'{_ATTENTION}/out/kernel',), 'attn.proj.bias': (f'{_ATTENTION}/out/bias',),
    'norm2.weight': ('LayerNorm_1/scale',), 'norm2.bias': ('LayerNorm_1/bias',),
    'mlp.fc1.weight': ('MlpBlock_0/Dense_0/kernel',), 'mlp.fc1.bias': ('MlpBlock_0/Dense_0/bias',),
    'mlp.fc2.weight': ('MlpBlock_0/Dense_1/kernel',), 'mlp.fc2.bias': ('MlpBlock_0/Dense_1/bias',),
}
_TIMM_NAMES = {
    'patch_embed.proj.weight': 'embedding/kernel', 'patch_embed.proj.bias': 'embedding/bias',
    'cls_token': 'cls', 'pos_embed': 'pos_embedding',
    'norm.weight': 'Transformer/encoder_norm/scale', 'norm.bias': 'Transformer/encoder_norm/bias',
    'head.weight': 'head/kernel', 'head.bias': 'head/bias',
}


def _from_timm(name: str, value: np.ndarray, heads: int) -> list[np.ndarray]:
  """A timm tensor in big_vision's layout (q, k, v apart; heads on their own axis)."""
  if name.endswith('attn.qkv.weight') or name.endswith('attn.qkv.bias'):
    if value.ndim > 2 or value.shape[0] % (3 * heads):
      raise ValueError(f'{name} has shape {value.shape}: not query, key and value of {heads} heads.')
    return [part.T.reshape(part.shape[1], heads, -1) if part.ndim == 2 else part.reshape(heads, -1)
            for part in np.split(value, 3)]
  if name.endswith('attn.proj.weight'):
    if value.ndim != 2 or value.shape[1] % heads:
      raise ValueError(f'{name} has shape {value.shape}: not the output projection of {heads} heads.')
    return [value.T.reshape(heads, -1, value.shape[0])]
  if value.ndim == 4:  # the patch convolution, OIHW -> HWIO
    return [value.transpose(2, 3, 1, 0)]
  return [value.T if value.ndim == 2 else value]  # Linear [out, in] -> [in, out]


def convert_timm(arrays: Mapping[str, np.ndarray], module: ViT) -> dict[str, Any]:
  """timm `VisionTransformer` state-dict arrays (`.safetensors`) -> flax variables of `module`.

  timm fuses query, key and value into `attn.qkv` and stores torch layouts.
  It runs the erf GELU (`gelu_approximate=False`, which `load_pretrained`
  sets for .safetensors) and, for the AugReg and original Google weights,
  the 'tf' input convention (mean = std = 0.5). Errors name timm's tensors.
  """
  timm_names = {bv: timm for timm, bv in _TIMM_NAMES.items()}
  blocks = {int(k.split('.')[1]) for k in arrays if k.startswith('blocks.') and k.split('.')[1].isdigit()}
  for i in blocks | set(range(module.depth)):
    for timm, bvs in _TIMM_BLOCK_NAMES.items():
      timm_names.update({f'Transformer/encoderblock_{i}/{bv}': f'blocks.{i}.{timm}' for bv in bvs})
  bv_names = {}
  for bv, timm in timm_names.items():
    bv_names.setdefault(timm, []).append(bv)
  source = {}
  for name, value in arrays.items():
    if name in bv_names:
      source.update(zip(bv_names[name], _from_timm(name, np.asarray(value), module.num_heads)))
    else:
      source[name] = value  # unknown to this ViT: reported as unexpected
  return _to_variables(source, module, lambda name: timm_names.get(name, name))


def resample_pos_embedding(pos_embedding: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Position embeddings [1, 1 + n*n, D] for a grid of patches [1, 1 + h*w, D].

  big_vision's `resample_posemb`: the square grid of embeddings is zoomed
  bilinearly (scipy.ndimage.zoom, order 1); the class token's entry stays.
  """
  cls, old = pos_embedding[:, :1], pos_embedding[0, 1:]
  side = _grid_side(old.shape[0], 'pos_embedding')
  old = old.reshape(side, side, -1)
  new = scipy.ndimage.zoom(old, (grid[0] / side, grid[1] / side, 1), order=1)
  return np.concatenate([cls, new.reshape(1, grid[0] * grid[1], -1)], axis=1)


def adapt(pretrained: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
  """`pretrained` with its position embeddings resampled to `template`'s (square) grid."""
  old = np.asarray(pretrained['params']['pos_embedding'])
  new_shape = tuple(template['params']['pos_embedding'].shape)
  if old.shape == new_shape:
    return pretrained
  if old.shape[2:] != new_shape[2:]:
    return pretrained  # a width mismatch, which fit_pretrained reports by name
  side = _grid_side(new_shape[1] - 1, 'the model\'s pos_embedding')
  params = {**pretrained['params'], 'pos_embedding': resample_pos_embedding(old, (side, side))}
  return {**pretrained, 'params': params}


def build(constructor, model_config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None) -> ViT:
  del steps_per_epoch  # no BatchNorm
  return constructor(num_classes=num_classes, dropout_rate=model_config.get('dropout_rate', 0.0),
                     dtype=jnp.dtype(model_config.get('dtype', 'float32')))


def check(constructor, config: ml_collections.ConfigDict) -> None:
  """Whole patches only: a remainder would be cut off the image and shift Grad-CAM's grid."""
  patch = constructor.keywords['patch_size']
  if config.image_size < patch or config.image_size % patch:
    nearest = sorted({max(patch, config.image_size // patch * patch), (config.image_size // patch + 1) * patch})
    raise ValueError(f'config.image_size={config.image_size} is not a multiple of the ViT\'s {patch}-pixel '
                     f'patches; use e.g. {" or ".join(map(str, nearest))}.')


def _convert_npz(constructor, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  head = next((f'{p}head/kernel' for p in _PREFIXES if f'{p}head/kernel' in arrays), None)
  if head is None:
    raise ValueError('The weights lack head/kernel: a ViT checkpoint with its classifier is needed.')
  return convert_big_vision(arrays, constructor(num_classes=arrays[head].shape[-1]))


def _convert_safetensors(constructor, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  if 'head.weight' not in arrays:
    raise ValueError('The weights lack head.weight: not a timm ViT with its classifier.')
  return convert_timm(arrays, constructor(num_classes=arrays['head.weight'].shape[0]))


def spec(constructor) -> interface.ModelSpec:
  """The registry entry of one ViT size."""
  return interface.ModelSpec(build=functools.partial(build, constructor),
                             check=functools.partial(check, constructor),
                             converters={'npz': functools.partial(_convert_npz, constructor),
                                         'safetensors': functools.partial(_convert_safetensors, constructor)},
                             adapt=adapt, pretrained_fields={'safetensors': {'gelu_approximate': False}})
