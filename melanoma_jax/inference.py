"""Melanoma alerts for image files with a trained run.

  python -m melanoma_jax.inference --workdir=runs/balanced --output=preds.csv [--json] [--tta] PATH...
  python -m melanoma_jax.inference --workdir=runs/a --workdir=runs/b --ensemble=DIR --output=preds.csv PATH...

PATHs are image files and folders (searched recursively for .jpg .jpeg .png
.bmp, any case). One CSV row per image: per-class probabilities, predicted
class, p(melanoma), and the alert flag at the threshold the run chose on
validation (`operating_point.json`), on probabilities calibrated by the
run's temperature (`calibration.json`). An image unlike the training lesions
(`ood.npz`) is refused: `in_distribution` no, no alert, and `refused` says
why. An unreadable file gets its error in its row. --json also writes the
same as JSON next to the CSV; --tta averages the 8 flips and rotations of
each image.
"""

import collections
import concurrent.futures
import functools
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from melanoma_jax import runtime

if __name__ == '__main__':
  # Before JAX and TensorFlow load (XLA flags, malloc settings; TensorFlow's banners off).
  runtime.configure(reexec=True, workload='forward')

import jax
import numpy as np
from absl import flags

from melanoma_jax import (calibration, checkpointing, cli, clinical_report, ensemble, errors, ood, preprocessing,
                          steps)
from melanoma_jax import metadata as metadata_lib
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import tables
from melanoma_jax.models import seed_cnn_lowering

FLAGS = flags.FlagValues()  # This tool's own (`cli.parse`).
cli.define_run_flags(FLAGS, several=True)
flags.DEFINE_string('ensemble', None, 'Several --workdir runs: the output of `evaluate` on them (its '
                    "ensemble.json: models, --combine, --tta, threshold); default: a CV run's own.",
                    flag_values=FLAGS)
cli.define_path('output', 'CSV file to write.', FLAGS, required=True)
flags.DEFINE_bool('json', False, 'Also write the results as JSON (.json).', flag_values=FLAGS)
flags.DEFINE_bool('tta', False, 'Average the 8 flips and rotations.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 32, 'Images per prediction batch.', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('metadata_csv', None, 'Age, sex and site per image, for runs trained with '
                    'model.metadata (default: metadata.csv in a PATH folder, if there).', flag_values=FLAGS)
cli.define_probability('threshold', "Alert threshold on p(melanoma); default: the run's operating point.",
                       FLAGS)


def find_images(paths: Sequence[str]) -> list[pathlib.Path]:
  """Files as given (so a bad one gets a row), and the images inside folders, sorted.

  Hidden files and folders inside a folder are skipped (macOS `._*` forks).
  """
  found = []
  for path in map(pathlib.Path, paths):
    if path.is_dir():
      found += sorted(p for p in path.rglob('*') if p.is_file()
                      and p.suffix.lower() in folder_layout.IMAGE_EXTENSIONS
                      and not any(part.startswith('.') for part in p.relative_to(path).parts))
    else:
      found.append(path)
  return found


# Batches decoded ahead of the one the model runs, on a pool of threads (PIL
# releases the GIL while it decodes and resizes).
PREFETCH_BATCHES = 2


def _decode(path: pathlib.Path, stored_size: int,
            preprocess: preprocessing.Preprocess) -> tuple[np.ndarray | None, str | None]:
  """(the file's stored square, None), or (None, why it is unreadable)."""
  if not path.is_file():
    return None, 'not a regular file' if path.exists() else 'no such file'
  try:
    return preprocessing.decode_image(path, stored_size, preprocess).pixels, None
  except errors.UnreadableImageError as e:
    return None, str(e)


@functools.partial(jax.jit, static_argnames=('tta', 'ood_method'))
def _predict_and_score(state: steps.TrainState, images: jax.Array, metadata: jax.Array | None,
                       ood_statistics: dict[str, jax.Array], tta: bool,
                       ood_method: str | None) -> tuple[jax.Array, jax.Array | None]:
  """(class probabilities, out-of-distribution scores or None) of a batch, in one program.

  Without TTA or metadata the two ask for the same forward pass, which XLA
  computes once.
  """
  probs = (steps.predict_tta if tta else steps.predict)(state, images, metadata)
  if ood_method is None:
    return probs, None
  detector = {'method': ood_method, **ood_statistics}
  return probs, ood.score_features(*ood.features_and_logits(state, images), detector)


