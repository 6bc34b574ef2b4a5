"""Grouped stratified k-fold CV, out-of-fold predictions, CV reports and ensembles."""

import csv
import json
import math

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn import model_selection

from melanoma_jax import (clinical_report, cross_validation, ensemble, evaluate, inference, input_pipeline,
                          reporting, steps, train)

K = 3


def _lesions(seed, num_groups=120, num_classes=4):
  """Labels and group ids of lesions with 1-4 images each, one class per lesion, imbalanced."""
  rng = np.random.default_rng(seed)
  group_class = rng.choice(num_classes, num_groups, p=np.linspace(2, 1, num_classes) / np.linspace(2, 1, num_classes).sum())
  sizes = rng.integers(1, 5, num_groups)
  labels = np.repeat(group_class, sizes)
  groups = np.repeat([f'lesion{g}' for g in range(num_groups)], sizes)
  order = rng.permutation(len(labels))
  return labels[order], groups[order], sizes.max()


def _class_proportion_spread(labels, folds, num_folds):
  """Mean over classes of the standard deviation over folds of the class's share of the fold."""
  shares = np.array([np.bincount(labels[folds == f], minlength=labels.max() + 1) / np.sum(folds == f)
                     for f in range(num_folds)])
  return shares.std(axis=0).mean()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_folds_keep_groups_whole_and_classes_stratified(seed):
  labels, groups, largest = _lesions(seed)
  folds = input_pipeline.assign_folds(labels, groups, 5, seed=seed)
  assert set(folds.tolist()) == set(range(5))
  for group in np.unique(groups):  # Every group in exactly one fold.
    assert len(set(folds[groups == group].tolist())) == 1
  for c in np.unique(labels):  # Direct counting: per-class counts differ by at most one lesion.
    counts = np.bincount(folds[labels == c], minlength=5)
    assert counts.max() - counts.min() <= largest, (c, counts)
  sizes = np.bincount(folds, minlength=5)
  assert sizes.max() - sizes.min() <= 2 * largest


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_folds_are_as_stratified_as_scikit_learns(seed):
  labels, groups, _ = _lesions(seed, num_groups=200)
  ours = input_pipeline.assign_folds(labels, groups, 5, seed=seed)
  theirs = np.empty(len(labels), int)
  splitter = model_selection.StratifiedGroupKFold(5, shuffle=True, random_state=seed)
  for f, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
    theirs[val] = f
  assert _class_proportion_spread(labels, ours, 5) <= 1.1 * _class_proportion_spread(labels, theirs, 5) + 1e-4


def test_folds_are_deterministic_by_seed_and_singletons_split_evenly():
  labels = np.repeat(np.arange(3), [61, 30, 9])
  names = np.array([f'img{i}' for i in range(len(labels))])
  folds = input_pipeline.assign_folds(labels, names, 3, seed=7)
  np.testing.assert_array_equal(folds, input_pipeline.assign_folds(labels, names, 3, seed=7))
  assert not np.array_equal(folds, input_pipeline.assign_folds(labels, names, 3, seed=8))
  assert [sorted(np.bincount(folds[labels == c]).tolist()) for c in range(3)] == [
      [20, 20, 21], [10, 10, 10], [3, 3, 3]]


def test_more_folds_than_groups_is_refused():
  with pytest.raises(ValueError, match=r'num_folds=4 must be in \[2, 3\]'):
    input_pipeline.assign_folds(np.array([0, 0, 1, 1]), np.array(['a', 'a', 'b', 'c']), 4, seed=0)


def test_rank_quantiles_are_scipys_mean_percentiles():
  rng = np.random.default_rng(0)
  reference = np.round(rng.random((50, 3)), 1)  # Ties included.
  scores = np.round(rng.random((7, 3)), 1)
  expected = [[stats.percentileofscore(reference[:, c], x, kind='mean') / 100 for c, x in enumerate(row)]
              for row in scores]
  np.testing.assert_allclose(ensemble.quantiles(reference, scores), expected)


