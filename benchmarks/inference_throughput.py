"""Prediction throughput on a folder of JPEGs: our `inference` against Keras `model.predict`.

  python benchmarks/inference_throughput.py                      # 256 600x450 JPEGs, 180 px, batch 32
  python benchmarks/inference_throughput.py --num_images=64 --repeats=1   # quick

Generates `num_images` synthetic lesions as 600x450 JPEGs (the ISIC archive's
usual size) in a temporary folder and a run workdir holding a freshly
initialised seed model (no training: speed does not depend on the weights),
with a Mahalanobis out-of-distribution detector and a temperature, as a
trained run has. Then, in alternating timed passes over all the files:

  ours   `inference`'s prediction path in this process: files decoded and
         resized as training saw them, the jitted model, calibration, refusal,
         rows and the CSV (what `python -m melanoma_jax.inference` does after
         restoring the run);
  keras  the Keras seed model (benchmarks/keras_models.py) in a process
         of its own, `model.predict` on a tf.data pipeline of the same files
         as a Keras user writes it: read, `decode_jpeg`, `resize` to the same
         image size, mapped with AUTOTUNE, batched, prefetched.

Each pass includes filling its pipeline; start-up and compilation are not
in it (a first one-batch pass, whose latency is printed separately).
Printed: images/s of each pass, their median and best, the ratios of the
medians and of the best passes (Keras' passes can fall to about half speed
for whole passes, which moves a median of few), first-batch latency and
each one's peak resident memory.
"""

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, '..'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from melanoma_jax import cli, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer('num_images', 256, 'JPEGs to generate and predict.', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 180, "The model's input side.", lower_bound=1)
_STORED_SIZE = flags.DEFINE_integer('stored_image_size', 256,
                                    "The run's stored image side (the folder builders' 256).",
                                    lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size of both.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed passes of each, alternating.', lower_bound=1)
_WORKER = flags.DEFINE_string('worker', None, 'Internal: serve Keras passes over this folder.')

_CLASSES = 9


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _write_run(workdir: str) -> None:
  """A run workdir with a freshly initialised seed model checkpoint, as training leaves it."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from melanoma_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  from melanoma_jax.datasets import synthetic_lesions  # pylint: disable=g-import-not-at-top

  config = default.get_config('synthetic')
  config.image_size = _IMAGE_SIZE.value
  checkpointing.write_config(workdir, config)
  manager = checkpointing.manager(workdir)
  checkpointing.save(manager, train.build_state(config, _CLASSES), {
      'class_names': list(synthetic_lesions.ISIC_CLASSES), 'stored_image_size': _STORED_SIZE.value,
      'epoch': 1, 'val_loss': 1.0})
  manager.close()


def _detector(state, image: 'np.ndarray') -> dict:
  """A Mahalanobis detector around one image's features (any statistics time the same)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from melanoma_jax import ood  # pylint: disable=g-import-not-at-top

  features, _ = ood.features_and_logits(state, image[None])
  means = np.repeat(np.asarray(features, np.float32), _CLASSES, axis=0)
  precision = np.eye(means.shape[1], dtype=np.float32)
  return {'method': 'mahalanobis', 'means': means, 'precision': precision, 'threshold': 1e3,
          'checkpoint': {'step': 0}}


def _keras_worker(folder: str) -> None:
  """Keras' side: builds the model and pipeline, a warm-up batch, then passes on request."""
  start = time.perf_counter()
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from benchmarks import keras_models  # pylint: disable=g-import-not-at-top

  size = _IMAGE_SIZE.value
  model = keras_models.seed_cnn(keras, (size, size, 3), _CLASSES)

  def load(path):
    return tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(path), channels=3), (size, size))

  files = sorted(os.path.join(folder, name) for name in os.listdir(folder))
  dataset = (tf.data.Dataset.from_tensor_slices(files)
             .map(load, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(_BATCH_SIZE.value).prefetch(tf.data.AUTOTUNE))
  model.predict(dataset.take(1), verbose=0)
  print(json.dumps({'first_batch_s': time.perf_counter() - start, 'peak_rss_gib': _peak_rss_gib()}),
        flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    probs = model.predict(dataset, verbose=0)
    seconds = time.perf_counter() - start
    assert len(probs) == len(files)
    print(json.dumps({'seconds': seconds, 'peak_rss_gib': _peak_rss_gib()}), flush=True)


class _Keras:
  """The Keras worker process: Keras users run without our process settings."""

  def __init__(self, folder: str):
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    self.process = subprocess.Popen(
        [sys.executable, __file__, f'--worker={folder}', f'--image_size={_IMAGE_SIZE.value}',
         f'--batch_size={_BATCH_SIZE.value}'],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.first = self._reply()

  def _reply(self) -> dict:
    for line in self.process.stdout:
      if line.startswith('{'):  # anything else is a library talking
        return json.loads(line)
    raise RuntimeError(f'{self.process.args} exited with {self.process.wait()}')

  def run(self) -> dict:
    self.process.stdin.write('run\n')
    self.process.stdin.flush()
    return self._reply()

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def _ours(workdir: str, files: list[pathlib.Path], output: str):
  """A function running our prediction path on a list of files as `inference` runs it."""
  from melanoma_jax import inference, preprocessing, train  # pylint: disable=g-import-not-at-top

  state, config, meta = train.restore_for_inference(workdir)
  detector = _detector(state, preprocessing.model_input(
      files[0], meta['stored_image_size'], config.image_size))
  temperature = {'temperature': 1.5}

  def run(paths):
    results = inference.predict_files(state, paths, config.image_size, _BATCH_SIZE.value, False,
                                      meta['stored_image_size'], None, detector)
    rows = inference.prediction_rows(results, meta['class_names'], 0.3, temperature, detector)
    inference.write_csv(pathlib.Path(output), rows, meta['class_names'])
    return rows

  return run


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # The console is for the results: libraries' INFO lines stay out, as in launch.py.
  logging.get_absl_handler().addFilter(runtime.show_info_only_from(os.path.dirname(runtime.__file__)))
  if _WORKER.value:
    _keras_worker(_WORKER.value)
    return
  runtime.configure(reexec=True, workload='forward')  # as `inference` does
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import image_trees  # pylint: disable=g-import-not-at-top

  n, size, batch = _NUM_IMAGES.value, _IMAGE_SIZE.value, _BATCH_SIZE.value
  width, height = image_trees.FIXTURE_SIZE
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs; '
        f'{n} {width}x{height} JPEGs -> seed_cnn {size}x{size} (stored {_STORED_SIZE.value}), '
        f'batch {batch}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    folder, workdir = os.path.join(tmp, 'images'), os.path.join(tmp, 'run')
    os.makedirs(folder)
    os.makedirs(workdir)
    files = [pathlib.Path(p) for p in image_trees.write_lesion_jpegs(folder, n)]
    _write_run(workdir)
    keras_ = _Keras(folder)
    print(f'keras: first batch {keras_.first["first_batch_s"]:.1f} s after process start '
          f'(imports, model, tracing)', flush=True)
    start = time.perf_counter()
    ours = _ours(workdir, files, os.path.join(tmp, 'preds.csv'))
    ours(files[:batch])
    print(f'ours: first batch {time.perf_counter() - start:.1f} s (restore, compile, one batch)',
          flush=True)
    rates = {'ours': [], 'keras': []}
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      rows = ours(files)
      rates['ours'].append(n / (time.perf_counter() - start))
      assert len(rows) == n and all(row['error'] is None for row in rows)
      reply = keras_.run()
      rates['keras'].append(n / reply['seconds'])
    keras_.close()
    peaks = {'ours': _peak_rss_gib(), 'keras': reply['peak_rss_gib']}
  medians = {name: statistics.median(r) for name, r in rates.items()}
  for name, rate in medians.items():
    print(f'{name:6s} {rate:7.1f} images/s median, {max(rates[name]):.1f} best (passes '
          f'{", ".join(f"{r:.1f}" for r in rates[name])}), peak RSS {peaks[name]:.2f} GiB')
  print(f'ours/keras {medians["ours"] / medians["keras"]:.2f} (medians), '
        f'{max(rates["ours"]) / max(rates["keras"]):.2f} (best passes)')


if __name__ == '__main__':
  cli.run(main)
