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

Scale mode: does host memory stay flat as the dataset grows? For each count
in `--scale` it generates an image_folder tree of that many JPEGs (a few
distinct images, hard-linked under many names), prepares it at
`--stored_size` px (the real preparation), then, in a fresh process so its
peak RSS is the stream's own, streams the training batches (balanced,
augmented, decoded and resized to `--image_size`) and reports images/s and
peak RSS, beside the seed CNN's train step in the same run. With
`--scale_train_steps=K` (default 20; 0: none) it then trains on it with the
real command (launch.py, benchmarks/scale_config.py: the seed CNN, streamed),
stops that by SIGTERM after K steps, and reports the training process's peak
RSS and images/s:

  python -m benchmarks.input_pipeline --scale=2000,20000 --stored_size=512
"""

import json
import pathlib
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from absl import app, flags
import jax
import numpy as np
import tensorflow as tf

from benchmarks import scale_config
from benchmarks.image_trees import write_fixture_tree, write_scale_tree
from configs import balanced
import melanoma_jax
from melanoma_jax import cli, input_pipeline, models, optim

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
flags.DEFINE_list('scale', [], 'Scale mode: image counts of the generated trees, e.g. 2000,20000.')
flags.DEFINE_integer('stored_size', 512, 'Scale mode: the side the images are prepared (stored) at.')
flags.DEFINE_integer('distinct_images', 8, 'Scale mode: distinct generated images per class.')
flags.DEFINE_string('scale_dir', None, 'Scale mode: where trees and prepared data go (default: a '
                    'temporary folder, deleted at the end).')
flags.DEFINE_integer('scale_train_steps', 20, 'Scale mode: also train with launch.py (seed CNN, streamed) '
                     'and stop it by SIGTERM after this many steps; 0: no training run.', lower_bound=0)
flags.DEFINE_enum('scale_worker', None, ['prepare', 'stream', 'train'], 'Internal: one scale-mode phase.')
flags.DEFINE_string('scale_root', None, 'Internal: the scale worker\'s folder.')



def _scale_config(root: str):
  config = scale_config.get_config(str(FLAGS.stored_size))
  config.update({'image_size': FLAGS.image_size, 'batch_size': FLAGS.batch_size,
                 'manual_dir': f'{root}/tree', 'data_dir': f'{root}/tfds'})
  return config


def _scale_worker(phase: str, root: str) -> dict[str, float]:
  """One phase in this process: prepare the tree, stream its training batches, or train on it."""
  if phase == 'train':
    return _train_run(root)
  config = _scale_config(root)
  start = time.perf_counter()
  if phase == 'prepare':
    input_pipeline.prepared_builder(config)
    return {'prepare_s': time.perf_counter() - start}
  data = input_pipeline.load_data(config)
  load_s = time.perf_counter() - start
  num_batches = (FLAGS.windows + 1) * FLAGS.stream_window
  batches = input_pipeline.train_batches(data.train, config, len(data.class_names), 1, num_batches)
  rate = images_per_sec(pull_batches(batches, FLAGS.stream_window),
                        FLAGS.stream_window * config.batch_size, FLAGS.windows)
  return {'train_images': len(data.train), 'load_s': load_s, 'stream_images_per_sec': rate,
          'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _train_run(root: str) -> dict[str, float]:
  """Runs launch.py on the prepared tree, stops it by SIGTERM past step --scale_train_steps.

  This process only waits on it, so the peak RSS of its children is the
  training process's own (launch.py re-executes itself in the same process).
  Its images/s is the median of the per-step rates its log prints, the
  first step (compilation) left out.
  """
  repo = pathlib.Path(__file__).resolve().parent.parent
  steps = FLAGS.scale_train_steps
  command = [sys.executable, str(repo / 'launch.py'), f'--config={repo}/benchmarks/scale_config.py:{FLAGS.stored_size}',
             f'--workdir={root}/run', f'--config.manual_dir={root}/tree', f'--config.data_dir={root}/tfds',
             f'--config.image_size={FLAGS.image_size}', f'--config.batch_size={FLAGS.batch_size}',
             '--config.log_every_steps=1']
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=repo)
  log, rates, stopped = [], [], False
  for line in process.stdout:
    log.append(line)
    match = re.search(r' step (\d+)/\d+: ([\d.]+) images/s', line)
    if match and not stopped:
      rates.append(float(match.group(2)))
      if len(rates) >= steps:
        process.send_signal(signal.SIGTERM)  # launch.py saves at the next step and exits 0
        stopped = True
  if process.wait() or not stopped:
    raise RuntimeError(f'training run {"failed" if process.returncode else "ended before the step"}:\n'
                       f'{"".join(log[-40:])}')
  return {'train_peak_rss_gib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
          'train_images_per_sec': statistics.median(rates[1:] or rates), 'train_steps': len(rates)}


def _run_scale_worker(phase: str, root: str) -> dict[str, float]:
  """Runs `_scale_worker` in a fresh process (its own peak RSS); returns its figures."""
  flags_now = [f'--{name}={getattr(FLAGS, name)}' for name in (
      'image_size', 'batch_size', 'windows', 'stream_window', 'stored_size', 'scale_train_steps')]
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline', f'--scale_worker={phase}',
       f'--scale_root={root}', *flags_now], capture_output=True, text=True, check=False,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  if result.returncode:
    raise RuntimeError(f'scale worker {phase} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def seed_step_images_per_sec(num_classes: int = 9) -> float:
  """The seed CNN's jitted train step at --image_size and --batch_size on one device."""
  config = balanced.get_config()
  size, batch = FLAGS.image_size, FLAGS.batch_size
  rng = np.random.default_rng(0)
  images = jax.device_put({'image': rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                           'label': rng.integers(0, num_classes, batch).astype(np.int32)})
  state = melanoma_jax.create_train_state(
      jax.random.key(0), models.SeedCNN(num_classes), optim.make_optimizer(config), (size, size, 3))
  return images_per_sec(run_steps(state, images, FLAGS.step_window),
                        FLAGS.step_window * batch, FLAGS.windows)


