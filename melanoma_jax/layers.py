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

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _native_conv(lhs, rhs, precision):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID', dimension_numbers=_NHWC,
                                  precision=precision)


def _padded_conv(lhs, rhs, precision):
  """A zero-padded convolution, cropped back to VALID.

  XLA:CPU's convolution library has a fast path for padded convolutions
  that a VALID one misses; the two padded columns cost ~1% more FLOPs.
  """
  y = lax.conv_general_dilated(lhs, rhs, (1, 1), ((0, 0), (1, 1)),
                               dimension_numbers=_NHWC, precision=precision)
  return y[:, :, 1:-1]


def _im2col_conv(lhs, rhs, precision):
  """One matmul over all kernel taps at once: patches [.., kh*kw*C] @ [kh*kw*C, F]."""
  kh, kw, c, f = rhs.shape
  h, w = lhs.shape[1] - kh + 1, lhs.shape[2] - kw + 1
  patches = jnp.concatenate(
      [lhs[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum('nhwk,kf->nhwf', patches, rhs.reshape(kh * kw * c, f),
                    precision=precision)


def _weight_grad(lhs, g, kh, kw):
  """The kernel gradient of a VALID convolution as kh matmuls.

  XLA:CPU computes it as a convolution whose window is the whole output
  gradient, after transposing both operands: the slowest part of the step.
  Here the width taps are concatenated into channels once ([.., kw*C], a
  cheap copy) and each kernel row is g^T @ (a height-shifted slice of that).
  """
  f = g.shape[-1]
  h, w = g.shape[1:3]
  c = lhs.shape[-1]
  cols = jnp.concatenate([lhs[:, :, j:j + w] for j in range(kw)], axis=-1)
  g = g.reshape(-1, f).T
  rows = jnp.stack([g @ cols[:, i:i + h].reshape(-1, kw * c) for i in range(kh)])
  return rows.reshape(kh, f, kw, c).transpose(0, 2, 3, 1)


@jax.custom_vjp
def _mixed_conv(lhs, rhs):
  return _padded_conv(lhs, rhs, None)


def _mixed_fwd(lhs, rhs):
  return _padded_conv(lhs, rhs, None), (lhs, rhs)


def _mixed_bwd(residuals, g):
  """XLA's input gradient (a padded convolution, already fast) and `_weight_grad`."""
  lhs, rhs = residuals
  _, input_vjp = jax.vjp(lambda x: _native_conv(x, rhs, None), lhs)
  return input_vjp(g)[0], _weight_grad(lhs, g, *rhs.shape[:2])


_mixed_conv.defvjp(_mixed_fwd, _mixed_bwd)


CONV_IMPLS: dict[str, Callable[..., jax.Array]] = {
    'native': _native_conv,
    'padded': _padded_conv,
    'im2col': _im2col_conv,
    'mixed': lambda lhs, rhs, precision: _mixed_conv(lhs, rhs),
}


def _native_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _reshape_pool(x):
  """2x2 max as a reshape and a reduction.

  Its gradient is an elementwise mask instead of XLA's select-and-scatter.
  Where a window holds tied maxima the gradient is split among them rather
  than given to the first; in the seed model ties only occur among ReLU
  zeros, whose upstream gradient is zero, so parameter gradients agree.
  """
  n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


POOL_IMPLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'native': _native_pool,
    'reshape': _reshape_pool,
}

# What `auto` resolves to, per platform: accelerators get the native ops
# that cuDNN / the TPU compiler serve well.
_AUTO = {'cpu': ('padded', 'reshape')}
_ACCELERATOR = ('native', 'native')


def resolve(conv_impl: str) -> tuple[str, str]:
  """(convolution, pooling) lowering names for `conv_impl` on this platform."""
  if conv_impl == 'auto':
    return _AUTO.get(jax.default_backend(), _ACCELERATOR)
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; choose auto or one of {sorted(CONV_IMPLS)}.')
  return conv_impl, 'native' if conv_impl == 'native' else 'reshape'


def conv_general_dilated(conv_impl: str) -> Callable[..., jax.Array]:
  """A `lax.conv_general_dilated` stand-in for `nn.Conv(conv_general_dilated=...)`.

  Handles what the seed model uses (2-D, NHWC/HWIO, stride 1, VALID,
  no dilation or groups) and refuses anything else rather than silently
  computing something different.
  """
  impl = CONV_IMPLS[resolve(conv_impl)[0]]

  def conv(lhs, rhs, window_strides: Sequence[int], padding: Any,
           lhs_dilation: Sequence[int] | None = None,
           rhs_dilation: Sequence[int] | None = None,
           dimension_numbers: Any = None, feature_group_count: int = 1,
           precision: Any = None, **unused) -> jax.Array:
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (lhs.ndim != 4 or dn != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        or tuple(window_strides) != (1, 1) or padding != 'VALID' or feature_group_count != 1
        or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or unused):
      raise NotImplementedError(
          f'conv_impl={conv_impl!r} lowers only 2-D NHWC stride-1 VALID convolutions.')
    return impl(lhs, rhs, precision)

  return conv


def max_pool_2x2(x: jax.Array, conv_impl: str) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` in the lowering `conv_impl` implies."""
  return POOL_IMPLS[resolve(conv_impl)[1]](x)
