"""Melanoma results per subgroup of patients (sex, age band, anatomical site).

A model can do well overall and badly on one group (older patients, acral
sites). Each subgroup gets the alert's sensitivity and specificity with
exact intervals and the ROC AUC with a stratified bootstrap interval, and is
flagged when it has too few melanomas or too few other lesions for those
figures to say anything.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from melanoma_jax import intervals, metrics

# Fewer melanomas (or fewer other lesions) than this in a subgroup: flagged.
MIN_CASES = 5
# Attributes given as ages in years, reported in these bands.
AGE_ATTRIBUTES = ('age', 'age_approx')
AGE_BANDS = ((0, 30, '<30'), (30, 45, '30-44'), (45, 60, '45-59'), (60, 75, '60-74'),
             (75, math.inf, '75+'))
UNKNOWN = 'unknown'


def _is_missing(value: Any) -> bool:
  return value is None or value == '' or (isinstance(value, float) and math.isnan(value))


def age_bands(ages: Sequence[Any]) -> np.ndarray:
  """Each age in years as its AGE_BANDS label; missing or negative ages are 'unknown'."""
  def band(age):
    if _is_missing(age) or float(age) < 0:
      return UNKNOWN
    return next(label for lo, hi, label in AGE_BANDS if lo <= float(age) < hi)
  return np.array([band(age) for age in ages], dtype=object)


def _groups(name: str, values: Sequence[Any]) -> np.ndarray:
  """The subgroup label of each example: age bands for ages, else the value as text."""
  if name in AGE_ATTRIBUTES:
    return age_bands(values)
  return np.array([UNKNOWN if _is_missing(v) else str(v) for v in values], dtype=object)


def subgroup_report(attributes: Mapping[str, Sequence[Any]], p_melanoma: np.ndarray,
                    is_melanoma: np.ndarray, threshold: float | None,
                    min_cases: int = MIN_CASES, num_resamples: int = intervals.NUM_RESAMPLES,
                    seed: int = intervals.SEED) -> dict[str, list[dict[str, Any]]]:
  """Per attribute, one entry per subgroup (sorted by name): counts, figures with intervals, flag.

  `attributes` maps a name (e.g. 'sex', 'age', 'site') to a value per
  example, aligned with `p_melanoma` and `is_melanoma`. Sensitivity and
  specificity are of the alert p >= `threshold` (absent without one).
  """
  p_melanoma, is_melanoma = np.asarray(p_melanoma, np.float64), np.asarray(is_melanoma, bool)
  result = {}
  for name, values in attributes.items():
    if len(values) != len(p_melanoma):
      raise ValueError(f'Attribute {name!r} has {len(values)} values for {len(p_melanoma)} examples.')
    groups = _groups(name, values)
    entries = []
    for group in sorted(set(groups)):
      members = groups == group
      p, positive = p_melanoma[members], is_melanoma[members]
      melanomas, others = int(positive.sum()), int((~positive).sum())
      weights = intervals.resample_counts(
          intervals.stratified_resamples(positive, num_resamples, seed)).astype(np.float64)
      entry = {'subgroup': group, 'images': int(members.sum()), 'melanomas': melanomas,
               'roc_auc': intervals.with_ci(metrics.roc_auc(p, positive), intervals.percentile_interval(
                   intervals.weighted_auc(weights, p, positive)))}
      if threshold is not None:
        alert = metrics.binary_at_threshold(p, positive, threshold)
        entry['sensitivity'] = intervals.with_ci(alert['sensitivity'], intervals.clopper_pearson(
            alert['true_positives'], melanomas))
        entry['specificity'] = intervals.with_ci(alert['specificity'], intervals.clopper_pearson(
            alert['true_negatives'], others))
      entry['too_few_cases'] = melanomas < min_cases or others < min_cases
      entries.append(entry)
    result[name] = entries
  return result


def to_markdown(report: Mapping[str, list[dict[str, Any]]], split_title: str,
                min_cases: int = MIN_CASES) -> list[str]:
  """One table per attribute; flagged subgroups say so instead of being read as evidence."""
  lines = [f'## Subgroups ({split_title}; melanoma vs rest)', '',
           f'Flagged: fewer than {min_cases} melanomas or {min_cases} other lesions, too few to '
           'say anything about that subgroup.', '']
  for name, entries in report.items():
    lines += [f'| {name} | images | melanomas | sensitivity | specificity | ROC AUC | |',
              '|---|---|---|---|---|---|---|']
    for e in entries:
      cells = [intervals.format_figure(e[k]) if k in e else 'n/a'
               for k in ('sensitivity', 'specificity', 'roc_auc')]
      flag = 'too few cases' if e['too_few_cases'] else ''
      lines.append(f'| {e["subgroup"]} | {e["images"]} | {e["melanomas"]} | ' + ' | '.join(cells) +
                   f' | {flag} |')
    lines.append('')
  return lines
