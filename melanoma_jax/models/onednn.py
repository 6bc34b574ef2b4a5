"""oneDNN convolutions inside XLA:CPU programs (seed `conv_impl='onednn'`, the backbones' KxK convolutions).

XLA:CPU runs convolutions with Eigen; TensorFlow (Keras) runs them with
oneDNN, whose forward passes and input gradients beat Eigen's, and whose
kernel gradients take about half Eigen's time on CPUs with AVX-512 (below
it XLA computes those: `_kernel_grad_by_xla`). jaxlib's PyPI builds do not
route convolutions to oneDNN, so `onednn_conv.cc` wraps oneDNN's three
convolution primitives as XLA FFI handlers, which a jitted step calls on
XLA's own buffers.

Optional: it needs Intel's oneDNN wheels (`pip install -e '.[onednn]'`) and
a C++ compiler (`g++`, or `$CXX`). The handlers are compiled once per
source, oneDNN and jaxlib version into `$XDG_CACHE_HOME/melanoma_jax`
(`~/.cache/melanoma_jax`), a few seconds, never at import.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from melanoma_jax.models import pointwise

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'onednn_conv.cc')
_TARGETS = {'forward': 'MjOnednnConvForward', 'backward_data': 'MjOnednnConvBackwardData',
            'backward_weights': 'MjOnednnConvBackwardWeights',
            'forward_bias_relu': 'MjOnednnConvForwardBiasReLU',
            'backward_weights_bias': 'MjOnednnConvBackwardWeightsBias'}
_PREFIX = 'melanoma_jax_onednn_'
INSTALL_HINT = "pip install -e '.[onednn]' (Intel's oneDNN wheels) and a C++ compiler (g++ or $CXX)"


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be used in this environment; the message says why."""


def _installed_file(distribution: str, name: str) -> str:
  """The absolute path of `name` (a file name, e.g. 'dnnl.hpp') in an installed distribution."""
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise Unavailable(f'{distribution} is not installed: {INSTALL_HINT}.') from e
  for file in dist.files or ():
    if file.name == name:
      return os.path.realpath(dist.locate_file(file))
  raise Unavailable(f'{distribution} {dist.version} has no {name}; reinstall it: {INSTALL_HINT}.')


def _cache_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'melanoma_jax')


def _build(library_dir: str, include_dirs: list[str], key: str) -> str:
  """Compiles `onednn_conv.cc` into the cache (once per `key`); returns the shared library's path."""
  path = os.path.join(_cache_dir(), f'onednn_conv-{key}.so')
  if os.path.exists(path):
    return path
  compiler = os.environ.get('CXX', 'g++')
  if not shutil.which(compiler):
    raise Unavailable(f'no C++ compiler ({compiler!r}) to build {_SOURCE}: {INSTALL_HINT}.')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Built beside its final name and renamed: processes building at once never load half a file.
  fd, partial = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', _SOURCE, '-o', partial,
             *(f'-I{d}' for d in include_dirs), f'-L{library_dir}', '-ldnnl',
             f'-Wl,--disable-new-dtags,-rpath,{library_dir}']
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    os.unlink(partial)
    raise Unavailable(f'building {_SOURCE} failed ({" ".join(command)}):\n{result.stderr[-2000:]}')
  os.replace(partial, path)
  return path