@pytest.fixture(scope='module')
def cv_run(tiny_config, tmp_path_factory):
  config = tiny_config.copy_and_resolve_references()
  config.num_epochs, config.num_folds = 1, K
  workdir = tmp_path_factory.mktemp('cv')
  summary = cross_validation.run_all_folds(config, str(workdir))
  return workdir, config, summary


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _fold_probs(workdir, images):
  """Each fold model's probabilities of `images`, restored and run directly."""
  probs = []
  for fold in range(K):
    state, _, _ = train.restore_for_inference(str(workdir / f'fold_{fold}'))
    probs.append(np.asarray(jax.jit(steps.predict)(state, images)))
  return probs


def test_cv_writes_fold_runs_oof_predictions_and_report(cv_run):
  workdir, config, summary = cv_run
  folds = [input_pipeline.load_data(cross_validation.fold_config(config, i)) for i in range(K)]
  train_files = sorted(np.concatenate([folds[0].train.file_names, folds[0].val.file_names]))
  for i, data in enumerate(folds):
    assert (workdir / f'fold_{i}' / 'test_metrics.json').exists()
    assert not set(data.train.file_names) & set(data.val.file_names)
    assert sorted(np.concatenate([data.train.file_names, data.val.file_names])) == train_files
  rows = _csv(workdir / cross_validation.OOF_FILE)
  assert sorted(row['file'] for row in rows) == train_files  # Every Train image exactly once.
  predictions = _csv(workdir / clinical_report.PREDICTIONS_CSV)
  assert list(rows[0]) == list(predictions[0])
  assert list(rows[0])[:4] == ['file', 'label', 'predicted_class', 'melanoma_probability']
  # Out-of-fold rows of fold 1 are fold 1's model on its own validation images.
  by_file = {row['file']: row for row in rows}
  state, _, meta = train.restore_for_inference(str(workdir / 'fold_1'))
  expected = np.asarray(jax.jit(steps.predict)(state, folds[1].val.images[:8]))
  got = [[float(by_file[f][f'p_{c}']) for c in meta['class_names']] for f in folds[1].val.file_names[:8]]
  np.testing.assert_allclose(got, expected, atol=2e-6)
  # The CV report: mean and standard deviation over folds, computed directly from each fold's report.
  accuracies = [json.loads((workdir / f'fold_{i}' / 'test_metrics.json').read_text())['test_accuracy']
                for i in range(K)]
  report = json.loads((workdir / cross_validation.CV_REPORT_JSON).read_text())
  assert report['test']['accuracy']['mean'] == pytest.approx(np.mean(accuracies))
  assert report['test']['accuracy']['std'] == pytest.approx(np.std(accuracies, ddof=1))
  held_out = [json.loads((workdir / f'fold_{i}' / clinical_report.REPORT_JSON).read_text())['splits']['val']
              for i in range(K)]
  sens = [r['melanoma']['sensitivity']['value'] for r in held_out]
  assert report['held_out_fold']['melanoma.sensitivity']['mean'] == pytest.approx(np.mean(sens))
  assert report == summary
  assert '| melanoma.roc_auc |' in (workdir / cross_validation.CV_REPORT_MD).read_text()


def test_fold_ensemble_averages_the_fold_models_at_the_oof_threshold(cv_run):
  workdir, config, _ = cv_run
  data = input_pipeline.load_data(cross_validation.fold_config(config, 0))
  expected = np.mean(_fold_probs(workdir, data.test.images), axis=0)
  rows = {row['file']: row for row in _csv(workdir / clinical_report.PREDICTIONS_CSV)}
  names = json.loads((workdir / ensemble.ENSEMBLE_FILE).read_text())['class_names']
  got = [[float(rows[f][f'p_{c}']) for c in names] for f in data.test.file_names]
  np.testing.assert_allclose(got, expected, atol=2e-6)
  # The threshold: highest p(melanoma) still alerting on >= 90% of out-of-fold melanomas.
  oof = [float(r['melanoma_probability']) for r in _csv(workdir / cross_validation.OOF_FILE)
         if r['label'] == 'melanoma']
  needed = math.ceil(0.9 * len(oof))
  threshold = clinical_report.read_operating_point(workdir)['threshold']
  assert threshold == pytest.approx(sorted(oof, reverse=True)[needed - 1], abs=1e-6)
  assert clinical_report.read_operating_point(workdir)['chosen_on'] == 'out-of-fold predictions'