def scale_mode() -> None:
  """Prepares and streams each --scale count in its own processes; prints the figures side by side."""
  counts = [int(c) for c in FLAGS.scale]
  with tempfile.TemporaryDirectory(dir=FLAGS.scale_dir) as tmp:
    rows = []
    for count in counts:
      root = f'{tmp}/{count}'
      start = time.perf_counter()
      write_scale_tree(root, count, FLAGS.stored_size, FLAGS.distinct_images)
      generate_s = time.perf_counter() - start
      prepared = _run_scale_worker('prepare', root)
      streamed = _run_scale_worker('stream', root)
      rows.append({'count': count, 'generate_s': generate_s, **prepared, **streamed})
      print(f'{count} images at {FLAGS.stored_size} px: generated in {generate_s:.1f} s, prepared in '
            f'{prepared["prepare_s"]:.1f} s ({count / prepared["prepare_s"]:.1f} images/s); stream '
            f'{streamed["stream_images_per_sec"]:.1f} images/s, peak RSS {streamed["peak_rss_gib"]:.2f} GiB '
            f'(split loaded in {streamed["load_s"]:.1f} s)', flush=True)
      if FLAGS.scale_train_steps:
        trained = _run_scale_worker('train', root)
        rows[-1].update(trained)
        print(f'{count} images at {FLAGS.stored_size} px: training run (launch.py, seed CNN, streamed, stopped '
              f'after {trained["train_steps"]} steps) {trained["train_images_per_sec"]:.1f} images/s, peak RSS '
              f'{trained["train_peak_rss_gib"]:.2f} GiB', flush=True)
      subprocess.run(['rm', '-rf', root], check=True)
  step = seed_step_images_per_sec()
  print(f'seed CNN train step: {step:.1f} images/s ({FLAGS.batch_size} per step, {FLAGS.image_size} px, '
        f'one {jax.devices()[0].device_kind})')
  first, last = rows[0], rows[-1]
  growth = last['peak_rss_gib'] / first['peak_rss_gib'] - 1
  print(f'peak RSS {last["count"]} vs {first["count"]} images: {growth:+.1%} (target within 10%: '
        f'{"ok" if abs(growth) <= 0.10 else "NO"})')
  if FLAGS.scale_train_steps:
    ratio = last['train_peak_rss_gib'] / first['train_peak_rss_gib']
    print(f'training run peak RSS {last["count"]} vs {first["count"]} images: {last["train_peak_rss_gib"]:.2f} vs '
          f'{first["train_peak_rss_gib"]:.2f} GiB, ratio {ratio:.3f} (target within 10%: '
          f'{"ok" if abs(ratio - 1) <= 0.10 else "NO"})')
  slowest = min(row['stream_images_per_sec'] for row in rows)
  print(f'slowest stream / step: {slowest / step:.2f} (target >= 3: {"ok" if slowest >= 3 * step else "NO"})')


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
  if FLAGS.scale_worker:
    print(json.dumps(_scale_worker(FLAGS.scale_worker, FLAGS.scale_root)))
    return
  if FLAGS.scale:
    scale_mode()
    return
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
