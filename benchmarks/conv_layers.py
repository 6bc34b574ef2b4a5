"""The seed model's convolutions, one by one: XLA:CPU (ours) against TensorFlow (Keras') kernels.

  python benchmarks/conv_layers.py                 # 180 px, batch 32, as train_throughput.py
  python benchmarks/conv_layers.py --repeats=3     # quick

Where the seed model's training step loses to Keras, the time is in
these kernels. For each 3x3 convolution of the model (its input shape at
the given image size), times the forward pass, the input gradient and the
kernel gradient as separate programs: in this process, jitted JAX with the
process settings `launch.py` applies, once as `lax.conv_general_dilated`
as written (`native`) and once through the lowering the model trains with
(`conv_impl=auto`: `onednn` where oneDNN is installed, with the names of
oneDNN's kernels); in a TensorFlow
process of its own, the ops Keras runs (`Conv2D`, `Conv2DBackpropInput`,
`Conv2DBackpropFilter`, oneDNN on x86). Printed: milliseconds per batch
(best of `repeats`), GFLOP/s, and the ratio TensorFlow/ours (above 1: ours
faster; ours is the `auto` lowering, as the training step runs it). conv1
has no input gradient: a training step does not differentiate the images.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from melanoma_jax import cli, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

_IMAGE_SIZE = flags.DEFINE_integer('image_size', 180, "The model's input side.", lower_bound=16)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per batch.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed runs of each program (the best counts).', lower_bound=1)
_WORKER = flags.DEFINE_bool('tf_worker', False, 'Internal: time the TensorFlow side and print JSON.')

_OPS = ('forward', 'input grad', 'kernel grad')
# (input, kernel, output gradient) -> {op: a call that runs it and waits for it}.
_Programs = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, Callable[[], None]]]


def _ops(layer: str) -> tuple[str, ...]:
  """What a training step computes for `layer`: the images need no gradient, so conv1 has no input grad."""
  return tuple(op for op in _OPS if layer != 'conv1' or op != 'input grad')


def _layers(size: int) -> list[tuple[str, int, int, int]]:
  """(name, input side, input channels, output channels) of the seed model's convolutions."""
  conv1, conv2 = size - 2, size - 4
  conv3 = conv2 // 2 - 2
  return [('conv1', size, 3, 32), ('conv2', conv1, 32, 32), ('conv3', conv2 // 2, 32, 64),
          ('conv4', conv3 // 2, 64, 128)]


def _best_ms(run: Callable[[], None], repeats: int) -> float:
  run()  # compiles / warms up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times) * 1e3


def _time_layers(batch: int, size: int, repeats: int, programs: _Programs) -> dict[str, dict[str, float]]:
  """Best milliseconds of each layer's ops, as `programs` runs them."""
  rng = np.random.default_rng(0)
  times = {}
  for name, side, cin, cout in _layers(size):
    run = programs(rng.random((batch, side, side, cin), np.float32),
                   rng.random((3, 3, cin, cout), np.float32),
                   rng.random((batch, side - 2, side - 2, cout), np.float32))
    times[name] = {op: _best_ms(run[op], repeats) for op in _ops(name)}
  return times


def _tf_programs(x: np.ndarray, w: np.ndarray, dy: np.ndarray) -> dict[str, Callable[[], None]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  x, w, dy = tf.constant(x), tf.constant(w), tf.constant(dy)
  forward = tf.function(lambda: tf.nn.conv2d(x, w, 1, 'VALID'))
  input_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropInput(
      input_sizes=tf.shape(x), filter=w, out_backprop=dy, strides=[1, 1, 1, 1], padding='VALID'))
  kernel_grad = tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
      input=x, filter_sizes=tf.shape(w), out_backprop=dy, strides=[1, 1, 1, 1], padding='VALID'))
  return {'forward': lambda: forward().numpy(), 'input grad': lambda: input_grad().numpy(),
          'kernel grad': lambda: kernel_grad().numpy()}


def _jax_programs(conv_impl: str) -> _Programs:
  import jax  # pylint: disable=g-import-not-at-top

  from melanoma_jax.models import seed_cnn_lowering  # pylint: disable=g-import-not-at-top

  conv = seed_cnn_lowering.conv_general_dilated(conv_impl)
  apply = lambda x, w: conv(x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  forward = jax.jit(apply)
  input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: apply(x, w), x)[1](dy)[0])
  kernel_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: apply(x, w), w)[1](dy)[0])

  def programs(x, w, dy):
    x, w, dy = jax.device_put((x, w, dy))
    return {'forward': lambda: jax.block_until_ready(forward(x, w)),
            'input grad': lambda: jax.block_until_ready(input_grad(x, w, dy)),
            'kernel grad': lambda: jax.block_until_ready(kernel_grad(x, w, dy))}

  return programs


