"""Is the training stream fast enough that the model never waits for data?

Prints images/sec of `input_pipeline.train_batches` (prepared shards read into
memory, class-balanced, augmented, batched) beside images/sec of the jitted
`train_step` of the seed CNN on one device at the same size and batch, and
their ratio; the stream should be at least 3x the step. Each figure is the
median over windows after a warm-up, as machines shared with other work are
noisy. Run from the repository root:

  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --dataset=synthetic_lesions
  python -m benchmarks.input_pipeline --dataset=isic_skin_cancer --manual_dir=PATH

By default `image_folder` is prepared from a generated tree of ISIC-sized
JPEGs (600x450, the archive's 9 classes) in a temporary folder, so the
benchmark reads what real data becomes: images decoded, stored at 256 px and
resized to `--image_size`.
"""

import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

from absl import app, flags
import jax
import numpy as np
from PIL import Image
import tensorflow as tf

from configs import balanced
import melanoma_jax
from melanoma_jax import cli, input_pipeline, models, optim
from melanoma_jax.datasets import ISIC_CLASSES

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'image_folder',
                    'TFDS dataset to read: image_folder, isic_skin_cancer or synthetic_lesions.')
flags.DEFINE_string('manual_dir', None,
                    'Tree to prepare (image_folder, isic_skin_cancer); default for image_folder: '
                    'a generated one in a temporary folder.')
flags.DEFINE_string('data_dir', None, "Where prepared datasets are (TFDS' default when unset); the "
                    'generated tree always goes to a temporary folder.')
flags.DEFINE_integer('image_size', 180, 'Training resolution.')
flags.DEFINE_integer('batch_size', 32, 'Images per batch, for the stream and the step.')
flags.DEFINE_integer('windows', 5, 'Timed windows per measurement; the median is reported.')
flags.DEFINE_integer('stream_window', 80, 'Batches per window of the stream.')
flags.DEFINE_integer('step_window', 2, 'Steps per window of the training step.')
flags.DEFINE_integer('fixture_images', 40, 'Generated Train images per class (image_folder).')

FIXTURE_SIZE = (600, 450)  # (width, height) of the ISIC archive's JPEGs.


def write_fixture_tree(root: str, per_class: int) -> None:
  """Writes smooth, noisy JPEGs in the archive's Train/Test class layout.

  Smooth colour fields plus sensor-like noise compress like photographs, so
  decoding costs about what real dermoscopy JPEGs cost.
  """
  rng = np.random.default_rng(0)
  width, height = FIXTURE_SIZE
  for split, count in (('Train', per_class), ('Test', 2)):
    for class_name in ISIC_CLASSES:
      folder = pathlib.Path(root) / split / class_name
      folder.mkdir(parents=True)
      for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(FIXTURE_SIZE, Image.Resampling.BICUBIC), np.int16)
        noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(
            folder / f'ISIC_{i:07d}.jpg', quality=90)


def images_per_sec(run_window: Callable[[], None], images_per_window: int,
                   windows: int) -> float:
  """Median throughput of `windows` calls of `run_window`, after one untimed call."""
  run_window()  # Warm-up: compilation, tf.data thread pools, autotuning.
  seconds = []
  for _ in range(windows):
    start = time.perf_counter()
    run_window()
    seconds.append(time.perf_counter() - start)
  return images_per_window / statistics.median(seconds)


def pull_batches(batches: Iterator[input_pipeline.Batch], num_batches: int) -> Callable[[], None]:
  """A window that pulls `num_batches` batches from the stream."""
  def run() -> None:
    for _ in range(num_batches):
      next(batches)
  return run


def run_steps(state: melanoma_jax.TrainState, batch: dict[str, jax.Array],
              num_steps: int) -> Callable[[], None]:
  """A window of `num_steps` jitted training steps on one device-resident batch."""
  step = jax.jit(melanoma_jax.train_step, donate_argnums=0)

  def run() -> None:
    nonlocal state
    for _ in range(num_steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
  return run


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # As in launch.py: TF only feeds data.
  config = balanced.get_config()
  config.update({'dataset': FLAGS.dataset, 'image_size': FLAGS.image_size,
                 'batch_size': FLAGS.batch_size, 'data_dir': FLAGS.data_dir,
                 'manual_dir': FLAGS.manual_dir})
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS.dataset == 'image_folder' and not FLAGS.manual_dir:
      # Prepared apart: image_folder keeps one tree per data_dir.
      config.update({'manual_dir': f'{tmp}/tree', 'data_dir': f'{tmp}/tfds'})
      write_fixture_tree(config.manual_dir, FLAGS.fixture_images)
    start = time.perf_counter()
    data = input_pipeline.load_data(config)
    print(f'{config.dataset}: {len(data.train)} train images at {FLAGS.image_size}px, '
          f'loaded (prepared if needed) in {time.perf_counter() - start:.1f} s')

  num_classes = len(data.class_names)
  num_batches = (FLAGS.windows + 1) * FLAGS.stream_window
  batches = input_pipeline.train_batches(data.train, config, num_classes, 0, num_batches)
  stream = images_per_sec(pull_batches(batches, FLAGS.stream_window),
                          FLAGS.stream_window * config.batch_size, FLAGS.windows)

  first = next(input_pipeline.train_batches(data.train, config, num_classes, 0, 1))
  batch = jax.device_put({k: v.reshape(-1, *v.shape[2:]) for k, v in first.items()})
  state = melanoma_jax.create_train_state(
      jax.random.key(0), models.SeedCNN(num_classes), optim.make_optimizer(config),
      (FLAGS.image_size, FLAGS.image_size, 3))
  step = images_per_sec(run_steps(state, batch, FLAGS.step_window),
                        FLAGS.step_window * config.batch_size, FLAGS.windows)

  print(f'training stream: {stream:8.1f} images/s  ({config.batch_size} per batch, '
        f'balanced + augmented, median of {FLAGS.windows} x {FLAGS.stream_window} batches)')
  print(f'training step:   {step:8.1f} images/s  (seed CNN, {config.batch_size} per step on one '
        f'{jax.devices()[0].device_kind}, median of {FLAGS.windows} x {FLAGS.step_window} steps)')
  verdict = 'ok' if stream >= 3 * step else 'TOO SLOW: the model will wait for data'
  print(f'ratio stream/step: {stream / step:.2f}  (target >= 3: {verdict})')


if __name__ == '__main__':
  cli.run(main)
