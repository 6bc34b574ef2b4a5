"""K-fold cross-validation: every fold's run, the out-of-fold predictions and the CV summary.

  python launch.py --config=configs/balanced.py:synthetic --config.num_folds=5 --all_folds --workdir=runs/cv

Fold i trains on the other folds of Train and validates on fold i
(`input_pipeline.assign_folds`: lesion/patient groups whole, classes
stratified) in WORKDIR/fold_i/, an ordinary run. Rerunning the command skips
finished folds and resumes an unfinished one. When all are done, WORKDIR gets
oof_predictions.csv (every Train image once, predicted by the fold model that
did not train on it), the fold models' ensemble evaluated on Test at a
threshold chosen on those out-of-fold predictions (report.md, predictions.csv,
operating_point.json, ensemble.json), and cv_report.md / cv_report.json: the
mean and standard deviation over folds of every metric.
"""

import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from melanoma_jax import clinical_report, ensemble, train
from melanoma_jax.errors import ConfigError

OOF_FILE = 'oof_predictions.csv'
CV_REPORT_JSON = 'cv_report.json'
CV_REPORT_MD = 'cv_report.md'
FINISHED_FILE = 'test_metrics.json'  # Written by a run's final evaluation.
_SKIPPED = ('reliability', 'confusion_matrix')


def fold_config(config: ml_collections.ConfigDict, fold: int) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  config.fold = fold
  return config


def _claim(workdir: epath.Path, config: ml_collections.ConfigDict, start_over: bool) -> None:
  """Marks WORKDIR as a CV run of `config.num_folds` folds; refuses a different fold count."""
  path = workdir / ensemble.CV_FILE
  if path.exists() and not start_over:
    previous = json.loads(path.read_text())['num_folds']
    if previous != config.num_folds:
      raise ConfigError(f'{workdir} holds a {previous}-fold CV run, not {config.num_folds} folds. Use '
                        'another --workdir, or pass --start_over to move the old fold runs aside.')
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'num_folds': config.num_folds, 'config': json.loads(config.to_json())},
                               indent=2))


def run_all_folds(config: ml_collections.ConfigDict, workdir: str,
                  start_over: bool = False) -> dict[str, Any] | None:
  """Trains every fold not yet finished, then writes the CV outputs; None when preempted."""
  if config.get('num_folds', 0) < 2:
    raise ConfigError('--all_folds needs --config.num_folds=K with K >= 2.')
  workdir = epath.Path(workdir)
  _claim(workdir, config, start_over)
  for fold, fold_dir in enumerate(ensemble.fold_dirs(workdir, config.num_folds)):
    if (fold_dir / FINISHED_FILE).exists() and not start_over:
      logging.info('Fold %d/%d is finished (%s); skipped.', fold, config.num_folds, fold_dir)
      continue
    logging.info('Fold %d/%d: training in %s', fold, config.num_folds, fold_dir)
    if train.train_and_evaluate(fold_config(config, fold), str(fold_dir), start_over) is None:
      return None
  return summarize(workdir, config.target_sensitivity)


def summarize(workdir: epath.PathLike, target_sensitivity: float) -> dict[str, Any]:
  """Out-of-fold predictions, the fold ensemble's Test report and the CV report of finished folds."""
  workdir = epath.Path(workdir)
  result = ensemble.evaluate_runs([str(workdir)], 'test', 'mean', False, target_sensitivity)
  ensemble.write(workdir, result)
  ensemble.write_predictions(workdir / OOF_FILE, result.validation, result.class_names)
  folds = [json.loads((d / clinical_report.REPORT_JSON).read_text()) for d in ensemble.fold_dirs(workdir)]
  summary = cv_summary(folds, result.evaluation.report)
  if jax.process_index() == 0:
    (workdir / CV_REPORT_JSON).write_text(json.dumps(summary, indent=2, allow_nan=False))
    (workdir / CV_REPORT_MD).write_text(to_markdown(summary))
  logging.info('CV report: %s; ensemble of the folds: %s', workdir / CV_REPORT_MD,
               clinical_report.headline(result.evaluation.report))
  return summary


def flatten(report: dict[str, Any], prefix: str = '') -> dict[str, float | None]:
  """The scalar metrics of a split's report as {'melanoma.sensitivity': value, ...}.

  A metric given with its interval ({'value': .., 'ci95': ..}) counts by its value.
  """
  flat = {}
  for key, value in report.items():
    name = prefix + key
    if key in _SKIPPED:
      continue
    if isinstance(value, dict) and 'value' in value:
      value = value['value']
    if isinstance(value, dict):
      flat.update(flatten(value, name + '.'))
    elif value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
      flat[name] = value
  return flat


def mean_and_std(values: Sequence[float | None]) -> dict[str, Any]:
  """Mean and sample standard deviation (n - 1) over the folds where the metric is defined."""
  defined = np.array([v for v in values if v is not None], np.float64)
  return {'mean': float(defined.mean()) if len(defined) else None,
          'std': float(defined.std(ddof=1)) if len(defined) > 1 else None,
          'folds_defined': len(defined)}


def cv_summary(fold_reports: Sequence[dict[str, Any]], ensemble_report: dict[str, Any]) -> dict[str, Any]:
  """Every metric per fold, its mean and standard deviation over folds, pooled out-of-fold and the
  fold ensemble on Test. `fold_reports` are the folds' report.json (validation = the held-out fold)."""
  summary = {'num_folds': len(fold_reports), 'std': 'sample standard deviation over folds (n - 1)'}
  for split, title in (('val', 'held_out_fold'), ('test', 'test')):
    per_fold = [flatten(report['splits'][split]) for report in fold_reports]
    keys = list(dict.fromkeys(k for flat in per_fold for k in flat))
    summary[title] = {k: {**mean_and_std([flat.get(k) for flat in per_fold]),
                          'per_fold': [flat.get(k) for flat in per_fold]} for k in keys}
  summary['out_of_fold_pooled'] = flatten(ensemble_report['splits']['val'])
  summary['ensemble_test'] = flatten(ensemble_report['splits']['test'])
  summary['ensemble_operating_point'] = ensemble_report['operating_point']
  return summary


def to_markdown(summary: dict[str, Any]) -> str:
  """cv_report.md: one row per metric; fold means +- standard deviation, pooled and ensemble."""
  k = summary['num_folds']
  op = summary['ensemble_operating_point']
  lines = [f'# {k}-fold cross-validation', '',
           f'Held-out fold: each fold model on the fold it did not train on (its melanoma threshold '
           f'chosen there); Test: each fold model on Test at that threshold. Mean +- {summary["std"]}. '
           'Out-of-fold pooled: all held-out predictions together (each Train image once); ensemble: '
           'the mean of the fold models on Test, at the threshold chosen on the pooled out-of-fold '
           'predictions' + (f' ({op["threshold"]:.4f}).' if op else '.'), '',
           '| metric | held-out fold | Test (fold models) | out-of-fold pooled | ensemble on Test |',
           '|---|---|---|---|---|']
  held, test = summary['held_out_fold'], summary['test']
  cell = clinical_report.markdown_cell
  pm = lambda s: 'n/a' if s is None or s['mean'] is None else f'{cell(s["mean"])} +- {cell(s["std"])}'
  for key in dict.fromkeys([*held, *test]):
    lines.append(f'| {key} | {pm(held.get(key))} | {pm(test.get(key))} | '
                 f'{cell(summary["out_of_fold_pooled"].get(key))} | {cell(summary["ensemble_test"].get(key))} |')
  return '\n'.join(lines) + '\n'
