"""The clinical report of a model on a split: predictions, figures, operating point, files.

Accuracy alone hides what matters for a melanoma alert: how many melanomas
are missed, at what false-alarm rate, and whether the probabilities mean
anything. So the report gives per-class sensitivity and specificity, ROC AUC,
calibration, and the melanoma-vs-rest figures at an alert threshold chosen on
validation for a target sensitivity, never on the split being reported.

Predictions are gathered whole, every example exactly once (device padding
dropped by mask, host shares reassembled in dataset order), and every metric
is computed from them in numpy (`metrics`), so figures do not depend on how
many devices or hosts ran the model. Undefined values (0/0, a class absent from the labels)
are NaN here and null in JSON.
"""

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from melanoma_jax import (calibration, datasets, input_pipeline, intervals, metrics as metrics_lib, plots,
                          run_files, steps, subgroups)

REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
PREDICTIONS_CSV = 'predictions.csv'
OPERATING_POINT_FILE = 'operating_point.json'
SPLIT_TITLES = {'train': 'train', 'val': 'validation', 'test': 'Test'}

# Keyed by test-time augmentation (the 8 dihedral views averaged).
_P_PREDICT_WITH_LOSS = {False: jax.pmap(steps.predict_with_loss, in_axes=(None, 0)),
                        True: jax.pmap(steps.predict_with_loss_tta, in_axes=(None, 0))}


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A split's class probabilities [N, C], labels [N], per-example losses [N] and files, in its order."""
  probs: np.ndarray
  labels: np.ndarray
  losses: np.ndarray
  file_names: np.ndarray | None = None

  def summary(self, prefix: str) -> dict[str, Any]:
    """Loss, accuracy, balanced accuracy, recall per class and confusion, as the training history keys them."""
    count = len(self.labels)
    predicted = np.argmax(self.probs, axis=-1)
    return metrics_lib.summarize({
        'loss': (np.sum(self.losses, dtype=np.float64), count),
        'accuracy': (np.sum(predicted == self.labels), count),
        'confusion': (metrics_lib.confusion_matrix(self.labels, predicted, self.probs.shape[-1]), count),
    }, prefix)


def gather_predictions(state: steps.TrainState, examples: input_pipeline.Examples,
                       batch_size: int, tta: bool = False) -> Predictions:
  """A split's predictions, in its order, on every host; `tta` averages the 8 dihedral views.

  `batch_size` is global, as for `input_pipeline.eval_batches`. Host p holds
  examples p, p + hosts, ... (`input_pipeline.host_shard`): the shares are
  gathered and interleaved back, padding dropped.
  """
  local = {'probs': [], 'losses': [], 'labels': [], 'mask': []}
  for batch in input_pipeline.eval_batches(examples, batch_size):
    probs, losses = _P_PREDICT_WITH_LOSS[tta](state, batch)
    local['probs'].append(probs)
    local['losses'].append(losses)
    local['labels'].append(batch['label'])
    local['mask'].append(batch['mask'])
  ordered = gather_in_order(local)
  return Predictions(ordered['probs'], ordered['labels'].astype(np.int32), ordered['losses'],
                     examples.file_names)