def _tf_process(batch: int, size: int, repeats: int) -> dict[str, dict[str, float]]:
  """The TensorFlow side, in a process without our settings (as a Keras user runs)."""
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
  out = subprocess.run([sys.executable, __file__, '--tf_worker', f'--image_size={size}',
                        f'--batch_size={batch}', f'--repeats={repeats}'],
                       env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
  return json.loads(next(line for line in out.splitlines() if line.startswith('{')))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  batch, size, repeats = _BATCH_SIZE.value, _IMAGE_SIZE.value, _REPEATS.value
  if _WORKER.value:
    print(json.dumps(_time_layers(batch, size, repeats, _tf_programs)), flush=True)
    return
  runtime.configure(reexec=True)  # as launch.py
  import jax  # pylint: disable=g-import-not-at-top

  from melanoma_jax.models import seed_cnn_lowering  # pylint: disable=g-import-not-at-top

  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs; seed_cnn '
        f'convolutions at {size}x{size}, batch {batch}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}',
        flush=True)
  auto = seed_cnn_lowering.resolve('auto')
  ours = {impl: _time_layers(batch, size, repeats, _jax_programs(impl)) for impl in ('native', auto)}
  tf_ms = _tf_process(batch, size, repeats)
  print(f'\n{"layer":6s} {"shape":>18s} {"op":12s} {"GFLOP":>6s} {"TF ms":>7s} {"native ms":>9s} '
        f'{auto + " ms":>10s} {"TF GF/s":>8s} {"ours GF/s":>9s} {"TF/ours":>7s}')
  totals = {op: [0.0, 0.0] for op in _OPS}
  for name, side, cin, cout in _layers(size):
    gflop = 2 * batch * (side - 2) ** 2 * 9 * cin * cout / 1e9
    for op in _ops(name):
      best = ours[auto][name][op]
      totals[op][0] += tf_ms[name][op]
      totals[op][1] += best
      print(f'{name:6s} {f"{side}x{side}x{cin}->{cout}":>18s} {op:12s} {gflop:6.2f} {tf_ms[name][op]:7.1f} '
            f'{ours["native"][name][op]:9.1f} {ours[auto][name][op]:10.1f} {gflop / tf_ms[name][op] * 1e3:8.0f} '
            f'{gflop / best * 1e3:9.0f} {tf_ms[name][op] / best:7.2f}')
  print(f'\nall four layers, as a training step runs them (ours: conv_impl=auto, {auto}):')
  for op, (tf_total, ours_total) in totals.items():
    print(f'  {op:12s} TF {tf_total:6.1f} ms, ours {ours_total:6.1f} ms, TF/ours {tf_total / ours_total:.2f}')
  if auto == 'onednn':
    from melanoma_jax.models import onednn  # pylint: disable=g-import-not-at-top
    print("\noneDNN's kernels (forward, input gradient, kernel gradient; a kernel gradient without "
          "AVX-512 is XLA's):")
    for name, side, cin, cout in _layers(size):
      kernels = onednn.implementations((batch, side, side, cin), (3, 3, cin, cout), (1, 1), ((0, 0), (0, 0)))
      print(f'  {name:6s} {"  ".join(kernels)}')


if __name__ == '__main__':
  cli.run(main)