def for_prediction(state: steps.TrainState) -> steps.TrainState:
  """`state` with its model lowered for the forward pass alone (the same function and parameters).

  A seed model's 'auto' lowering is chosen for training, whose backward
  pass dominates; the forward pass alone runs fastest with oneDNN's
  convolutions where they are installed, else as written.
  """
  if getattr(state.model, 'conv_impl', None) == 'auto':
    fastest = 'onednn' if seed_cnn_lowering.resolve('auto') == 'onednn' else 'native'
    return state.replace(model=state.model.clone(conv_impl=fastest))
  return state


def predict_files(state: steps.TrainState, files: Sequence[pathlib.Path], image_size: int,
                  batch_size: int = 32, tta: bool = False, stored_size: int | None = None,
                  metadata: Mapping[str, np.ndarray] | None = None,
                  detector: Mapping[str, Any] | None = None,
                  preprocess: preprocessing.Preprocess = preprocessing.Preprocess(),
                  workers: int | None = None
                  ) -> Iterator[tuple[pathlib.Path, np.ndarray | None, str | None, float | None]]:
  """(file, class probabilities or None, error or None, out-of-distribution score or None) per file, in order.

  Files are decoded as the run's dataset stored its images (`stored_size`,
  default `image_size`; `preprocess`, the run's `Preprocess.from_config`) by
  `workers` threads (default: one per CPU), `PREFETCH_BATCHES` batches ahead
  of the model, and resized as training resized them a batch at a time (the
  pixels of `preprocessing.model_input`); the model runs on one batch while
  the previous one's rows are made. Every batch is padded
  to `batch_size`, so the jitted model compiles once. `metadata` (from
  `metadata_lib.read_csv`, by image key) feeds models with a metadata
  branch; a file it lacks has unknown metadata. `detector` (the run's
  `ood.read`) scores each image as given (not its TTA views).
  """
  state, stored_size = for_prediction(state), stored_size or image_size
  ood_method = detector['method'] if detector else None
  ood_statistics = {k: np.asarray(detector[k], np.float32) for k in ('means', 'precision')
                    if detector and k in detector}
  chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
  pool = concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count())
  decoding = collections.deque()

  def decode_ahead(k: int) -> None:
    if k < len(chunks):
      decoding.append([pool.submit(_decode, path, stored_size, preprocess) for path in chunks[k]])

  def batch(chunk: Sequence[pathlib.Path], decoded: list) -> tuple | None:
    """The model's outputs for a chunk, dispatched (not waited for); None when nothing is readable."""
    readable = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
    if not readable:
      return None
    stored = np.zeros((batch_size, stored_size, stored_size, 3), np.uint8)  # One shape: one compile.
    stored[readable] = [decoded[i][0] for i in readable]
    images = preprocessing.model_inputs(stored, image_size)
    encoded = None
    if metadata is not None:
      encoded = metadata_lib.unknown(batch_size)
      for i, path in enumerate(chunk):
        encoded[i] = metadata.get(tables.image_key(path.name), encoded[i])
    return _predict_and_score(state, images, encoded, ood_statistics, tta, ood_method)

  def rows(chunk: Sequence[pathlib.Path], decoded: list, outputs: tuple | None) -> Iterator[tuple]:
    probs, scores = (None, None) if outputs is None else jax.device_get(outputs)
    for i, (path, (_, error)) in enumerate(zip(chunk, decoded)):
      yield (path, (None if error else probs[i]), error,
             None if error or scores is None else float(scores[i]))

  try:
    for k in range(PREFETCH_BATCHES):
      decode_ahead(k)
    previous = None
    for k, chunk in enumerate(chunks):
      decode_ahead(k + PREFETCH_BATCHES)
      decoded = [future.result() for future in decoding.popleft()]
      outputs = batch(chunk, decoded)
      if previous:
        yield from rows(*previous)
      previous = chunk, decoded, outputs
    if previous:
      yield from rows(*previous)
  finally:
    pool.shutdown(cancel_futures=True)