def gather_in_order(local: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-batch outputs [devices, per-device batch, ...] of this host, gathered across hosts.

  In dataset order, padding (`local['mask']`) dropped: host p's share is
  examples p, p + hosts, ... (`input_pipeline.host_shard`).
  """
  local = {k: np.concatenate([np.asarray(v).reshape(-1, *v.shape[2:]) for v in parts])
           for k, parts in local.items()}
  # [hosts, padded share, ...]: every host runs the same number of batches.
  gathered = multihost_utils.process_allgather(local)
  ordered = {k: np.swapaxes(np.asarray(v), 0, 1).reshape(-1, *v.shape[2:]) for k, v in gathered.items()}
  keep = ordered.pop('mask').astype(bool)
  return {k: v[keep] for k, v in ordered.items()}




def melanoma_index(class_names: Sequence[str]) -> int | None:
  """Column of p(melanoma): 1 for melanoma_vs_rest ('other', 'melanoma'); None without one."""
  return list(class_names).index(datasets.MELANOMA) if datasets.MELANOMA in class_names else None


def _jsonable(value: Any) -> Any:
  """Plain Python values for json.dumps; NaN and infinities become None."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def report(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
           threshold: float | None = None) -> dict[str, Any]:
  """Every metric of one split, JSON-able; `threshold` is the melanoma alert threshold.

  Predicted class is the most probable one; the melanoma alert is
  p(melanoma) >= threshold, a separate decision.
  """
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  predicted = np.argmax(probs, axis=-1)
  confusion = metrics_lib.confusion_matrix(labels, predicted, len(class_names))
  per_class = metrics_lib.per_class_metrics(confusion)
  auc = np.array([metrics_lib.roc_auc(probs[:, c], labels == c) for c in range(len(class_names))])
  result = {
      'num_examples': len(labels),
      'accuracy': float(metrics_lib.ratio(np.trace(confusion), confusion.sum())),
      'balanced_accuracy': metrics_lib.nanmean(per_class['recall']),
      'macro_f1': metrics_lib.nanmean(per_class['f1']),
      'macro_roc_auc': metrics_lib.nanmean(auc),
      'expected_calibration_error': metrics_lib.expected_calibration_error(probs.max(axis=-1),
                                                                           predicted == labels),
      'reliability': metrics_lib.reliability(probs.max(axis=-1), predicted == labels),
      'per_class': {name: {**{k: v[c] for k, v in per_class.items()}, 'roc_auc': auc[c]}
                    for c, name in enumerate(class_names)},
      'confusion_matrix': confusion,
      'melanoma': None,
  }
  m = melanoma_index(class_names)
  if m is not None:
    p, positive = probs[:, m], labels == m
    result['melanoma'] = {
        'support': int(positive.sum()),
        'roc_auc': metrics_lib.roc_auc(p, positive),
        'expected_calibration_error': metrics_lib.expected_calibration_error(p, positive),
        'reliability': metrics_lib.reliability(p, positive),
        'threshold': threshold,
        **(metrics_lib.binary_at_threshold(p, positive, threshold) if threshold is not None else {}),
    }
  return _jsonable(result)


def calibration_effect(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray,
                       melanoma: int | None) -> dict[str, Any]:
  """ECE and NLL before and after scaling, and the reliability bins before, of one split."""
  labels = np.asarray(labels)
  result = {'nll_before': calibration.negative_log_likelihood(raw, labels),
            'nll_after': calibration.negative_log_likelihood(calibrated, labels)}
  outcomes = {'top_class': (lambda p: p.max(axis=-1), lambda p: np.argmax(p, axis=-1) == labels)}
  if melanoma is not None:
    outcomes['melanoma'] = (lambda p: p[:, melanoma], lambda p: labels == melanoma)
  for name, (probability, outcome) in outcomes.items():
    result[f'ece_{name}_before'] = metrics_lib.expected_calibration_error(probability(raw), outcome(raw))
    result[f'ece_{name}_after'] = metrics_lib.expected_calibration_error(
        probability(calibrated), outcome(calibrated))
    result[f'reliability_{name}_before'] = metrics_lib.reliability(probability(raw), outcome(raw))
  return result


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """A checkpoint's full report and the predictions on the evaluated split (for plots)."""
  report: dict[str, Any]
  predictions: Predictions


def evaluate_checkpoint(state: steps.TrainState, data: input_pipeline.Data, split: str,
                        target_sensitivity: float, batch_size: int,
                        checkpoint: dict[str, Any], tta: bool = False) -> Evaluation:
  """Reports on validation and `split`, at a melanoma threshold chosen on validation.

  Probabilities are temperature-scaled with a temperature fitted on
  validation, and the threshold is chosen on the scaled ones. `checkpoint`
  (step, epoch, how it was selected) is recorded in the report, the
  calibration and the operating point; `tta` averages the 8 dihedral views
  of each image. Where the split's examples carry patient attributes
  (`extras` age, sex, site), the report adds per-subgroup melanoma results.
  """
  examples = {'train': data.train, 'val': data.val, 'test': data.test}
  raw = {name: gather_predictions(state, examples[name], batch_size, tta)
         for name in dict.fromkeys(('val', split))}
  temperature = calibration.fit(raw['val'].probs, raw['val'].labels, checkpoint)
  predictions = {name: dataclasses.replace(p, probs=calibration.scale(p.probs, temperature['temperature']))
                 for name, p in raw.items()}
  extras = examples[split].extras
  attributes = {name: extras[name] for name in datasets.METADATA_FEATURES if name in extras}
  result = evaluate_predictions(predictions, data.class_names, split, target_sensitivity,
                                {**checkpoint, 'tta': tta}, attributes)
  m = melanoma_index(data.class_names)
  result.report['calibration'] = temperature
  result.report['calibration_effect'] = _jsonable(
      {name: calibration_effect(raw[name].probs, p.probs, p.labels, m) for name, p in predictions.items()})
  if result.report['operating_point']:
    result.report['operating_point']['probabilities'] = 'calibrated'
  return result


