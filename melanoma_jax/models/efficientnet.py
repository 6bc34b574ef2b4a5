"""EfficientNet B0-B3, loadable from timm `tf_efficientnet_b*` and Keras applications.

One module serves both sources: timm's TF ports pad like TensorFlow's "same"
(flax 'SAME'), and Keras' `correct_pad` ZeroPadding before its stride-2
"valid" convolutions pads exactly as "same" does, so the convolutions agree.
BatchNorm epsilon is 1e-3 in both, squeeze-excitation widths agree for
channel counts that are multiples of 8 (always, with divisor 8). What
differs is the input normalisation, so it lives in two non-trainable
variables (`batch_stats/input_mean`, `batch_stats/input_std`) that the
converters fill from the source: a loaded model computes exactly what its
source computes, and the statistics travel with checkpoints like BatchNorm's.
"""

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from melanoma_jax.models import interface, onednn, pointwise
from melanoma_jax.models.interface import mark_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel (mean, std) applied to RGB / 255, by input convention:
# 'torch': timm's tf_efficientnet_b* default pretrained_cfg, and Keras
# EfficientNet built with weights='imagenet' (its Normalization layer plus the
# extra Rescaling by 1/sqrt(stddev) amount to the same); 'tf': [-1, 1], timm's
# AdvProp weights (tf_efficientnet_b*.ap_in1k); 'unit': RGB / 255 only, Keras
# EfficientNet built with weights=None (Normalization never adapted).
PREPROCESSING = {
    'torch': (IMAGENET_MEAN, IMAGENET_STD),
    'tf': ((0.5,) * 3, (0.5,) * 3),
    'unit': ((0.0,) * 3, (1.0,) * 3),
}

# Per stage: kernel size, repeats, stride, expansion ratio, output channels
# (at width 1.0). Every block has squeeze-excitation with ratio 0.25.
STAGES = ((3, 1, 1, 1, 16), (3, 2, 2, 6, 24), (5, 2, 2, 6, 40), (3, 3, 2, 6, 80),
          (5, 3, 1, 6, 112), (5, 4, 2, 6, 192), (3, 1, 1, 6, 320))
SE_RATIO = 0.25
BN_EPSILON = 1e-3
# name: (width coefficient, depth coefficient, native image size)
SIZES = {
    'b0': (1.0, 1.0, 224),
    'b1': (1.0, 1.1, 240),
    'b2': (1.1, 1.2, 260),
    'b3': (1.2, 1.4, 300),
}
# Five stride-2 stages; Keras refuses smaller inputs too.
MIN_IMAGE_SIZE = 32

_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
# flax counts a depthwise kernel's fan-out over all channels; its real fan-out
# (and fan-in) is k*k, which is what fan_in computes for a (k, k, 1, C) kernel.
_depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
_head_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
  """Channels scaled by `width`, to a multiple of `divisor`, never 10% below (timm/Keras)."""
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


def block_name(stage: int, index: int) -> str:
  """Keras' block names: stage 0, block 1 -> 'block1b'."""
  return f'block{stage + 1}{chr(ord("a") + index)}'


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's "same" padding (flax 'SAME'): the extra pixel at the end."""
  total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """A depthwise convolution ('SAME' padding, no bias): oneDNN's, or a sum of k*k shifted products.

  Computes what `nn.Conv(C, (k, k), feature_group_count=C, padding='SAME')`
  computes, with the same (k, k, 1, C) kernel, but XLA:CPU runs grouped
  convolutions' gradients an order of magnitude slower than these
  elementwise products, whose gradients are elementwise too; where oneDNN
  runs (`onednn.runs`), its depthwise kernels take the place of both.
  """
  kernel_size: int
  stride: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, s = self.kernel_size, self.stride
    kernel = self.param('kernel', _depthwise_init, (k, k, 1, x.shape[-1]), jnp.float32)
    kernel = kernel.astype(self.dtype)
    (h, w) = x.shape[1:3]
    padding = (_same_padding(h, k, s), _same_padding(w, k, s))
    if onednn.runs(x, kernel):  # oneDNN's depthwise kernels, faster still
      return onednn.conv(x, kernel, (s, s), padding)
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_h, out_w = -(-h // s), -(-w // s)
    y = 0
    for i in range(k):
      for j in range(k):
        y = y + x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s] * kernel[i, j, 0]
    return y


