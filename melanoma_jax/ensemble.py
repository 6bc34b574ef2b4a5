"""Several trained models as one classifier: the folds of a CV run, or different runs.

Each run given counts once: a cross-validation run (`cross_validation`) is
the mean of its fold models, and the runs are then averaged, by probability
(`mean`) or by rank (`rank`). A rank is a score's quantile among the same
model's validation scores of that class, so it means the same on any set of
images, one image included, and a threshold chosen on validation carries to
Test and to new images. With `rank` the predicted class is the one in whose
scores the image ranks highest, and the scores are not probabilities.

The melanoma threshold is chosen on the ensemble's validation predictions:
for a CV run its out-of-fold predictions (every Train image predicted by the
fold model that did not train on it), so all runs of an ensemble must
validate on the same images (the same dataset and split settings).
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from melanoma_jax import clinical_report, errors, input_pipeline

COMBINE = ('mean', 'rank')
CV_FILE = 'cv_config.json'  # Marks a cross-validation run; written by cross_validation.
ENSEMBLE_FILE = 'ensemble.json'  # Members, combination and rank references, for inference.


def run_paths(workdirs: Sequence[str]) -> list[str]:
  """Run directories as compared and stored: local ones absolute, remote (gs://...) as given."""
  return [w if '://' in str(w) else os.path.abspath(w) for w in map(str, workdirs)]


def is_cv_run(workdir: epath.PathLike) -> bool:
  return (epath.Path(workdir) / CV_FILE).exists()


def fold_dirs(workdir: epath.PathLike, num_folds: int | None = None) -> list[epath.Path]:
  """The fold runs of a cross-validation run, in fold order (`num_folds` default: its CV_FILE's)."""
  workdir = epath.Path(workdir)
  if num_folds is None:
    num_folds = json.loads((workdir / CV_FILE).read_text())['num_folds']
  return [workdir / f'fold_{i}' for i in range(num_folds)]


def model_dirs(workdir: epath.PathLike) -> list[epath.Path]:
  """The model runs a run directory stands for: a CV run's folds, or itself."""
  return fold_dirs(workdir) if is_cv_run(workdir) else [epath.Path(workdir)]


def quantiles(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Mid-rank quantile in [0, 1] of each score [N, C] among the reference scores [M, C] of its column."""
  reference, scores = np.asarray(reference, np.float64), np.asarray(scores, np.float64)
  out = np.empty_like(scores)
  for c in range(scores.shape[1]):
    ref = np.sort(reference[:, c])
    below = np.searchsorted(ref, scores[:, c], side='left')
    at_or_below = np.searchsorted(ref, scores[:, c], side='right')
    out[:, c] = (below + at_or_below) / (2.0 * len(ref))
  return out


def combine_models(scores: Sequence[np.ndarray], models: Sequence[dict[str, Any]], method: str,
                   references: dict[str, np.ndarray] | None = None) -> np.ndarray:
  """The ensemble's scores [N, C] from each model's probabilities on the same images.

  Each run's models are averaged (with `rank`, each model's quantiles among
  its own validation scores, `references[model workdir]`), then the runs.
  """
  if method not in COMBINE:
    raise errors.EnsembleError(f'--combine={method!r}; choose one of {COMBINE}.')
  per_run = {}
  for s, model in zip(scores, models):
    per_run.setdefault(model['run'], []).append(
        s if method == 'mean' else quantiles(references[model['workdir']], s))
  return np.mean([np.mean(run, axis=0) for run in per_run.values()], axis=0)


@dataclasses.dataclass(frozen=True)
class Scored:
  """Scores [N, C] of named images with their labels, in one order."""
  file_names: np.ndarray
  labels: np.ndarray
  scores: np.ndarray

  def aligned(self, file_names: np.ndarray) -> 'Scored':
    """The same images in the order of `file_names` (the same set)."""
    position = {name: i for i, name in enumerate(self.file_names)}
    order = [position[name] for name in file_names]
    return Scored(self.file_names[order], self.labels[order], self.scores[order])


def predict_model(workdir: epath.PathLike, split: str, tta: bool
                  ) -> tuple[dict[str, Any], dict[str, Scored], tuple[str, ...]]:
  """(model description, {'val', split: probabilities}, class names) of a run's best checkpoint.

  Each model reads the data at its own config's image size.
  """
  from melanoma_jax import train  # pylint: disable=g-import-not-at-top  (train imports clinical_report)
  state, config, _ = train.restore_for_inference(str(workdir))
  data = input_pipeline.load_data(config)
  batch_size = math.ceil(config.batch_size / jax.device_count()) * jax.device_count()
  examples = {'train': data.train, 'val': data.val, 'test': data.test}
  scored = {}
  for name in dict.fromkeys(('val', split)):
    p = clinical_report.gather_predictions(state, examples[name], batch_size, tta)
    scored[name] = Scored(examples[name].file_names, p.labels, p.probs)
  model = {'workdir': str(workdir), 'step': int(state.step), 'image_size': config.image_size}
  return model, scored, data.class_names


def _same_images(runs: Sequence[Scored], what: str, names: Sequence[str]) -> np.ndarray:
  for run, name in zip(runs[1:], names[1:]):
    if set(run.file_names) != set(runs[0].file_names):
      raise errors.EnsembleError(
          f'{names[0]} and {name} have different {what} images ({len(runs[0].file_names)} vs '
          f'{len(run.file_names)}): an ensemble needs runs of the same dataset and split (the folds '
          'of one CV run, or runs with the same dataset, seed and split settings).')
  return runs[0].file_names


def _nll(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  p = np.take_along_axis(scores, labels[:, None].astype(np.int64), axis=-1)[:, 0]
  return -np.log(np.clip(p, np.finfo(np.float64).tiny, None))


@dataclasses.dataclass(frozen=True)
class EnsembleEvaluation:
  """The report, the ensemble's validation (out-of-fold) and evaluated scores, what inference needs."""
  evaluation: clinical_report.Evaluation
  validation: Scored
  evaluated: Scored
  class_names: tuple[str, ...]
  description: dict[str, Any]


def evaluate_runs(workdirs: Sequence[str], split: str, method: str, tta: bool,
                  target_sensitivity: float) -> EnsembleEvaluation:
  """The report of the ensemble of `workdirs` on `split`, at a threshold chosen on its validation."""
  if method not in COMBINE:
    raise errors.EnsembleError(f'--combine={method!r}; choose one of {COMBINE}.')
  models, scored, class_names = [], [], None
  workdirs = run_paths(workdirs)
  for workdir in workdirs:
    if is_cv_run(workdir) and split == 'train':
      raise errors.EnsembleError(f'{workdir} is a cross-validation run: each Train image trained all but one '
                          "of its fold models; evaluate on 'val' (out-of-fold) or 'test'.")
    for model_dir in model_dirs(workdir):
      model, predictions, names = predict_model(model_dir, split, tta)
      if class_names is not None and names != class_names:
        raise errors.EnsembleError(f'{model_dir} has classes {names}; {models[0]["workdir"]} has {class_names}.')
      class_names = names
      models.append({**model, 'run': str(workdir)})
      scored.append(predictions)
  references = {m['workdir']: s['val'].scores for m, s in zip(models, scored)}
  # Validation: every run's images, each scored by the models that validated on it
  # (one fold model per image of a CV run), then the runs averaged.
  per_run = []
  for workdir in workdirs:
    mine = [(m, s['val']) for m, s in zip(models, scored) if m['run'] == str(workdir)]
    per_run.append(Scored(
        np.concatenate([s.file_names for _, s in mine]), np.concatenate([s.labels for _, s in mine]),
        np.concatenate([combine_models([s.scores], [m], method, references) for m, s in mine])))
  names = _same_images(per_run, 'validation', workdirs)
  val = Scored(names, per_run[0].aligned(names).labels,
               np.mean([run.aligned(names).scores for run in per_run], axis=0))
  if split == 'val':
    evaluated = val
  else:
    names = _same_images([s[split] for s in scored], clinical_report.SPLIT_TITLES[split], [m['workdir'] for m in models])
    aligned = [s[split].aligned(names) for s in scored]
    evaluated = Scored(names, aligned[0].labels,
                       combine_models([a.scores for a in aligned], models, method, references))
  selected_by = 'out-of-fold predictions' if any(map(is_cv_run, workdirs)) else 'validation'
  description = {
      'members': [f'{m["workdir"]} (step {m["step"]}, {m["image_size"]} px)' for m in models],
      'runs': [str(w) for w in workdirs], 'combine': method, 'tta': tta, 'selected_by': selected_by,
  }
  predictions = {name: clinical_report.Predictions(s.scores, s.labels, _nll(s.scores, s.labels), s.file_names)
                 for name, s in (('val', val), (split, evaluated))}
  result = clinical_report.evaluate_predictions(predictions, class_names, split, target_sensitivity,
                                           description)
  if result.report['operating_point']:
    result.report['operating_point']['chosen_on'] = selected_by
  description = {**description, 'models': models, 'class_names': list(class_names),
                 'operating_point': result.report['operating_point'],
                 'references': ({k: v.tolist() for k, v in references.items()}
                                if method == 'rank' else None)}
  return EnsembleEvaluation(result, val, evaluated, class_names, description)



def write_predictions(path: epath.PathLike, scored: Scored, class_names: Sequence[str]) -> None:
  """`scored` as predictions.csv (`clinical_report.write_predictions_csv`); process 0 only."""
  if jax.process_index() == 0:
    clinical_report.write_predictions_csv(path, scored.file_names, scored.labels, scored.scores, class_names)


def write(output_dir: epath.PathLike, result: EnsembleEvaluation) -> None:
  """The report and plots, predictions.csv of the evaluated split, the operating point and
  ensemble.json (members, combination, rank references) for `inference`; process 0 only."""
  if jax.process_index() != 0:
    return
  output_dir = epath.Path(output_dir)
  clinical_report.write_reports(output_dir, result.evaluation)  # predictions.csv included
  clinical_report.write_operating_point(output_dir, result.evaluation.report['operating_point'])
  (output_dir / ENSEMBLE_FILE).write_text(json.dumps(result.description, indent=2))


def read_description(path: epath.PathLike) -> dict[str, Any]:
  """An ensemble.json written by `write` (a file or the folder holding it)."""
  path = epath.Path(path)
  path = path / ENSEMBLE_FILE if path.is_dir() else path
  if not path.exists():
    raise errors.EnsembleError(f'{path} not found: run `python -m melanoma_jax.evaluate --workdir RUN...` '
                        'with the same runs, --combine and --tta first; it writes ensemble.json.')
  return json.loads(path.read_text())


def predict_files(description: dict[str, Any], files: Sequence[Any], batch_size: int = 32,
                  metadata: dict[str, np.ndarray] | None = None
                  ) -> list[tuple[Any, np.ndarray | None, str | None]]:
  """(file, ensemble scores or None, error or None) per file, as `inference.predict_files`.

  The models, their checkpoints, the combination and TTA are the ensemble's
  (`description`, from ensemble.json), so the scores match its threshold.
  Each model decodes files as its own run prepared its data; `metadata`
  (`metadata.read_csv`) feeds the models that have a metadata branch.
  """
  # pylint: disable=g-import-not-at-top  (both import clinical_report, which this module's users import)
  from melanoma_jax import cli, inference, preprocessing, train
  per_model, file_errors = [], None
  for model in description['models']:
    try:
      state, config, meta = train.restore_for_inference(model['workdir'], model['step'])
    except FileNotFoundError as e:
      raise errors.EnsembleError(f'{e} The ensemble was evaluated with that checkpoint: evaluate the '
                                 'ensemble again to use the runs as they are now.') from None
    rows = list(inference.predict_files(state, files, config.image_size, batch_size, description['tta'],
                                        cli.stored_image_size(config, meta), metadata,
                                        preprocess=preprocessing.Preprocess.from_config(config)))
    file_errors = [error for _, _, error, _ in rows]
    per_model.append([probs for _, probs, _, _ in rows])
  references = {k: np.asarray(v) for k, v in (description.get('references') or {}).items()}
  readable = [i for i, error in enumerate(file_errors) if error is None]
  scores = {}
  if readable:
    combined = combine_models([np.stack([probs[i] for i in readable]) for probs in per_model],
                              description['models'], description['combine'], references)
    scores = dict(zip(readable, combined))
  return [(path, scores.get(i), error) for i, (path, error) in enumerate(zip(files, file_errors))]