def evaluate_predictions(predictions: dict[str, Predictions], class_names: Sequence[str], split: str,
                         target_sensitivity: float, checkpoint: dict[str, Any],
                         attributes: dict[str, np.ndarray] | None = None) -> Evaluation:
  """The report of `predictions` ({'val': .., split: ..}) of one model or an ensemble.

  Headline figures carry 95% intervals; `attributes` (name -> a value per
  example of `split`) adds per-subgroup melanoma results.
  """
  m = melanoma_index(class_names)
  operating_point = None
  if m is not None and np.any(predictions['val'].labels == m):
    probs, labels = predictions['val'].probs, predictions['val'].labels
    operating_point = {
        'class_name': datasets.MELANOMA, 'class_index': m,
        'threshold': metrics_lib.choose_threshold(probs[:, m], labels == m, target_sensitivity),
        'rule': 'alert when p(melanoma) >= threshold',
        'chosen_on': 'validation', 'target_sensitivity': target_sensitivity,
        'checkpoint': checkpoint,
    }
  threshold = operating_point and operating_point['threshold']
  full = {
      'checkpoint': checkpoint,
      'split': split,
      'class_names': list(class_names),
      'operating_point': operating_point,
      'calibration_binning': metrics_lib.CALIBRATION_BINNING,
      'splits': {name: intervals.add_intervals(report(p.probs, p.labels, class_names, threshold),
                                               p.probs, p.labels, class_names)
                 for name, p in predictions.items()},
  }
  if attributes and m is not None:
    full['subgroups'] = subgroups.subgroup_report(
        attributes, predictions[split].probs[:, m], predictions[split].labels == m, threshold)
  return Evaluation(full, predictions[split])


# (title, report key) of the tables.
_OVERALL_ROWS = (('accuracy', 'accuracy'), ('balanced accuracy', 'balanced_accuracy'),
                 ('macro F1', 'macro_f1'), ('macro ROC AUC (one vs rest)', 'macro_roc_auc'),
                 ('ECE (top class)', 'expected_calibration_error'))
_MELANOMA_ROWS = (('melanomas', 'support'), ('ROC AUC', 'roc_auc'), ('sensitivity', 'sensitivity'),
                  ('specificity', 'specificity'), ('PPV (alerts that are melanoma)', 'ppv'),
                  ('NPV', 'npv'), ('missed melanomas', 'false_negatives'),
                  ('false alarms', 'false_positives'),
                  ('ECE of p(melanoma)', 'expected_calibration_error'))


def markdown_cell(value: Any) -> str:
  """A figure in a Markdown table: 3 decimals, with its interval if it has one; 'n/a' if undefined."""
  if isinstance(value, dict):
    return intervals.format_figure(value)
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return 'n/a'
  return f'{value:.3f}' if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *('| ' + ' | '.join(markdown_cell(v) for v in row) + ' |' for row in rows)]


def headline(full: dict[str, Any]) -> str:
  """One line of the evaluated split's key figures, for logs."""
  evaluated = full['splits'][full['split']]
  line = (f'{SPLIT_TITLES[full["split"]]}: ' + ', '.join(
      f'{title} {markdown_cell(evaluated[key])}' for title, key in _OVERALL_ROWS))
  op = full['operating_point']
  if op is not None:
    melanoma = evaluated['melanoma']
    line += (f'; melanoma alert at p >= {op["threshold"]:.4f} (validation sensitivity >= '
             f'{op["target_sensitivity"]:.2f}): ' + ', '.join(
                 f'{title} {markdown_cell(melanoma[key])}' for title, key in _MELANOMA_ROWS[1:5]))
  return line


def _models_lines(checkpoint: dict[str, Any]) -> list[str]:
  """What was evaluated: a checkpoint, or an ensemble's members; and test-time augmentation."""
  if 'members' in checkpoint:
    lines = [f'Ensemble of {len(checkpoint["members"])} models ({checkpoint["combine"]}), threshold '
             f'chosen on {checkpoint["selected_by"]}:', '',
             *(f'- {member}' for member in checkpoint['members'])]
    if checkpoint['combine'] == 'rank':
      lines += ['', 'Scores are averaged ranks (quantiles among each model\'s validation scores), not '
                'probabilities: the predicted class is the one the image ranks highest in, and the '
                'calibration figures (ECE, reliability) do not apply.']
  else:
    lines = [f'Checkpoint: step {checkpoint["step"]}, epoch {checkpoint["epoch"]} '
             f'({checkpoint["selected_by"]}).']
  if checkpoint.get('tta'):
    lines += ['', 'Test-time augmentation: probabilities averaged over the 8 dihedral views '
              '(4 rotations, each also flipped) of every image, validation included.']
  return lines + ['']