class MBConv(nn.Module):
  """Inverted residual block with squeeze-excitation (MBConv)."""
  features_in: int
  features_out: int
  kernel_size: int
  stride: int
  expand_ratio: int
  drop_rate: float
  bn_momentum: float
  axis_name: str | None
  dtype: Any

  @nn.compact
  def __call__(self, inputs: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    batch_norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=BN_EPSILON,
        axis_name=self.axis_name, dtype=self.dtype, name=name)
    conv1x1 = lambda features, name: nn.Conv(
        features, (1, 1), use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name=name,
        conv_general_dilated=pointwise.conv_general_dilated)
    features = self.features_in * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = nn.swish(batch_norm('expand_bn')(conv1x1(features, 'expand_conv')(x)))
    x = DepthwiseConv(self.kernel_size, self.stride, self.dtype, name='dwconv')(x)
    x = nn.swish(batch_norm('bn')(x))

    squeezed = max(1, int(self.features_in * SE_RATIO))
    se = jnp.mean(x, axis=(1, 2))
    se = nn.swish(nn.Dense(squeezed, kernel_init=_conv_init, dtype=self.dtype,
                           name='se_reduce')(se))
    se = nn.sigmoid(nn.Dense(features, kernel_init=_conv_init, dtype=self.dtype,
                             name='se_expand')(se))
    x = x * se[:, None, None, :]

    x = batch_norm('project_bn')(conv1x1(self.features_out, 'project_conv')(x))
    if self.stride == 1 and self.features_in == self.features_out:
      # Stochastic depth ("drop connect"): drops whole samples' residual branches.
      x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = x + inputs
    return x


class EfficientNet(interface.Classifier):
  """EfficientNet (Tan & Le, 2019) at any width/depth coefficients.

  Takes uint8 (or [0, 255] float) RGB images; normalises them with the
  `batch_stats` variables `input_mean` / `input_std` (on the [0, 1] scale),
  initialised from `preprocessing` and overwritten by the weight converters
  with the source's own values. Layer names follow Keras applications.

  Attributes (besides `interface.Classifier`'s):
    width: channel multiplier (timm's channel_multiplier, Keras' width_coefficient).
    depth: repeats multiplier (depth_multiplier / depth_coefficient).
    dropout_rate: dropout before the head; Keras' rate for b0 by default.
    drop_connect_rate: stochastic-depth rate of the last block (linear from 0).
    preprocessing: key of PREPROCESSING, the input convention a fresh model starts with.
    bn_momentum: BatchNorm running-statistics momentum (torch's 0.1 is 0.9
      here, what timm fine-tunes with; Keras uses 0.99).
  """
  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  preprocessing: str = 'torch'
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    mean, std = PREPROCESSING[self.preprocessing]
    mean = self.variable('batch_stats', 'input_mean', lambda: jnp.asarray(mean, jnp.float32))
    std = self.variable('batch_stats', 'input_std', lambda: jnp.asarray(std, jnp.float32))
    x = (jnp.asarray(images, jnp.float32) / 255.0 - mean.value) / std.value
    x = x.astype(self.dtype)

    batch_norm = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum, epsilon=BN_EPSILON,
        axis_name=self.axis_name, dtype=self.dtype, name=name)
    x = nn.Conv(round_filters(32, self.width), (3, 3), strides=2, padding='SAME',
                use_bias=False, kernel_init=_conv_init, dtype=self.dtype, name='stem_conv',
                conv_general_dilated=onednn.conv_general_dilated)(x)
    x = nn.swish(batch_norm('stem_bn')(x))

    total = sum(round_repeats(stage[1], self.depth) for stage in STAGES)
    index = 0
    features_in = round_filters(32, self.width)
    for s, (kernel, repeats, stride, expand, channels) in enumerate(STAGES):
      features_out = round_filters(channels, self.width)
      for b in range(round_repeats(repeats, self.depth)):
        x = MBConv(features_in, features_out, kernel, stride if b == 0 else 1, expand,
                   self.drop_connect_rate * index / total, self.bn_momentum,
                   self.axis_name, self.dtype, name=block_name(s, b))(x, train=train)
        features_in = features_out
        index += 1

    x = nn.Conv(round_filters(1280, self.width), (1, 1), use_bias=False, kernel_init=_conv_init,
                dtype=self.dtype, name='top_conv', conv_general_dilated=pointwise.conv_general_dilated)(x)
    x = nn.swish(batch_norm('top_bn')(x))
    x = mark_features(self, x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=_head_init, dtype=self.dtype, name='head')(x)
    return jnp.asarray(x, jnp.float32)