def test_one_command_evaluates_the_fold_ensemble_with_rank_and_tta(cv_run, tmp_path):
  workdir, _, _ = cv_run
  evaluate.main(['--workdir', str(workdir), '--combine', 'rank', '--tta', '--output_dir', str(tmp_path)])
  report = json.loads((tmp_path / clinical_report.REPORT_JSON).read_text())
  assert report['checkpoint']['tta'] and report['checkpoint']['combine'] == 'rank'
  assert len(report['checkpoint']['members']) == K
  markdown = (tmp_path / clinical_report.REPORT_MD).read_text()
  assert 'Ensemble of 3 models (rank)' in markdown and 'Test-time augmentation' in markdown
  assert 'not probabilities' in markdown and 'chosen on out-of-fold predictions as the highest' in markdown
  assert len(_csv(tmp_path / clinical_report.PREDICTIONS_CSV)) == report['splits']['test']['num_examples']
  # Inference with that ensemble gives the evaluated scores: a Test image, written out, scores the same.
  test_row = _csv(tmp_path / clinical_report.PREDICTIONS_CSV)[0]
  description = ensemble.read_description(tmp_path)
  image_path = tmp_path / 'lesion.png'
  images = input_pipeline.load_data(train.restore_for_inference(str(workdir / 'fold_0'))[1]).test
  index = list(images.file_names).index(test_row['file'])
  Image.fromarray(images.images[index]).save(image_path)
  output = tmp_path / 'preds.csv'
  inference.main(['--workdir', str(workdir), '--ensemble', str(tmp_path), '--tta',
                  '--output', str(output), str(image_path)])
  (row,) = _csv(output)
  assert float(row['melanoma_probability']) == pytest.approx(float(test_row['melanoma_probability']), abs=1e-5)
  threshold = description['operating_point']['threshold']
  assert row['melanoma_alert'] == ('yes' if float(row['melanoma_probability']) >= threshold else 'no')
  with pytest.raises(SystemExit, match='without --tta'):
    inference.main(['--workdir', str(workdir), '--output', str(output), str(image_path), '--tta'])


def test_rerun_skips_finished_folds_and_finishes_an_unfinished_one(cv_run):
  workdir, config, _ = cv_run
  before = {i: (workdir / f'fold_{i}' / clinical_report.REPORT_JSON).stat().st_mtime_ns for i in range(K)}
  history = reporting.read_history(workdir / 'fold_1')
  (workdir / 'fold_1' / cross_validation.FINISHED_FILE).unlink()
  cross_validation.run_all_folds(config, str(workdir))
  after = {i: (workdir / f'fold_{i}' / clinical_report.REPORT_JSON).stat().st_mtime_ns for i in range(K)}
  assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
  assert reporting.read_history(workdir / 'fold_1') == history  # No epoch repeated.
  assert (workdir / 'fold_1' / cross_validation.FINISHED_FILE).exists()
  other = cross_validation.fold_config(config, 0)
  other.num_folds = 4
  with pytest.raises(train.ConfigError, match='3-fold CV run, not 4 folds'):
    cross_validation.run_all_folds(other, str(workdir))


def test_runs_validating_on_different_images_are_refused(cv_run):
  workdir, _, _ = cv_run
  with pytest.raises(SystemExit, match='different validation images'):
    evaluate.main([f'--workdir={workdir / "fold_0"}', '--workdir', str(workdir / 'fold_1')])


def test_evaluation_tta_averages_the_eight_dihedral_views(cv_run):
  workdir, config, _ = cv_run
  state, _, _ = train.restore_for_inference(str(workdir / 'fold_0'))
  examples = input_pipeline.load_data(cross_validation.fold_config(config, 0)).test.take(np.arange(12))
  views = [np.rot90(examples.images, k, axes=(1, 2)) for k in range(4)]
  views += [np.flip(v, axis=2) for v in views]
  predict = jax.jit(steps.predict)
  expected = np.mean([np.asarray(predict(state, np.ascontiguousarray(v))) for v in views], axis=0)
  got = clinical_report.gather_predictions(state, examples, 8, tta=True)
  np.testing.assert_allclose(got.probs, expected, atol=2e-6)
  assert not np.allclose(clinical_report.gather_predictions(state, examples, 8).probs, expected, atol=1e-4)
  np.testing.assert_allclose(got.losses, -np.log(expected[np.arange(12), examples.labels]), rtol=1e-4)