def to_markdown(full: dict[str, Any]) -> str:
  """report.md: the melanoma alert first, then overall, per-class and confusion tables."""
  splits = full['splits']
  names = list(splits)
  header = ['', *(f'{SPLIT_TITLES[n]} ({splits[n]["num_examples"]} images)' for n in names)]
  evaluated = splits[full['split']]
  checkpoint = full['checkpoint']
  lines = [f'# Evaluation on {SPLIT_TITLES[full["split"]]}', '', *_models_lines(checkpoint)]
  op = full['operating_point']
  if op is None:
    lines += ['No melanoma alert: the classes have no melanoma, or validation none.', '']
  else:
    lines += ['## Melanoma alert (melanoma vs rest)', '',
              f'Alert when p(melanoma) >= **{op["threshold"]:.4f}**, chosen on {op["chosen_on"]} as the highest '
              f'threshold with sensitivity >= {op["target_sensitivity"]:.2f}.', '']
    lines += _table(header, [(title, *(splits[n]['melanoma'][key] for n in names))
                             for title, key in _MELANOMA_ROWS]) + ['']
  lines += ['## Overall', ''] + _table(header, [(title, *(splits[n][key] for n in names))
                                                for title, key in _OVERALL_ROWS])
  lines += ['', f'Calibration: {full["calibration_binning"]}', '']
  lines += calibration_markdown(full) + [evaluated.get('intervals', ''), '']
  lines += [f'## Per class ({SPLIT_TITLES[full["split"]]})', '']
  keys = ('support', 'precision', 'recall', 'specificity', 'f1', 'roc_auc')
  lines += _table(['class', 'support', 'precision', 'recall (sensitivity)', 'specificity', 'F1',
                   'ROC AUC'], [(name, *(m[k] for k in keys)) for name, m in evaluated['per_class'].items()])
  class_names = full['class_names']
  lines += ['', f'## Confusion matrix ({SPLIT_TITLES[full["split"]]}; rows true, columns predicted)', '']
  lines += _table(['true \\ predicted', *(f'{i}' for i in range(len(class_names)))],
                  [(f'{i} {name}', *row) for i, (name, row) in
                   enumerate(zip(class_names, evaluated['confusion_matrix']))])
  if full.get('out_of_distribution'):
    lines += ['', *ood_markdown(full['out_of_distribution'])]
  if full.get('subgroups'):
    lines += ['', *subgroups.to_markdown(full['subgroups'], SPLIT_TITLES[full['split']])]
  lines += ['', '## Plots', '', *(f'![{name}]({file})' for name, file in plots.REPORT_PLOTS.items()), '']
  return '\n'.join(lines)


def ood_markdown(summary: dict[str, Any]) -> list[str]:
  """The out-of-distribution threshold and how many images of each split pass it."""
  rates = ', '.join(f'{SPLIT_TITLES[name]} {summary[f"{name}_pass_rate"]:.1%}'
                    for name in ('train', 'val', 'test') if f'{name}_pass_rate' in summary)
  return ['## Out-of-distribution refusal', '',
          f'Inference refuses (no melanoma alert) an image whose {summary["method"]} score exceeds '
          f'{summary["threshold"]:.4g}, chosen so that {summary["pass_fraction"]:.0%} of validation images '
          f'pass. Passing: {rates}.']


def calibration_markdown(full: dict[str, Any]) -> list[str]:
  """The temperature and what it did to ECE and NLL on each split."""
  record, effect = full.get('calibration'), full.get('calibration_effect')
  if not record:
    return []
  names = list(effect)
  rows = [(f'{title}, {when}', *(effect[n].get(f'{key}_{when}') for n in names))
          for title, key in (('ECE (top class)', 'ece_top_class'), ('ECE of p(melanoma)', 'ece_melanoma'),
                             ('NLL', 'nll'))
          if f'{key}_before' in effect[names[0]] for when in ('before', 'after')]
  return ['## Calibration (temperature scaling)', '',
          f'Probabilities above are p = softmax(log p_model / T) with **T = {record["temperature"]:.3f}**, '
          f'fitted on validation by least NLL; the alert threshold is chosen on them.', '',
          *_table(['', *(SPLIT_TITLES[n] for n in names)], rows), '']