# Our block layer -> timm's name, for the inverted-residual blocks and for the
# first stage's depthwise-separable blocks (no expansion, other numbering).
_TIMM_INVERTED = {'expand_conv': 'conv_pw', 'expand_bn': 'bn1', 'dwconv': 'conv_dw',
                  'bn': 'bn2', 'se_reduce': 'se.conv_reduce', 'se_expand': 'se.conv_expand',
                  'project_conv': 'conv_pwl', 'project_bn': 'bn3'}
_TIMM_SEPARABLE = {'dwconv': 'conv_dw', 'bn': 'bn1', 'se_reduce': 'se.conv_reduce',
                   'se_expand': 'se.conv_expand', 'project_conv': 'conv_pw', 'project_bn': 'bn2'}
_TIMM_TOP = {'stem_conv': 'conv_stem', 'stem_bn': 'bn1', 'top_conv': 'conv_head',
             'top_bn': 'bn2', 'head': 'classifier'}
_TIMM_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
            'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_KERAS_BN = (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'),
             ('batch_stats', 'var'))
_KERAS_BLOCK_LAYER = re.compile(
    r'(block\d+[a-z])_(expand_conv|expand_bn|dwconv|bn|se_reduce|se_expand|project_conv|project_bn)')


def _kind(layer: str) -> str:
  """'conv', 'bn', 'se' or 'dense', from our layer's name."""
  if layer.endswith('bn'):
    return 'bn'
  if layer.startswith('se_'):
    return 'se'
  return 'dense' if layer == 'head' else 'conv'


class _Variables:
  """Collects converted arrays into flax variables, refusing tensors of the wrong rank."""

  def __init__(self):
    self.flat: dict[tuple[str, ...], np.ndarray] = {}
    self.sources: dict[tuple[str, ...], str] = {}  # our path -> the file's tensor

  def put(self, source: str, path: tuple[str, ...], value: np.ndarray, rank: int,
          transform=lambda value: value) -> None:
    """Stores transform(value) at path, once `source`'s rank is checked."""
    value = np.asarray(value)
    if value.ndim != rank:
      raise ValueError(f'tensor {source} has shape {value.shape}; expected {rank} dimensions')
    self.flat[path] = np.asarray(transform(value), np.float32)
    self.sources[path] = source

  def input_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
    self.flat[('batch_stats', 'input_mean')] = np.asarray(mean, np.float32).reshape(3)
    self.flat[('batch_stats', 'input_std')] = np.asarray(std, np.float32).reshape(3)

  def result(self, coefficients: tuple[float, float] | None,
             source_of: Callable[[tuple[str, ...]], str]) -> dict[str, Any]:
    """The variables; checked against EfficientNet(width, depth) = `coefficients` if given.

    `source_of` names the file's tensor for one of our paths the file lacks.
    """
    if coefficients is not None:
      head = self.flat.get(('params', 'head', 'kernel'))
      if head is None:
        raise ValueError(f'The weights lack {source_of(("params", "head", "kernel"))}, the '
                         'classifier.')
      width, depth = coefficients
      module = EfficientNet(num_classes=head.shape[-1], width=width, depth=depth)
      template = traverse_util.flatten_dict(variable_shapes(module))
      for path, shape in template.items():
        where = '/'.join(path)
        if path not in self.flat:
          raise ValueError(f'The weights lack {source_of(path)} (for {where} {shape.shape}).')
        if self.flat[path].shape != shape.shape:
          raise ValueError(f'{self.sources.get(path, where)} has shape {self.flat[path].shape} in '
                           f'flax layout; EfficientNet(width={width}, depth={depth}) needs '
                           f'{shape.shape} for {where}.')
      for path in self.flat.keys() - template.keys():
        raise ValueError(f'The weights hold {self.sources[path]}, which EfficientNet('
                         f'width={width}, depth={depth}) does not have.')
    return traverse_util.unflatten_dict(self.flat)


def variable_shapes(module: EfficientNet) -> dict[str, Any]:
  """The module's variables as shapes only (no compute)."""
  return jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3), jnp.uint8),
      train=False))


# Our (collection, leaf) -> timm's leaf name, and Keras' index in the layer.
_TIMM_LEAVES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias',
                ('params', 'scale'): 'weight', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}
_KERAS_INDEX = {('params', 'kernel'): 0, ('params', 'scale'): 0, ('params', 'bias'): 1,
                ('batch_stats', 'mean'): 2, ('batch_stats', 'var'): 3}


