"""Prediction's two resamplings, as training's tools compute them and reproduced in XLA, in one run.

  python benchmarks/resize_speed.py

Decodes a batch of `--batch_size` generated 600x450 lesion JPEGs at the DCT
scale `decode_image` drafts them to, and prints the CPU milliseconds the
batch takes (best of `--rounds`) and the pixels that differ, of:

- the file to the stored square: PIL's LANCZOS (`decode_image`'s) against
  its fixed-point arithmetic reproduced in XLA here (integer, exact; not used
  by the package: slower);
- the stored square to the model's side: TensorFlow's antialiased resize
  (`preprocessing.resize`, the input pipeline's) against
  `preprocessing.model_inputs` (XLA, what `inference` uses).

CPU time, not wall time: prediction is bound by the CPU its steps use.
"""

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags, logging  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position

from benchmarks import image_trees  # pylint: disable=wrong-import-position
from melanoma_jax import cli, preprocessing, runtime  # pylint: disable=wrong-import-position

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'JPEGs to generate and resize in each call.',
                                   lower_bound=1)
_STORED_SIZE = flags.DEFINE_integer('stored_image_size', 256, 'The stored square.', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 180, "The model's side.", lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Timed rounds of each; the best is printed.', lower_bound=1)

_PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images (32 - 8 - 2).
_LANCZOS_SUPPORT = 3.0


def _lanczos(x: float) -> float:
  def sinc(x):
    return 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)
  return sinc(x) * sinc(x / 3) if -_LANCZOS_SUPPORT <= x < _LANCZOS_SUPPORT else 0.0


def _pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(first input index [out], int32 weights [out, taps]) as Pillow's `precompute_coeffs` makes them.

  In double precision with Python's `math` (the C library's, as Pillow's),
  then rounded to 22-bit fixed point; bands are shifted to fit the input.
  """
  scale = filterscale = in_size / out_size
  filterscale = max(filterscale, 1.0)
  support = _LANCZOS_SUPPORT * filterscale
  taps = int(math.ceil(support)) * 2 + 1
  starts, weights = np.zeros(out_size, np.int64), np.zeros((out_size, taps), np.int64)
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    first = max(int(center - support + 0.5), 0)
    count = min(int(center + support + 0.5), in_size) - first
    w = [_lanczos((x + first - center + 0.5) / filterscale) for x in range(count)]
    total = 0.0
    for v in w:  # In order, as Pillow adds them.
      total += v
    normalized = [v / total for v in w]
    fixed = [int(v * (1 << _PRECISION_BITS) + (-0.5 if v < 0 else 0.5)) for v in normalized]
    shift = max(first + taps - in_size, 0)
    starts[xx] = first - shift
    weights[xx, shift:shift + count] = fixed
  return starts, weights.astype(np.int32)


def _xla_lanczos(images: np.ndarray, size: int) -> Callable[[], jax.Array]:
  """PIL's LANCZOS of [N, H, W, 3] uint8 to [N, size, size, 3] in XLA: horizontal pass, then vertical,
  each summed in int32 and clipped to 8 bits as Pillow does."""
  def one_axis(x, axis):
    starts, weights = _pil_coefficients(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = -1
    total = jnp.int32(1 << (_PRECISION_BITS - 1))
    for k in range(weights.shape[1]):
      total = total + (jnp.take(x, starts + k, axis=axis).astype(jnp.int32)
                       * weights[:, k].reshape(shape))
    return jnp.clip(total >> _PRECISION_BITS, 0, 255).astype(jnp.uint8)

  resize = jax.jit(lambda x: one_axis(one_axis(x, 2), 1))
  return lambda: resize(images).block_until_ready()


def _best_cpu_ms(run: Callable[[], object]) -> float:
  run()  # Compiles, traces, warms caches.
  best = math.inf
  for _ in range(_ROUNDS.value):
    start = time.process_time()
    run()
    best = min(best, time.process_time() - start)
  return best * 1000


def main(argv: list[str]) -> None:
  del argv
  logging.get_absl_handler().addFilter(runtime.show_info_only_from(os.path.dirname(runtime.__file__)))
  runtime.configure(reexec=True, workload='forward')  # as `inference` runs
  batch, stored_size, image_size = _BATCH_SIZE.value, _STORED_SIZE.value, _IMAGE_SIZE.value
  least = math.ceil(stored_size * preprocessing.DRAFT_MIN_FRACTION)
  with tempfile.TemporaryDirectory() as folder:
    decoded = []
    for path in image_trees.write_lesion_jpegs(folder, batch):
      with Image.open(path) as image:
        image.draft(image.mode, (least, least))
        decoded.append(image.convert('RGB'))
  print(f'{os.cpu_count()} CPUs; {batch} JPEGs of {image_trees.FIXTURE_SIZE} drafted to '
        f'{decoded[0].size} -> {stored_size} (LANCZOS) -> {image_size} (antialiased); CPU ms per '
        f'batch, best of {_ROUNDS.value}', flush=True)

  def pil() -> np.ndarray:
    return np.stack([np.asarray(image.resize((stored_size, stored_size), Image.Resampling.LANCZOS,
                                             reducing_gap=3.0)) for image in decoded])

  stored = pil()
  xla_lanczos = _xla_lanczos(np.stack([np.asarray(image) for image in decoded]), stored_size)
  tensorflow = lambda: preprocessing.resize(stored, image_size).numpy()
  ours = lambda: np.asarray(preprocessing.model_inputs(stored, image_size))
  for step, peer_name, peer, xla in (('LANCZOS to the stored square', 'PIL', pil, xla_lanczos),
                                     ("antialiased to the model's side", 'TensorFlow', tensorflow, ours)):
    peer_ms, xla_ms = _best_cpu_ms(peer), _best_cpu_ms(xla)
    out = np.asarray(xla())
    print(f'{step:32s} {peer_name:10s} {peer_ms:6.1f} ms  XLA {xla_ms:6.1f} ms  ({xla_ms / peer_ms:.2f}x '
          f'the CPU time; {np.sum(out != peer())} of {out.size} values differ)')


if __name__ == '__main__':
  cli.run(main)