def csv_cell(value: Any) -> Any:
  """A prediction CSV's cell: '' for none, yes/no for a flag, 6 decimals for a probability.

  Text that a spreadsheet would run as a formula (a file named
  '=HYPERLINK(...).jpg') gets a leading quote, which makes it text.
  """
  if value is None:
    return ''
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, float):
    return f'{value:.6f}'
  return "'" + value if isinstance(value, str) and value[:1] in ('=', '+', '-', '@', '\t', '\r') else value


def write_csv(path: epath.PathLike, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
  """`rows` (dicts keyed by `columns`) as CSV cells, to a local or remote file."""
  text = io.StringIO(newline='')  # epath's `open` takes no `newline=''`, which csv needs.
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({c: csv_cell(row[c]) for c in columns})
  epath.Path(path).write_text(text.getvalue())


def write_predictions_csv(path: epath.PathLike, file_names: Sequence[str], labels: Sequence[int],
                          probs: np.ndarray, class_names: Sequence[str]) -> None:
  """One row per example: file, label, predicted_class, melanoma_probability, p_<class>...

  The columns are named as in `melanoma_jax.inference`'s CSV, so predictions
  of a split and of image files join and average directly. `labels` are
  class indices and are written as class names; melanoma_probability is
  empty without a melanoma class.
  """
  probs = np.asarray(probs, np.float64)
  m = melanoma_index(class_names)
  columns = ['file', 'label', 'predicted_class', 'melanoma_probability',
             *(f'p_{name}' for name in class_names)]
  write_csv(path, columns, [
      {'file': str(name), 'label': class_names[int(label)],
       'predicted_class': class_names[int(np.argmax(p))],
       'melanoma_probability': None if m is None else float(p[m]),
       **{f'p_{c}': float(v) for c, v in zip(class_names, p)}}
      for name, label, p in zip(file_names, labels, probs)])


def write_reports(directory: epath.PathLike, evaluation: Evaluation) -> None:
  """report.json, report.md, predictions.csv and the plots of the evaluated split; process 0 only."""
  if jax.process_index() != 0:
    return
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  full = evaluation.report
  (directory / REPORT_JSON).write_text(json.dumps(full, indent=2, allow_nan=False))
  (directory / REPORT_MD).write_text(to_markdown(full))
  evaluated = full['splits'][full['split']]
  probs, labels = evaluation.predictions.probs, evaluation.predictions.labels
  if evaluation.predictions.file_names is not None:
    write_predictions_csv(directory / PREDICTIONS_CSV, evaluation.predictions.file_names, labels,
                          probs, full['class_names'])
  plots.confusion_matrices(directory / plots.CONFUSION_PNG, evaluated['confusion_matrix'],
                           full['class_names'])
  auc = {name: intervals.value(m['roc_auc']) for name, m in evaluated['per_class'].items()}
  curves = {name: (*metrics_lib.roc_curve(probs[:, c], labels == c)[:2], auc[name])
            for c, name in enumerate(full['class_names']) if auc[name] is not None}
  melanoma = evaluated['melanoma']
  alert = None
  if melanoma:
    sensitivity, specificity = (intervals.value(melanoma.get(k)) for k in ('sensitivity', 'specificity'))
    if None not in (sensitivity, specificity):
      alert = (1 - specificity, sensitivity)
  plots.roc_curves(directory / plots.ROC_PNG, curves, datasets.MELANOMA if melanoma else None, alert)
  effect = full.get('calibration_effect', {}).get(full['split'], {})
  panels = {}
  for key, title, after in (('top_class', 'top class (outcome: prediction correct)',
                             evaluated['reliability']),
                            ('melanoma', 'p(melanoma) (outcome: is melanoma)',
                             melanoma and melanoma['reliability'])):
    if after:
      if f'reliability_{key}_before' in effect:
        panels[f'{title}\nbefore temperature scaling'] = effect[f'reliability_{key}_before']
      scaled = f'after temperature scaling (T = {full["calibration"]["temperature"]:.2f})' if effect else ''
      panels[f'{title}\n{scaled}'] = after
  plots.reliability_diagrams(directory / plots.RELIABILITY_PNG, panels)


def write_operating_point(workdir: epath.PathLike, operating_point: dict[str, Any] | None) -> None:
  """Saves the alert threshold with the model, for predict; process 0 only."""
  run_files.write_json(workdir, OPERATING_POINT_FILE, operating_point)


def read_operating_point(workdir: epath.PathLike) -> dict[str, Any] | None:
  return run_files.read_json(workdir, OPERATING_POINT_FILE)