def _timm_source(path: tuple[str, ...]) -> str:
  """timm's name for our variable path."""
  collection, *layers, leaf = path
  if len(layers) == 1:
    module = _TIMM_TOP[layers[0]]
  else:
    block, layer = layers
    stage, index = int(block[5:-1]) - 1, ord(block[-1]) - ord('a')
    table = _TIMM_SEPARABLE if STAGES[stage][3] == 1 else _TIMM_INVERTED
    module = f'blocks.{stage}.{index}.{table[layer]}'
  return f'{module}.{_TIMM_LEAVES[(collection, leaf)]}'


def _keras_source(path: tuple[str, ...]) -> str:
  """Keras' `layer/index` for our variable path."""
  collection, *layers, leaf = path
  layer = 'predictions' if layers == ['head'] else '_'.join(layers)
  return f'{layer}/{_KERAS_INDEX[(collection, leaf)]}'


def _timm_layer(module: str, arrays: Mapping[str, np.ndarray]) -> tuple[str, ...] | None:
  """timm module path ('blocks.1.0.conv_pw') -> our layer path, None if not ours."""
  for ours, theirs in _TIMM_TOP.items():
    if module == theirs:
      return (ours,)
  match = re.fullmatch(r'blocks\.(\d+)\.(\d+)\.(.+)', module)
  if not match:
    return None
  stage, index, rest = int(match[1]), int(match[2]), match[3]
  inverted = f'blocks.{stage}.{index}.conv_pwl.weight' in arrays
  table = _TIMM_INVERTED if inverted else _TIMM_SEPARABLE
  for ours, theirs in table.items():
    if rest == theirs:
      return (block_name(stage, index), ours)
  return None


def convert_timm(arrays: Mapping[str, np.ndarray], preprocessing: str = 'torch',
                 coefficients: tuple[float, float] | None = None) -> dict[str, Any]:
  """timm `tf_efficientnet_b*` state dict (numpy) -> flax variables.

  `preprocessing` names the checkpoint's input convention (PREPROCESSING):
  'torch' for timm's tf_efficientnet_b*.{in1k, aa_in1k, ns_jft_in1k}, 'tf'
  for .ap_in1k; timm's files do not record it (its pretrained_cfg does).
  With `coefficients` (width, depth), raises ValueError naming the first
  tensor that EfficientNet lacks, has in another shape, or does not have.
  """
  out = _Variables()
  for key, value in arrays.items():
    module, _, leaf = key.rpartition('.')
    path = _timm_layer(module, arrays)
    if path is None:
      raise ValueError(f'unexpected tensor {key}: not part of a timm tf_efficientnet')
    kind = _kind(path[-1])
    if kind == 'bn':
      if leaf == 'num_batches_tracked':
        continue
      if leaf not in _TIMM_BN:
        raise ValueError(f'unexpected tensor {key}')
      collection, name = _TIMM_BN[leaf]
      out.put(key, (collection, *path, name), value, 1)
    elif leaf == 'bias' and kind in ('se', 'dense'):
      out.put(key, ('params', *path, 'bias'), value, 1)
    elif leaf == 'weight' and kind == 'conv':
      out.put(key, ('params', *path, 'kernel'), value, 4, lambda w: w.transpose(2, 3, 1, 0))
    elif leaf == 'weight' and kind == 'se':
      out.put(key, ('params', *path, 'kernel'), value, 4, lambda w: w[:, :, 0, 0].T)
    elif leaf == 'weight' and kind == 'dense':
      out.put(key, ('params', *path, 'kernel'), value, 2, lambda w: w.T)
    else:
      raise ValueError(f'unexpected tensor {key}')
  out.input_stats(*PREPROCESSING[preprocessing])
  return out.result(coefficients, _timm_source)


