"""Interchangeable lowerings of the seed model's convolution and pooling.

XLA:CPU runs a stride-1 VALID convolution and the select-and-scatter
gradient of `max_pool` far below the machine's matmul speed, while other
formulations of the same maths run much faster. Each lowering here computes
exactly what `nn.Conv(padding='VALID')` / `nn.max_pool` compute (up to float
rounding) and creates the same parameters, so checkpoints move freely between
them; only speed differs, and which is fastest depends on the platform.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from melanoma_jax import runtime
from melanoma_jax.models import onednn, pointwise

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# Below this many input channels `_weight_grad`'s copies cost more than they save.
_MIN_MATMUL_CHANNELS = 8


def _native_conv(lhs, rhs):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID', dimension_numbers=_NHWC)


def _padded_conv(lhs, rhs):
  """A zero-padded convolution, cropped back to VALID.

  XLA:CPU's convolution library has a fast path for padded convolutions
  that a VALID one misses; the two padded columns cost ~1% more FLOPs.
  """
  y = lax.conv_general_dilated(lhs, rhs, (1, 1), ((0, 0), (1, 1)), dimension_numbers=_NHWC)
  return y[:, :, 1:-1]


def _weight_grad(lhs, g, kh, kw):
  """The kernel gradient of a VALID convolution as one matmul.

  XLA:CPU computes it as a convolution whose window is the whole output
  gradient, after transposing both operands: without `runtime`'s XLA flags,
  the slowest part of the step. Here the kw width taps of the input and the kh height shifts of the
  output gradient go into channels (cheap copies), and
  dW[(i, f), (j, c)] = sum over (n, h, w) of rows[.., (i, f)] * cols[.., (j, c)].
  """
  h, w, f = g.shape[1:]
  c = lhs.shape[-1]
  cols = jnp.concatenate([lhs[:, :, j:j + w] for j in range(kw)], axis=-1)
  rows = jnp.concatenate(
      [jnp.pad(g, ((0, 0), (i, kh - 1 - i), (0, 0), (0, 0))) for i in range(kh)], axis=-1)
  dw = rows.reshape(-1, kh * f).T @ cols.reshape(-1, kw * c)
  return dw.reshape(kh, f, kw, c).transpose(0, 2, 3, 1)


@jax.custom_vjp
def _mixed_conv(lhs, rhs):
  """`_padded_conv` forward; backward by `_mixed_bwd`."""
  return _padded_conv(lhs, rhs)


def _mixed_fwd(lhs, rhs):
  return _padded_conv(lhs, rhs), (lhs, rhs)


def _mixed_bwd(residuals, g):
  """XLA's input gradient (a padded convolution, already fast) and `_weight_grad`.

  With few input channels (RGB images) XLA's own kernel gradient is faster.
  """
  lhs, rhs = residuals
  kh, kw, c, _ = rhs.shape
  native_vjp = jax.vjp(_native_conv, lhs, rhs)[1]
  if c < _MIN_MATMUL_CHANNELS:
    return native_vjp(g)
  return native_vjp(g)[0], _weight_grad(lhs, g, kh, kw)


_mixed_conv.defvjp(_mixed_fwd, _mixed_bwd)


def _onednn_conv(lhs, rhs):
  """oneDNN's kernels, Keras' on x86 (`onednn.conv`), where they run (float32); else `padded`."""
  return onednn.conv(lhs, rhs) if onednn.runs(lhs, rhs) else _padded_conv(lhs, rhs)


def _native_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _quarters(x):
  """The four positions of every 2x2 window of an even-sided `x`, as four strided slices."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


def _max_of_quarters(x):
  h, w = x.shape[1:3]
  a, b, c, d = _quarters(x[:, :h // 2 * 2, :w // 2 * 2])
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


@jax.custom_vjp
def _strided_pool(x):
  """2x2 max as the elementwise maximum of the window's four strided slices.

  Forward and backward are each one or two elementwise passes, instead of
  XLA's select-and-scatter gradient or a reshape and reduction (which
  XLA:CPU runs several times slower). Where a window holds tied maxima the
  gradient is shared equally among them (as `jnp.max`'s) rather than given
  to the first; in the seed model ties only occur among ReLU zeros (and
  their BatchNorm images), whose gradient the ReLU zeroes, so parameter
  gradients agree.
  """
  return _max_of_quarters(x)


def _strided_pool_fwd(x):
  y = _max_of_quarters(x)
  return y, (x, y)


def _strided_pool_bwd(residuals, g):
  x, y = residuals
  h, w = y.shape[1] * 2, y.shape[2] * 2
  even = x[:, :h, :w]
  ties = sum((q == y).astype(g.dtype) for q in _quarters(even))
  up = lambda v: jnp.repeat(jnp.repeat(v, 2, axis=1), 2, axis=2)
  dx = jnp.where(even == up(y), up(g / ties), 0)
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - h), (0, x.shape[2] - w), (0, 0))),)