def prediction_row(path: pathlib.Path, probs: np.ndarray | None, error: str | None,
                   class_names: Sequence[str], threshold: float | None,
                   ood_score: float | None = None, ood_threshold: float | None = None) -> dict[str, Any]:
  """One image's JSON-able result; the alert is None without an operating point.

  An image whose out-of-distribution score exceeds `ood_threshold` is
  refused: `in_distribution` no, no alert, and `refused` says why.
  """
  m = clinical_report.melanoma_index(class_names)
  row = {'file': str(path), 'error': error, 'predicted_class': None,
         'melanoma_probability': None, 'melanoma_alert': None,
         'in_distribution': None, 'ood_score': ood_score, 'refused': None,
         'probabilities': dict.fromkeys(class_names)}
  if probs is not None:
    row['probabilities'] = {name: float(p) for name, p in zip(class_names, probs)}
    row['predicted_class'] = class_names[int(np.argmax(probs))]
    if m is not None:
      row['melanoma_probability'] = float(probs[m])
      row['melanoma_alert'] = None if threshold is None else bool(probs[m] >= threshold)
    if ood_score is not None and ood_threshold is not None:
      row['in_distribution'] = ood_score <= ood_threshold
      if not row['in_distribution']:
        row['melanoma_alert'] = None
        row['refused'] = (f'not like the training lesions (out-of-distribution score {ood_score:.4g} '
                          f'> {ood_threshold:.4g}): no melanoma alert; check that it is a dermoscopic '
                          'lesion image')
  return row


def prediction_rows(results: Iterable[tuple], class_names: Sequence[str], threshold: float | None,
                    temperature: dict[str, Any] | None = None,
                    detector: dict[str, Any] | None = None) -> list[dict[str, Any]]:
  """`prediction_row` of each of `results`: (file, probabilities, error[, out-of-distribution score]).

  `temperature` (the run's calibration) scales the probabilities; with the
  run's `detector`, images beyond its threshold are refused.
  """
  rows = []
  for path, probs, error, *score in results:
    if probs is not None and temperature:
      probs = calibration.scale(probs, temperature['temperature'])
    rows.append(prediction_row(path, probs, error, class_names, threshold, score[0] if score else None,
                               detector and detector['threshold']))
  return rows


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
  """Flat columns: file, predicted class, p(melanoma), alert (yes/no), in distribution (yes/no),
  out-of-distribution score, p_<class>..., why refused, error."""
  columns = ['file', 'predicted_class', 'melanoma_probability', 'melanoma_alert', 'in_distribution',
             'ood_score', *(f'p_{name}' for name in class_names), 'refused', 'error']
  clinical_report.write_csv(path, columns, [
      {**row, **{f'p_{name}': p for name, p in row['probabilities'].items()}} for row in rows])


def _ensemble_predictions(files: Sequence[pathlib.Path], metadata_csv: pathlib.Path | str | None
                          ) -> tuple[list[str], float | None, list]:
  """(class names, threshold, predictions) of the ensemble that `evaluate` evaluated on these runs;
  `metadata_csv` feeds its models that have a metadata branch."""
  try:
    description = ensemble.read_description(FLAGS.ensemble or FLAGS.workdir[0])
    if ensemble.run_paths(description['runs']) != ensemble.run_paths(FLAGS.workdir):
      raise errors.EnsembleError(f'{FLAGS.ensemble or FLAGS.workdir[0]} describes the ensemble of '
                                   f'{description["runs"]}, not of {FLAGS.workdir}.')
    if FLAGS.tta != description['tta']:
      raise errors.EnsembleError(f'The ensemble was evaluated {"with" if description["tta"] else "without"} '
                                   '--tta and its threshold holds only that way: pass the same.')
    results = ensemble.predict_files(description, files, FLAGS.batch_size,
                                     metadata_csv and metadata_lib.read_csv(metadata_csv))
  except errors.EnsembleError as e:
    sys.exit(f'Error: {e}')
  operating_point = description['operating_point']
  threshold = FLAGS.threshold if FLAGS.threshold is not None else (operating_point and operating_point['threshold'])
  return description['class_names'], threshold, results


def _metadata_csv(image_paths: Sequence[str]) -> pathlib.Path | str | None:
  """--metadata_csv, else metadata.csv in a PATH folder, else None."""
  return FLAGS.metadata_csv or next(
      (p / 'metadata.csv' for p in map(pathlib.Path, image_paths) if (p / 'metadata.csv').is_file()),
      None)