def keras_input_stats(mean: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Keras EfficientNet's input normalisation as (mean, std) on RGB / 255.

  Keras computes (x/255 - mean) / max(sqrt(variance), 1e-7), and when built
  with weights='imagenet' multiplies by 1/sqrt(IMAGENET_STD) on top, because
  its ImageNet files store the standard deviation as the variance. A file does
  not say how its model was built; statistics equal to those files' are taken
  as that model's (the one keras.applications gives for weights='imagenet').
  """
  mean = np.asarray(mean, np.float64)
  variance = np.asarray(variance, np.float64)
  std = np.maximum(np.sqrt(variance), 1e-7)
  if np.allclose(mean, IMAGENET_MEAN, atol=1e-6) and np.allclose(variance, IMAGENET_STD,
                                                                   atol=1e-6):
    std = std * np.sqrt(IMAGENET_STD)
  return mean, std


def _keras_layer(layer: str) -> tuple[str, ...] | None:
  """Keras layer name -> our layer path, None if not ours."""
  if layer == 'predictions':
    return ('head',)
  if layer in ('stem_conv', 'stem_bn', 'top_conv', 'top_bn'):
    return (layer,)
  if match := _KERAS_BLOCK_LAYER.fullmatch(layer):
    return (match[1], match[2])
  return None


def convert_keras(arrays: Mapping[str, np.ndarray],
                  coefficients: tuple[float, float] | None = None) -> dict[str, Any]:
  """Keras applications EfficientNetB* weights (`keras_h5.read_keras_h5`) -> flax variables.

  With `coefficients` (width, depth), checked as `convert_timm` says.
  """
  layers: dict[str, dict[int, np.ndarray]] = {}
  for key, value in arrays.items():
    layer, _, index = key.rpartition('/')
    layers.setdefault(layer, {})[int(index)] = value
  # Keras names it 'normalization', 'normalization_1', ... by how many exist in its session.
  normalization = [layer for layer in layers if re.fullmatch(r'normalization(_\d+)?', layer)]
  if len(normalization) != 1:
    raise ValueError('expected one Normalization layer (mean, variance, count) in a Keras '
                     f'EfficientNet; found {normalization or "none"}')
  out = _Variables()
  for layer, weights in layers.items():
    path = ('input',) if layer in normalization else _keras_layer(layer)
    if path is None:
      raise ValueError(f'unexpected tensor {layer}/0: layer {layer} is not part of a Keras '
                       'EfficientNet')
    kind = 'input' if layer in normalization else _kind(path[-1])
    expected = {'input': 3, 'bn': 4, 'se': 2, 'dense': 2, 'conv': 1}[kind]
    for i in range(expected):
      if i not in weights:
        raise ValueError(f'missing tensor {layer}/{i}')
    if extra := sorted(set(weights) - set(range(expected))):
      raise ValueError(f'unexpected tensor {layer}/{extra[0]}')
    name = lambda i, layer=layer: f'{layer}/{i}'
    if kind == 'input':
      out.input_stats(*keras_input_stats(weights[0], weights[1]))
    elif kind == 'bn':
      for i, (collection, leaf) in enumerate(_KERAS_BN):
        out.put(name(i), (collection, *path, leaf), weights[i], 1)
    elif kind == 'conv':
      # Keras' depthwise kernels are (k, k, C, 1); flax's grouped ones (k, k, 1, C).
      transform = (lambda w: w.transpose(0, 1, 3, 2)) if path[-1] == 'dwconv' else (lambda w: w)
      out.put(name(0), ('params', *path, 'kernel'), weights[0], 4, transform)
    else:  # the head, or squeeze-excitation: 1x1 convolutions in Keras, Dense here
      rank, transform = (2, lambda w: w) if kind == 'dense' else (4, lambda w: w[0, 0])
      out.put(name(0), ('params', *path, 'kernel'), weights[0], rank, transform)
      out.put(name(1), ('params', *path, 'bias'), weights[1], 1)
  return out.result(coefficients, _keras_source)


def build(size: str, model_config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None) -> EfficientNet:
  del steps_per_epoch  # torch's momentum suits fine-tuning whatever the epoch length
  width, depth, _ = SIZES[size]
  return EfficientNet(num_classes=num_classes, width=width, depth=depth,
                      dropout_rate=model_config.get('dropout_rate', 0.2),
                      drop_connect_rate=model_config.get('drop_connect_rate', 0.2),
                      bn_momentum=interface.bn_momentum(model_config, 0.9),
                      dtype=jnp.dtype(model_config.get('dtype', 'float32')))


def check(config: ml_collections.ConfigDict) -> None:
  interface.check_min_image_size(config, MIN_IMAGE_SIZE, 'EfficientNet', 'five stride-2 stages')


def spec(size: str) -> interface.ModelSpec:
  """The registry entry of one size: timm `.safetensors`, Keras `.h5` / `.weights.h5`."""
  coefficients = SIZES[size][:2]
  return interface.ModelSpec(
      build=functools.partial(build, size), check=check,
      converters={'safetensors': functools.partial(convert_timm, coefficients=coefficients),
                  'h5': functools.partial(convert_keras, coefficients=coefficients)})