_strided_pool.defvjp(_strided_pool_fwd, _strided_pool_bwd)


# Each lowering: (convolution, 2x2 max pooling).
LOWERINGS: dict[str, tuple[Callable[..., jax.Array], Callable[[jax.Array], jax.Array]]] = {
    # Exactly nn.Conv / nn.max_pool: the reference, and what accelerators run best.
    'native': (_native_conv, _native_pool),
    # A padded forward, differentiated by XLA: fastest on CPU with
    # `runtime`'s XLA flags.
    'padded': (_padded_conv, _strided_pool),
    # A padded forward and a matmul kernel gradient: fastest on CPU without
    # them (XLA's own kernel gradient is then the slowest part of the step).
    'mixed': (_mixed_conv, _strided_pool),
    # oneDNN's convolutions called from XLA (optional wheels, CPU only).
    'onednn': (_onednn_conv, _strided_pool),
}


def resolve(conv_impl: str) -> str:
  """The lowering `conv_impl` names; 'auto' picks the fastest for this platform."""
  if conv_impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    if not onednn.unavailable_reason():
      return 'onednn'
    return 'padded' if runtime.cpu_flags_active() else 'mixed'
  if conv_impl not in LOWERINGS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; choose auto or one of {sorted(LOWERINGS)}.')
  if conv_impl == 'onednn' and (jax.default_backend() != 'cpu' or onednn.unavailable_reason()):
    raise ValueError("conv_impl='onednn' runs only on a CPU with oneDNN available: "
                     f'{onednn.unavailable_reason() or f"this run is on {jax.default_backend()}"}')
  return conv_impl


def conv_general_dilated(conv_impl: str) -> Callable[..., jax.Array]:
  """A `lax.conv_general_dilated` stand-in for `nn.Conv(conv_general_dilated=...)`.

  Handles what the seed model uses (2-D, NHWC/HWIO, stride 1, VALID, no
  dilation, groups or precision override) and refuses anything else rather
  than silently computing something different.
  """
  impl = LOWERINGS[resolve(conv_impl)][0]

  def conv(lhs, rhs, window_strides: Sequence[int], padding: Any,
           lhs_dilation: Sequence[int] | None = None,
           rhs_dilation: Sequence[int] | None = None,
           dimension_numbers: Any = None, feature_group_count: int = 1,
           precision: Any = None, **unsupported) -> jax.Array:
    plain = pointwise.is_plain_nhwc(lhs, rhs, dimension_numbers, feature_group_count, lhs_dilation,
                                    rhs_dilation)
    if not plain or tuple(window_strides) != (1, 1) or padding != 'VALID' or precision is not None or unsupported:
      raise NotImplementedError(
          f'conv_impl={conv_impl!r} lowers only 2-D NHWC stride-1 VALID convolutions.')
    return impl(lhs, rhs)

  return conv


def max_pool_2x2(x: jax.Array, conv_impl: str) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))`, lowered as `conv_impl` says."""
  return LOWERINGS[resolve(conv_impl)][1](x)


class _OnednnConvReLU(nn.Module):
  """`relu(nn.Conv(features, (3, 3), padding='VALID')(x))` as one oneDNN call
  (`onednn.conv_bias_relu`), with nn.Conv's parameters and initialisers."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.linear.default_kernel_init, (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    return onednn.conv_bias_relu(x, kernel, bias)


def conv_relu(features: int, conv_impl: str, dtype: Any, name: str) -> Callable[[jax.Array], jax.Array]:
  """`relu(nn.Conv(features, (3, 3), padding='VALID', dtype=dtype, name=name)(x))`, lowered as
  `conv_impl` says; the same parameters whichever lowering runs."""
  if resolve(conv_impl) == 'onednn' and onednn.runs(np.empty(0, dtype)):
    return _OnednnConvReLU(features, name=name)
  conv = nn.Conv(features, (3, 3), padding='VALID', dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated(conv_impl))
  return lambda x: nn.relu(conv(x))
