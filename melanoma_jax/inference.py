"""Melanoma alerts for image files with a trained run.

  python -m melanoma_jax.inference --workdir=runs/balanced --output=preds.csv [--json] [--tta] PATH...

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

import json
import pathlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from melanoma_jax import runtime

if __name__ == '__main__':
  runtime.configure()  # Before JAX and TensorFlow load (XLA flags; TensorFlow's banners off).

import jax
import numpy as np

from melanoma_jax import calibration, cli, clinical_report, ensemble, errors, ood, paths, preprocessing, steps
from melanoma_jax import metadata as metadata_lib
from melanoma_jax.datasets import folder_layout
from melanoma_jax.datasets import tables


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


_PREDICT = {False: jax.jit(steps.predict), True: jax.jit(steps.predict_tta)}


def _decode(path: pathlib.Path, stored_size: int, image_size: int) -> tuple[np.ndarray | None, str | None]:
  if not path.is_file():
    return None, 'not a regular file' if path.exists() else 'no such file'
  try:
    return preprocessing.model_input(path, stored_size, image_size), None
  except errors.UnreadableImageError as e:
    return None, str(e)


def predict_files(state: steps.TrainState, files: Sequence[pathlib.Path], image_size: int,
                  batch_size: int = 32, tta: bool = False, stored_size: int | None = None,
                  metadata: Mapping[str, np.ndarray] | None = None,
                  ood_score: Callable[[steps.TrainState, np.ndarray], jax.Array] | None = None
                  ) -> Iterator[tuple[pathlib.Path, np.ndarray | None, str | None, float | None]]:
  """(file, class probabilities or None, error or None, `ood_score` or None) per file, in order.

  Files are decoded as the run's dataset stored its images (`stored_size`,
  default `image_size`) and resized as training resized them
  (`preprocessing.model_input`). They are decoded a batch at a time; every
  batch is padded to `batch_size`, so the jitted predict compiles once.
  `metadata` (from `metadata_lib.read_csv`, by image key) feeds models with
  a metadata branch; a file it lacks has unknown metadata. The
  out-of-distribution score is of the image as given (not its TTA views).
  """
  predict = _PREDICT[tta]
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    decoded = [_decode(path, stored_size or image_size, image_size) for path in chunk]
    images = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
    readable = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
    for i in readable:
      images[i] = decoded[i][0]
    encoded = None
    if metadata is not None:
      encoded = metadata_lib.unknown(batch_size)
      for i, path in enumerate(chunk):
        encoded[i] = metadata.get(tables.image_key(path.name), encoded[i])
    probs = np.asarray(predict(state, images, encoded)) if readable else None
    scores = np.asarray(ood_score(state, images)) if readable and ood_score else None
    for i, (path, (_, error)) in enumerate(zip(chunk, decoded)):
      yield (path, (None if error else probs[i]), error,
             None if error or scores is None else float(scores[i]))


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


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
  """Flat columns: file, predicted class, p(melanoma), alert (yes/no), in distribution (yes/no),
  out-of-distribution score, p_<class>..., why refused, error."""
  columns = ['file', 'predicted_class', 'melanoma_probability', 'melanoma_alert', 'in_distribution',
             'ood_score', *(f'p_{name}' for name in class_names), 'refused', 'error']
  clinical_report.write_csv(path, columns, [
      {**row, **{f'p_{name}': p for name, p in row['probabilities'].items()}} for row in rows])


def _ensemble_predictions(args, files: Sequence[pathlib.Path]) -> tuple[list[str], float | None, list]:
  """(class names, threshold, predictions) of the ensemble that `evaluate` evaluated on these runs."""
  try:
    description = ensemble.read_description(args.ensemble or args.workdir[0])
    if ensemble.run_paths(description['runs']) != ensemble.run_paths(args.workdir):
      raise errors.EnsembleError(f'{args.ensemble or args.workdir[0]} describes the ensemble of '
                                   f'{description["runs"]}, not of {args.workdir}.')
    if args.tta != description['tta']:
      raise errors.EnsembleError(f'The ensemble was evaluated {"with" if description["tta"] else "without"} '
                                   '--tta and its threshold holds only that way: pass the same.')
    results = ensemble.predict_files(description, files, args.batch_size)
  except errors.EnsembleError as e:
    sys.exit(f'Error: {e}')
  operating_point = description['operating_point']
  threshold = args.threshold if args.threshold is not None else (operating_point and operating_point['threshold'])
  return description['class_names'], threshold, results


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.run_parser(__doc__, several=True)
  parser.add_argument('--ensemble', default=None,
                      help='Several --workdir runs: the output of `evaluate` on them (its ensemble.json: '
                      "models, --combine, --tta, threshold); default: a CV run's own.")
  parser.add_argument('paths', nargs='+', metavar='PATH', help='Image files and folders.')
  parser.add_argument('--output', required=True, type=paths.user_path, help='CSV file to write.')
  parser.add_argument('--json', action='store_true', help='Also write the results as JSON (.json).')
  parser.add_argument('--tta', action='store_true', help='Average the 8 flips and rotations.')
  parser.add_argument('--batch_size', type=cli.positive_int, default=32)
  parser.add_argument('--metadata_csv', default=None,
                      help='Age, sex and site per image, for runs trained with model.metadata '
                           '(default: metadata.csv in a PATH folder, if there).')
  parser.add_argument('--threshold', type=cli.probability, default=None,
                      help="Alert threshold on p(melanoma); default: the run's operating point.")
  args = parser.parse_args(argv)
  files = find_images(args.paths)
  if len(args.workdir) > 1 or ensemble.is_cv_run(args.workdir[0]) or args.ensemble:
    class_names, threshold, results = _ensemble_predictions(args, files)
    _write_results(args, class_names, threshold, results, step=None)
    return
  args.workdir = args.workdir[0]
  state, config, meta = cli.restore(args)
  class_names = meta['class_names']
  operating_point = clinical_report.read_operating_point(args.workdir)
  threshold = args.threshold if args.threshold is not None else (
      operating_point and operating_point['threshold'])
  if args.threshold is None and operating_point and operating_point['checkpoint']['step'] != int(state.step):
    print(f"Warning: the run's threshold was chosen for step {operating_point['checkpoint']['step']}, "
          f'not step {int(state.step)}; pass --threshold to choose.', file=sys.stderr)
  metadata_csv = args.metadata_csv or next(
      (p / 'metadata.csv' for p in map(pathlib.Path, args.paths) if (p / 'metadata.csv').is_file()),
      None)
  metadata = None
  if metadata_csv is not None and getattr(state.model, 'uses_metadata', False):
    metadata = metadata_lib.read_csv(metadata_csv)
  elif args.metadata_csv is not None:
    print(f'Warning: this run has no metadata branch; {args.metadata_csv} is not used.',
          file=sys.stderr)
  temperature = _for_this_step(calibration.read(args.workdir), state, 'calibration')
  detector = _for_this_step(ood.read(args.workdir), state, 'out-of-distribution detector')
  results = predict_files(state, files, config.image_size, args.batch_size, args.tta,
                          cli.stored_image_size(config, meta), metadata,
                          detector and ood.scorer(detector))
  _write_results(args, class_names, threshold, results, step=int(state.step), temperature=temperature,
                 detector=detector)


def _write_results(args, class_names: Sequence[str], threshold: float | None, results,
                   step: int | None, temperature: dict[str, Any] | None = None,
                   detector: dict[str, Any] | None = None) -> None:
  """The CSV (and JSON) of `results`: (file, probabilities, error[, out-of-distribution score]).

  `temperature` (the run's calibration) scales the probabilities; with the
  run's `detector`, images beyond its threshold are refused.
  """
  rows = []
  for path, probs, error, *score in results:
    if probs is not None and temperature:
      probs = calibration.scale(probs, temperature['temperature'])
    rows.append(prediction_row(path, probs, error, class_names, threshold, score[0] if score else None,
                               detector and detector['threshold']))
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  write_csv(output, rows, class_names)
  if args.json:
    output.with_suffix('.json').write_text(json.dumps({
        'workdir': args.workdir, 'step': step, 'class_names': class_names,
        'threshold': threshold, 'tta': args.tta,
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
