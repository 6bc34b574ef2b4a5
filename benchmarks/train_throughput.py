"""Training throughput of the seed model: ours against Keras, in one process.

  python benchmarks/train_throughput.py                 # 180x180, batch 32
  python benchmarks/train_throughput.py --image_size=64 --windows=3   # quick

Contenders, timed in alternating windows so machine load hits all alike:
  step   our jitted `steps.train_step` on one fixed device batch;
  keras  the same model in Keras/TensorFlow (`train_on_batch` on the same batch);
  loop   our full training loop (`train.train_and_evaluate`) on the synthetic
         dataset, if it runs here: its epochs run once, between the first
         and second half of the windows. Its images/sec come from its own
         per-epoch history and include that epoch's validation pass.
Each prints images/sec (median over windows after a warm-up step), time to
first step (build, compile, one step) and peak resident memory so far.
Memory is process-wide and only grows, so contenders are set up in order.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from melanoma_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image_size', type=int, default=180)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_classes', type=int, default=9)
  parser.add_argument('--windows', type=int, default=5, help='timed windows per contender')
  parser.add_argument('--steps_per_window', type=int, default=3)
  parser.add_argument('--conv_impl', default='auto', help="SeedCNN.conv_impl, e.g. 'native'")
  parser.add_argument('--loop_epochs', type=int, default=3, help='0 skips the loop')
  parser.add_argument('--no_keras', action='store_true')
  parser.add_argument('--untuned', action='store_true',
                      help='skip melanoma_jax.runtime (XLA:CPU flags, huge pages), as launch.py applies it')
  return parser.parse_args()


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jax_step(args, images, labels) -> Callable[[], None]:
  """Our bare train step; each call runs one step and waits for it."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from melanoma_jax import models, optim, steps  # pylint: disable=g-import-not-at-top

  model = models.SeedCNN(args.num_classes, conv_impl=args.conv_impl)
  tx = optim.PlateauOptimizer(optax.adam(1e-3), optim.keras_plateau(1e-3, 0.5, 3, 1e-4, 0, 1e-5),
                              1e-3)
  state = steps.create_train_state(jax.random.key(0), model, tx, images.shape[1:])
  batch = jax.device_put({'image': images, 'label': labels})
  train_step = jax.jit(steps.train_step, donate_argnums=0)

  def run():
    nonlocal state
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)

  return run


def _keras_step(args, images, labels) -> Callable[[], None]:
  """The Keras seed model (shared/REFERENCE.md's layer table), same batch and optimizer."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  layers = keras.layers
  model = keras.Sequential([
      keras.Input(images.shape[1:]),
      layers.Rescaling(1 / 255),
      layers.Conv2D(32, 3, activation='relu'),
      layers.Conv2D(32, 3, activation='relu'),
      layers.MaxPooling2D(),
      layers.Conv2D(64, 3, activation='relu'),
      layers.BatchNormalization(),
      layers.MaxPooling2D(),
      layers.Conv2D(128, 3, activation='relu'),
      layers.BatchNormalization(),
      layers.MaxPooling2D(),
      layers.Flatten(),
      layers.Dense(512, activation='relu'),
      layers.Dropout(0.5),
      layers.Dense(args.num_classes),
  ])
  model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=['accuracy'],
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x, y = tf.constant(images, tf.float32), tf.constant(labels)
  return lambda: model.train_on_batch(x, y)


def _run_loop(args) -> dict[str, float]:
  """Our training loop on synthetic data; images/sec per epoch from its history."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from melanoma_jax import reporting, train  # pylint: disable=g-import-not-at-top

  config = default.get_config('synthetic')
  config.image_size = args.image_size
  config.batch_size = args.batch_size
  config.num_epochs = args.loop_epochs
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    history = reporting.read_history(workdir)
  later = [row['images_per_sec'] for row in history[1:]] or [history[0]['images_per_sec']]
  return {'images_per_sec': statistics.median(later), 'total_s': time.perf_counter() - start,
          'first_epoch_s': history[0]['epoch_seconds']}


def main() -> None:
  args = _parse_args()
  if not args.untuned:
    runtime.configure(reexec=True)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from melanoma_jax import layers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.image_size, args.image_size, 3)
  images = rng.integers(0, 256, shape, dtype=np.uint8)
  labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPUs; {args.image_size}x{args.image_size}, batch {args.batch_size}, '
        f'conv_impl={args.conv_impl} ({layers.resolve(args.conv_impl)}); '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r} GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES")!r}',
        flush=True)

  builders = {'step': _jax_step}
  if not args.no_keras:
    builders['keras'] = _keras_step
  contenders, rates = {}, {}
  for name, build in builders.items():
    start = time.perf_counter()
    contenders[name] = build(args, images, labels)
    contenders[name]()
    rates[name] = []
    print(f'{name}: time to first step {time.perf_counter() - start:.1f} s, '
          f'peak RSS so far {_peak_rss_gib():.2f} GiB', flush=True)

  loop = None
  for window in range(args.windows):
    if window == args.windows // 2 and args.loop_epochs:
      try:
        loop = _run_loop(args)
        print(f'loop: {args.loop_epochs} epochs in {loop["total_s"]:.1f} s (first epoch '
              f'{loop["first_epoch_s"]:.1f} s), peak RSS so far {_peak_rss_gib():.2f} GiB',
              flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f'loop: skipped ({type(e).__name__}: {str(e)[:200]})', flush=True)
    for name, step in contenders.items():
      start = time.perf_counter()
      for _ in range(args.steps_per_window):
        step()
      rates[name].append(args.steps_per_window * args.batch_size / (time.perf_counter() - start))

  medians = {name: statistics.median(r) for name, r in rates.items()}
  if loop:
    medians['loop'] = loop['images_per_sec']
  for name, rate in medians.items():
    spread = f' (windows {min(rates[name]):.1f}-{max(rates[name]):.1f})' if name in rates else ''
    print(f'{name:6s} {rate:8.1f} images/s{spread}')
  for ours in ('step', 'loop'):
    if ours in medians and 'keras' in medians:
      print(f'{ours}/keras {medians[ours] / medians["keras"]:.2f}')
  if 'loop' in medians:
    print(f'loop/step {medians["loop"] / medians["step"]:.2f}')
  print(f'peak RSS {_peak_rss_gib():.2f} GiB (whole process)')


if __name__ == '__main__':
  main()
