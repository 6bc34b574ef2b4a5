"""Confidence intervals against scipy's exact binomial test and a plain-loop bootstrap with scikit-learn."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

from melanoma_jax import clinical_report, input_pipeline, intervals, subgroups, train


@pytest.mark.parametrize('k,n', [(14, 16), (0, 10), (10, 10), (1, 1), (37, 118)])
def test_clopper_pearson_matches_scipy_binomtest(k, n):
  expected = stats.binomtest(k, n).proportion_ci(0.95, method='exact')
  assert intervals.clopper_pearson(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_issue_example_and_format():
  """14 of 16 melanomas found: 0.875 (0.62-0.98)."""
  figure = intervals.with_ci(14 / 16, intervals.clopper_pearson(14, 16))
  assert intervals.format_figure(figure) == '0.875 (0.62-0.98)'
  assert np.isnan(intervals.clopper_pearson(0, 0)).all()  # no trials


def _tiny_case(seed):
  rng = np.random.default_rng(seed)
  labels = np.repeat([0, 1, 2], [12, 5, 9])
  logits = rng.normal(size=(len(labels), 3)) + 1.5 * np.eye(3)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return np.round(probs, 2), labels  # rounded: tied scores too


def test_bootstrap_equals_a_plain_loop_with_sklearn():
  probs, labels = _tiny_case(0)
  names = ['a', 'melanoma', 'c']
  resamples, seed = 300, 5
  report = intervals.add_intervals(clinical_report.report(probs, labels, names, threshold=0.4), probs, labels,
                                   names, resamples, seed)
  indices = intervals.stratified_resamples(labels, resamples, seed)
  balanced, auc_melanoma, macro = [], [], []
  for row in indices:
    assert np.array_equal(np.bincount(labels[row]), np.bincount(labels))  # stratified
    y, p = labels[row], probs[row]
    balanced.append(sk.balanced_accuracy_score(y, p.argmax(axis=1)))
    auc_melanoma.append(sk.roc_auc_score(y == 1, p[:, 1]))
    macro.append(np.mean([sk.roc_auc_score(y == c, p[:, c]) for c in range(3)]))
  pct = lambda x: pytest.approx(np.percentile(x, [2.5, 97.5]), abs=1e-12)
  assert report['balanced_accuracy']['ci95'] == pct(balanced)
  assert report['melanoma']['roc_auc']['ci95'] == pct(auc_melanoma)
  assert report['macro_roc_auc']['ci95'] == pct(macro)
  assert report['balanced_accuracy']['value'] == pytest.approx(
      sk.balanced_accuracy_score(labels, probs.argmax(axis=1)))
  melanoma = report['melanoma']
  tp, fn = melanoma['true_positives'], melanoma['false_negatives']
  assert melanoma['sensitivity']['ci95'] == pytest.approx(list(intervals.clopper_pearson(tp, tp + fn)))
  recall = report['per_class']['c']['recall']
  assert recall['ci95'] == pytest.approx(list(intervals.clopper_pearson(
      int(np.sum((probs.argmax(axis=1) == 2) & (labels == 2))), 9)))
  json.dumps(report, allow_nan=False)
  assert '(' in clinical_report.to_markdown({
      'split': 'test', 'class_names': names, 'operating_point': None, 'calibration_binning': '',
      'checkpoint': {'step': 1, 'epoch': 1, 'selected_by': 'x'}, 'splits': {'test': report}})


def test_weighted_auc_of_unit_weights_is_sklearns():
  rng = np.random.default_rng(3)
  scores, positive = np.round(rng.random(200), 1), rng.random(200) < 0.3
  auc = intervals.weighted_auc(np.ones((1, 200)), scores, positive)[0]
  assert auc == pytest.approx(sk.roc_auc_score(positive, scores), abs=1e-12)


def test_subgroups_match_sklearn_on_each_subset_and_flag_small_ones():
  rng = np.random.default_rng(4)
  n = 300
  positive = rng.random(n) < 0.3
  p = np.clip(0.3 * positive + rng.random(n) * 0.7, 0, 1)
  attributes = {
      'sex': rng.choice(['male', 'female', None], n, p=[0.48, 0.48, 0.04]),
      'age': np.where(rng.random(n) < 0.05, np.nan, rng.integers(10, 95, n)),
      'site': rng.choice(['trunk', 'head/neck', 'acral'], n, p=[0.6, 0.35, 0.05]),
  }
  threshold = 0.5
  report = subgroups.subgroup_report(attributes, p, positive, threshold, num_resamples=200)
  assert [e['subgroup'] for e in report['age']] == sorted(
      ['<30', '30-44', '45-59', '60-74', '75+', 'unknown'])
  for name, values in attributes.items():
    groups = subgroups._groups(name, values)  # pylint: disable=protected-access
    for entry in report[name]:
      members = groups == entry['subgroup']
      y, s = positive[members], p[members]
      assert entry['images'] == members.sum() and entry['melanomas'] == y.sum()
      assert entry['too_few_cases'] == (y.sum() < 5 or (~y).sum() < 5)
      if y.any():
        assert entry['sensitivity']['value'] == pytest.approx(sk.recall_score(y, s >= threshold))
      if y.any() and not y.all():
        assert entry['roc_auc']['value'] == pytest.approx(sk.roc_auc_score(y, s))
        assert entry['specificity']['value'] == pytest.approx(sk.recall_score(~y, s < threshold))
  assert any(e['too_few_cases'] for e in report['site'] if e['subgroup'] == 'acral')
  assert 'too few cases' in '\n'.join(subgroups.to_markdown(report, 'Test'))
  probs = np.stack([1 - p, p], axis=1)
  split = intervals.add_intervals(clinical_report.report(probs, positive.astype(int), ('other', 'melanoma'),
                                                    threshold), probs, positive.astype(int),
                                  ('other', 'melanoma'), num_resamples=100)
  markdown = clinical_report.to_markdown({
      'split': 'test', 'class_names': ['other', 'melanoma'], 'calibration_binning': '',
      'operating_point': {'threshold': threshold, 'target_sensitivity': 0.9, 'chosen_on': 'validation'},
      'checkpoint': {'step': 1, 'epoch': 1, 'selected_by': 'x'}, 'splits': {'test': split},
      'subgroups': report})
  assert '## Subgroups (Test; melanoma vs rest)' in markdown and '| acral |' in markdown
  with pytest.raises(ValueError, match="'sex' has 3 values"):
    subgroups.subgroup_report({'sex': ['m', 'f', 'm']}, p, positive, threshold)


def test_report_has_subgroups_when_the_examples_carry_attributes(tiny_config):
  state = train.build_state(tiny_config, 9, 0.9)
  rng = np.random.default_rng(5)
  n = 40
  labels = np.tile(np.arange(9), 5)[:n].astype(np.int32)
  plain = input_pipeline.Examples(rng.integers(0, 256, (n, 32, 32, 3), np.uint8), labels,
                                  np.array([f'{i}.png' for i in range(n)]), np.array([''] * n))
  extras = {'age': rng.choice([-1, 25, 50, 80], n), 'sex': rng.choice(['female', 'male', ''], n),
            'site': rng.choice(['torso', ''], n), 'source': np.zeros(n)}
  test = dataclasses.replace(plain, extras=extras)
  names = tuple(f'c{c}' for c in range(8)) + ('melanoma',)
  checkpoint = {'step': 1, 'epoch': 1, 'selected_by': 'x'}
  full = clinical_report.evaluate_checkpoint(state, input_pipeline.Data(plain, plain, test, names), 'test', 0.9, 8,
                                        checkpoint).report
  assert set(full['subgroups']) == {'age', 'sex', 'site'}
  assert sum(e['images'] for e in full['subgroups']['sex']) == n
  assert 'subgroups' not in clinical_report.evaluate_checkpoint(
      state, input_pipeline.Data(plain, plain, plain, names), 'test', 0.9, 8, checkpoint).report
