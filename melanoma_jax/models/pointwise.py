"""1x1 convolutions as matrix multiplications, for `nn.Conv(conv_general_dilated=...)`.

XLA:CPU computes the kernel gradient of a 1x1 convolution as a convolution
whose features are the batch: it first transposes the layer's input, fused
with whatever produced it (BatchNorm, residual sum, activation), and that
transposing fusion runs far slower than the matmul it feeds; in ResNet-50 it
was most of the training step (README, Speed). As a matrix multiplication of
the (strided) pixels the same gradient is one plain matmul. The function and
the parameters are nn.Conv's, so checkpoints and weight converters are
unchanged; on GPU and TPU, where convolutions are served well, XLA gets the
convolution as written.
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def is_plain_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, feature_group_count: int,
                  lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None) -> bool:
  """Whether a convolution is 2-D NHWC/HWIO, without dilation or groups: what the CPU lowerings take."""
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (lhs.ndim == 4 and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
          and feature_group_count == 1
          and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None, **unsupported) -> jax.Array:
  """`lax.conv_general_dilated` of a 1x1 NHWC kernel; a strided slice and one matmul on CPU.

  Refuses what a 1x1 convolution of nn.Conv's layout does not need (padding,
  dilation, groups) rather than silently computing something else.
  """
  zero_padding = padding in ('SAME', 'VALID') or all(tuple(pair) == (0, 0) for pair in padding)
  if (not is_plain_nhwc(lhs, rhs, dimension_numbers, feature_group_count, lhs_dilation, rhs_dilation)
      or rhs.shape[:2] != (1, 1) or not zero_padding or unsupported):
    raise NotImplementedError('pointwise.conv_general_dilated takes only 1x1 NHWC kernels, '
                              'without padding, dilation or groups.')
  if jax.default_backend() != 'cpu':
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    preferred_element_type=preferred_element_type)
  # A 1x1 kernel's 'SAME' and 'VALID' outputs are both the pixels at multiples of the stride.
  x = lhs[:, ::window_strides[0], ::window_strides[1], :]
  n, h, w, c = x.shape
  y = lax.dot(x.reshape(n * h * w, c), rhs.reshape(c, -1), precision=precision,
              preferred_element_type=preferred_element_type)
  return y.reshape(n, h, w, -1)