@functools.cache
def _load() -> ctypes.CDLL:
  """Builds (if needed) and loads the handlers and registers them with XLA, once per process."""
  libdnnl = _installed_file('onednn', 'libdnnl.so')
  header = _installed_file('onednn-devel', 'dnnl.hpp')
  os.environ.setdefault('ONEDNN_VERBOSE', '0')  # its own error lines; the reason comes back below
  # oneDNN's PyPI build reaches the CPU through SYCL's OpenCL CPU runtime, which
  # the OpenCL loader finds only when told where it is.
  try:
    os.environ.setdefault('OCL_ICD_FILENAMES', _installed_file('intel-opencl-rt', 'libintelocl.so'))
  except Unavailable:
    pass  # a oneDNN build without SYCL; the check below says whether it runs
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  versions = f'{importlib.metadata.version("onednn")} {jax.__version__} {jax.lib.__version__}'
  key = hashlib.sha256(source + versions.encode()).hexdigest()[:16]
  path = _build(os.path.dirname(libdnnl), [os.path.dirname(header), jax.ffi.include_dir()], key)
  library = ctypes.cdll.LoadLibrary(path)
  error = ctypes.create_string_buffer(1024)
  if library.MjOnednnCheck(error, len(error)):
    raise Unavailable(f'oneDNN cannot run a convolution on this machine: {error.value.decode()}')
  for op, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(_PREFIX + op, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """None where `conv` can run here; otherwise why not, and what to install (logged once)."""
  try:
    _load()
  except Unavailable as e:
    logging.getLogger(__name__).info(
        'oneDNN convolutions unavailable, so convolutions run on XLA\'s own CPU kernels (slower '
        'to train): %s', e)
    return str(e)
  return None


@functools.cache
def implementations(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: tuple[int, int],
                    padding: tuple[tuple[int, int], tuple[int, int]], fused: bool = False) -> tuple[str, ...]:
  """oneDNN's names for the kernels it runs for one layer: forward, input gradient, kernel gradient.

  Each name ends with the instruction set it uses, e.g. 'brg_conv_fwd:avx2'.
  """
  (top, bottom), (left, right) = padding
  key = (*x_shape, *kernel_shape[:2], kernel_shape[3], x_shape[3] // kernel_shape[2], *strides,
         top, bottom, left, right, int(fused))
  names = ctypes.create_string_buffer(1024)
  if _load().MjOnednnImplementations((ctypes.c_int64 * len(key))(*key), names, len(names)):
    raise Unavailable(f'oneDNN has no convolution for input {x_shape} and kernel {kernel_shape}: '
                      f'{names.value.decode()}')
  return tuple(names.value.decode().split())


def _kernel_grad_by_xla(x, kernel, strides, padding, fused) -> bool:
  """Whether XLA computes this layer's kernel gradient faster than oneDNN.

  oneDNN's AVX-512 kernel gradients take about half Eigen's time; without
  AVX-512 it falls back to kernels (AVX2 direct, or im2col and a matrix
  product) slower than XLA's. Grouped (depthwise) kernels stay with oneDNN.
  """
  return (kernel.shape[2] == x.shape[3]
          and 'avx512' not in implementations(x.shape, kernel.shape, strides, padding, fused)[2])


def _xla_kernel_grad(x, kernel, strides, padding, dy) -> jax.Array:
  conv = lambda k: lax.conv_general_dilated(x, k, strides, padding,
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.vjp(conv, kernel)[1](dy)[0]


def _call(op: str, shapes: Sequence[tuple[int, ...]], geometry: dict[str, np.int64],
          *operands: jax.Array) -> list[jax.Array]:
  # Inside shard_map the results vary over the mesh axes their operands vary over.
  results = [jax.typeof(operands[0]).update(shape=shape) for shape in shapes]
  return jax.ffi.ffi_call(_PREFIX + op, results)(*operands, **geometry)


def _geometry(strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
              ) -> dict[str, np.int64]:
  (top, bottom), (left, right) = padding
  return {name: np.int64(value) for name, value in zip(
      ('stride_h', 'stride_w', 'pad_top', 'pad_bottom', 'pad_left', 'pad_right'),
      (*strides, top, bottom, left, right))}


def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int] = (1, 1),
         padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """`lax.conv_general_dilated(x, kernel, strides, padding)` for float32 NHWC x and HWIO kernel.

  `padding` is explicit (low, high) pairs; a kernel of `c / g` input channels
  makes `g` groups (depthwise: `c` groups). Inside shard_map an invariant
  kernel is marked varying like the images first, as XLA's own convolution
  does, so its gradient is summed over the devices the same way.
  """
  return _conv(*_varying_alike(x, kernel), strides, padding)


def conv_bias_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, strides: tuple[int, int] = (1, 1),
                   padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """`relu(conv(x, kernel, strides, padding) + bias)` in one oneDNN pass.

  The bias and ReLU are applied as the convolution writes its output, and
  the bias gradient is computed with the kernel gradient: two passes over
  the activation fewer each way than the three operations apart.
  """
  return _conv_bias_relu(*_varying_alike(x, kernel, bias), strides, padding)


def _varying_alike(*arrays: jax.Array) -> list[jax.Array]:
  """Loads the handlers; inside shard_map, marks all `arrays` varying over every axis one varies over."""
  _load()
  varying = functools.reduce(lambda a, b: a | b, (jax.typeof(a).manual_axis_type.varying for a in arrays))
  return [lax.pcast(a, tuple(varying - jax.typeof(a).manual_axis_type.varying), to='varying')
          if varying - jax.typeof(a).manual_axis_type.varying else a for a in arrays]


def _output_shape(x, kernel, strides, padding) -> tuple[int, ...]:
  n, h, w, _ = x.shape
  kh, kw, _, features = kernel.shape
  (top, bottom), (left, right) = padding
  return (n, (h + top + bottom - kh) // strides[0] + 1, (w + left + right - kw) // strides[1] + 1,
          features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _call('forward', [_output_shape(x, kernel, strides, padding)], _geometry(strides, padding),
               x, kernel)[0]


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  geometry = _geometry(strides, padding)
  if _kernel_grad_by_xla(x, kernel, strides, padding, False):
    dkernel = _xla_kernel_grad(x, kernel, strides, padding, dy)
  else:
    dkernel = _call('backward_weights', [kernel.shape], geometry, x, kernel, dy)[0]
  return _call('backward_data', [x.shape], geometry, x, kernel, dy)[0], dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_bias_relu(x, kernel, bias, strides, padding):
  return _call('forward_bias_relu', [_output_shape(x, kernel, strides, padding)],
               _geometry(strides, padding), x, kernel, bias)[0]


def _conv_bias_relu_fwd(x, kernel, bias, strides, padding):
  y = _conv_bias_relu(x, kernel, bias, strides, padding)
  return y, (x, kernel, y)


def _conv_bias_relu_bwd(strides, padding, residuals, dy):
  x, kernel, y = residuals
  geometry = _geometry(strides, padding)
  dz = jnp.where(y > 0, dy, 0)  # ReLU's gradient, 0 at 0 as jax.nn.relu's
  if _kernel_grad_by_xla(x, kernel, strides, padding, True):
    dkernel, dbias = _xla_kernel_grad(x, kernel, strides, padding, dz), dz.sum((0, 1, 2))
  else:
    dkernel, dbias = _call('backward_weights_bias', [kernel.shape, kernel.shape[-1:]], geometry,
                           x, kernel, dz)
  return _call('backward_data', [x.shape], geometry, x, kernel, dz)[0], dkernel, dbias


_conv_bias_relu.defvjp(_conv_bias_relu_fwd, _conv_bias_relu_bwd)


def runs(*arrays: jax.Array) -> bool:
  """Whether `conv` runs for these operands here: float32, on a CPU with oneDNN available."""
  return (jax.default_backend() == 'cpu' and all(a.dtype == np.float32 for a in arrays)
          and unavailable_reason() is None)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: oneDNN where it can run.

  That is a float32 2-D NHWC/HWIO convolution without dilation (grouped or
  not) on a CPU with oneDNN available; anything else goes to XLA as written.
  """
  if (runs(lhs, rhs) and precision is None and preferred_element_type is None
      and pointwise.is_plain_nhwc(lhs, rhs, dimension_numbers, 1, lhs_dilation, rhs_dilation)):
    pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            if isinstance(padding, str) else padding)
    return conv(lhs, rhs, tuple(window_strides), tuple(tuple(pair) for pair in pads))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)