def main(argv: Sequence[str] | None = None) -> None:
  """The command with arguments `argv` (without the program name; default the command line's)."""
  image_paths = cli.parse(FLAGS, argv, __doc__, positional='image file or folder (PATH) to predict')
  runs = [p for p in image_paths
          if ensemble.is_cv_run(p) or (pathlib.Path(p) / checkpointing.CONFIG_FILE).exists()]
  if runs:
    sys.exit(f'Error: {runs} are training runs, not images: give several runs as --workdir=A --workdir=B.')
  files = find_images(image_paths)
  if len(FLAGS.workdir) > 1 or ensemble.is_cv_run(FLAGS.workdir[0]) or FLAGS.ensemble:
    class_names, threshold, results = _ensemble_predictions(files, _metadata_csv(image_paths))
    _write_results(FLAGS.workdir, class_names, threshold, results, step=None)
    return
  workdir = FLAGS.workdir[0]
  state, config, meta = cli.restore(workdir, FLAGS.step)
  class_names = meta['class_names']
  operating_point = clinical_report.read_operating_point(workdir)
  threshold = FLAGS.threshold if FLAGS.threshold is not None else (
      operating_point and operating_point['threshold'])
  if FLAGS.threshold is None and operating_point and operating_point['checkpoint']['step'] != int(state.step):
    print(f"Warning: the run's threshold was chosen for step {operating_point['checkpoint']['step']}, "
          f'not step {int(state.step)}; pass --threshold to choose.', file=sys.stderr)
  metadata_csv = _metadata_csv(image_paths)
  metadata = None
  if metadata_csv is not None and getattr(state.model, 'uses_metadata', False):
    metadata = metadata_lib.read_csv(metadata_csv)
  elif FLAGS.metadata_csv is not None:
    print(f'Warning: this run has no metadata branch; {FLAGS.metadata_csv} is not used.',
          file=sys.stderr)
  temperature = _for_this_step(calibration.read(workdir), state, 'calibration')
  detector = _for_this_step(ood.read(workdir), state, 'out-of-distribution detector')
  results = predict_files(state, files, config.image_size, FLAGS.batch_size, FLAGS.tta,
                          cli.stored_image_size(config, meta), metadata, detector,
                          preprocessing.Preprocess.from_config(config))
  _write_results(workdir, class_names, threshold, results, step=int(state.step), temperature=temperature,
                 detector=detector)


def _write_results(workdir: str | list[str], class_names: Sequence[str], threshold: float | None, results,
                   step: int | None, temperature: dict[str, Any] | None = None,
                   detector: dict[str, Any] | None = None) -> None:
  """The CSV (and JSON, naming `workdir`: the run or the ensemble's runs) of `results`: (file,
  probabilities, error[, out-of-distribution score])."""
  rows = prediction_rows(results, class_names, threshold, temperature, detector)
  output = pathlib.Path(FLAGS.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  write_csv(output, rows, class_names)
  if FLAGS.json:
    output.with_suffix('.json').write_text(json.dumps({
        'workdir': workdir, 'step': step, 'class_names': class_names,
        'threshold': threshold, 'tta': FLAGS.tta,
        'temperature': temperature and temperature['temperature'],
        'ood_threshold': detector and detector['threshold'], 'predictions': rows}, indent=2))
  errors = sum(row['error'] is not None for row in rows)
  alerts = sum(bool(row['melanoma_alert']) for row in rows)
  refused = sum(row['in_distribution'] is False for row in rows)
  print(f'{len(rows)} images ({errors} unreadable, {refused} refused as unlike the training lesions), '
        f'{alerts} melanoma alerts at threshold {threshold}: {output}')


def _for_this_step(stored: dict[str, Any] | None, state: steps.TrainState,
                   what: str) -> dict[str, Any] | None:
  """A file the run stored for its best checkpoint, with a warning when `state` is another one."""
  if stored and stored['checkpoint']['step'] != int(state.step):
    print(f"Warning: the run's {what} was fitted for step {stored['checkpoint']['step']}, not step "
          f'{int(state.step)}.', file=sys.stderr)
  return stored


if __name__ == '__main__':
  main()
