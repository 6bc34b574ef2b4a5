"""ResNet 18/34/50 in the torchvision / timm layout, and its weight converter.

ResNet v1.5 (the stride of a bottleneck sits in its 3x3 convolution), torch
padding (explicit, symmetric), BatchNorm epsilon 1e-5, and torch's input
convention: RGB / 255, normalised by the ImageNet mean and std. torchvision
and timm name their tensors alike (`layer1.0.conv1.weight`, `fc.weight`), so
one converter reads both.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from melanoma_jax.models import interface, onednn, pointwise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Five stride-2 stages.
MIN_IMAGE_SIZE = 32


def torch_preprocessing(images: jax.Array, dtype: Any) -> jax.Array:
  """uint8 (or [0, 255]) RGB -> torchvision's normalised input."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return jnp.asarray((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD), dtype)


class _Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block."""
  width: int
  strides: int
  bottleneck: bool
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_features = self.width * 4 if self.bottleneck else self.width
    if self.bottleneck:
      y = nn.relu(self.norm(name='bn1')(self.conv(self.width, 1, name='conv1')(x)))
      y = nn.relu(self.norm(name='bn2')(self.conv(self.width, 3, self.strides, name='conv2')(y)))
      y = self.norm(name='bn3')(self.conv(out_features, 1, name='conv3')(y))
    else:
      y = nn.relu(self.norm(name='bn1')(self.conv(self.width, 3, self.strides, name='conv1')(x)))
      y = self.norm(name='bn2')(self.conv(self.width, 3, name='conv2')(y))
    if self.strides != 1 or x.shape[-1] != out_features:
      x = self.norm(name='downsample_bn')(self.conv(out_features, 1, self.strides, name='downsample_conv')(x))
    return nn.relu(x + y)


class ResNet(interface.Classifier):
  """torchvision's ResNet; `widths` reduced only for test fixtures.

  Attributes (besides `interface.Classifier`'s; torchvision has no dropout):
    depths: blocks per stage.
    bottleneck: bottleneck blocks (ResNet-50) or basic ones (18, 34).
    bn_momentum: running-statistics momentum (torch's momentum 0.1 is 0.9 here).
  """
  depths: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  widths: Sequence[int] = (64, 128, 256, 512)
  bn_momentum: float = 0.9
  preprocessing: ClassVar[str] = 'torch'
  feature_stride: ClassVar[int] = 32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    def conv(features, kernel, strides=1, name=None):
      pad = kernel // 2
      lowering = pointwise.conv_general_dilated if kernel == 1 else onednn.conv_general_dilated
      return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                     use_bias=False, dtype=self.dtype, name=name, conv_general_dilated=lowering)

    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                             epsilon=1e-5, axis_name=self.axis_name, dtype=self.dtype)
    x = torch_preprocessing(images, self.dtype)
    x = nn.relu(norm(name='bn1')(conv(64, 7, 2, name='conv1')(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for block in range(depth):
        x = _Block(width, 2 if stage and not block else 1, self.bottleneck, conv, norm,
                   name=f'layer{stage + 1}_{block}')(x)
    x = interface.mark_features(self, x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


ResNet18 = functools.partial(ResNet, depths=(2, 2, 2, 2), bottleneck=False)
ResNet34 = functools.partial(ResNet, depths=(3, 4, 6, 3), bottleneck=False)
ResNet50 = functools.partial(ResNet, depths=(3, 4, 6, 3), bottleneck=True)

_TORCH_NAMES = {'head': 'fc', 'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_TORCH_LEAVES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias', ('params', 'scale'): 'weight',
                 ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  modules = [_TORCH_NAMES.get(p, p.replace('_', '.') if p.startswith('layer') else p) for p in path[:-1]]
  return '.'.join([*modules, _TORCH_LEAVES[(collection, path[-1])]])


def _from_torch(array: np.ndarray, ndim: int) -> np.ndarray:
  """A torch tensor in flax layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
  if ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if ndim == 2 else array


def variable_shapes(module: ResNet) -> dict[str, Any]:
  """The module's variables as shapes only (no compute)."""
  return jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.uint8), train=False))


def convert_torch(arrays: Mapping[str, np.ndarray], module: ResNet) -> dict[str, Any]:
  """torchvision/timm state-dict arrays -> flax variables of `module`.

  Raises ValueError naming the first missing, mis-shaped or unexpected tensor
  (torch's `num_batches_tracked` counters are ignored).
  """
  variables: dict[str, Any] = {}
  used = set()
  for collection, tree in variable_shapes(module).items():
    for path, shape in jax.tree_util.tree_flatten_with_path(tree)[0]:
      keys = tuple(k.key for k in path)
      name = _torch_name(collection, keys)
      if name not in arrays:
        raise ValueError(f'The weights lack {name} (for {collection}/{"/".join(keys)} {shape.shape}).')
      value = _from_torch(np.asarray(arrays[name], np.float32), len(shape.shape))
      if value.shape != shape.shape:
        raise ValueError(f'{name} has shape {arrays[name].shape}; expected {shape.shape} in flax layout '
                         f'for {collection}/{"/".join(keys)}.')
      node = variables.setdefault(collection, {})
      for k in keys[:-1]:
        node = node.setdefault(k, {})
      node[keys[-1]] = value
      used.add(name)
  unexpected = sorted(k for k in arrays if k not in used and not k.endswith('num_batches_tracked'))
  if unexpected:
    raise ValueError(f'The weights hold {unexpected[0]} {arrays[unexpected[0]].shape}, which this ResNet '
                     f'does not have ({len(unexpected)} unexpected tensors).')
  return variables


def build(constructor, model_config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None) -> ResNet:
  del steps_per_epoch  # torch's momentum suits fine-tuning whatever the epoch length
  return constructor(num_classes=num_classes, dropout_rate=model_config.get('dropout_rate', 0.0),
                     bn_momentum=interface.bn_momentum(model_config, 0.9),
                     dtype=jnp.dtype(model_config.get('dtype', 'float32')))


def check(config: ml_collections.ConfigDict) -> None:
  interface.check_min_image_size(config, MIN_IMAGE_SIZE, 'ResNet', 'five stride-2 stages')


def _convert_standard(constructor, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
  if 'fc.weight' not in arrays:
    raise ValueError('The weights lack fc.weight: not a torchvision/timm ResNet state dict.')
  return convert_torch(arrays, constructor(num_classes=arrays['fc.weight'].shape[0]))


def spec(constructor) -> interface.ModelSpec:
  """The registry entry of one ResNet size."""
  return interface.ModelSpec(build=functools.partial(build, constructor), check=check,
                             converters={'safetensors': functools.partial(_convert_standard, constructor)})
