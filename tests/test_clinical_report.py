"""Clinical metrics against scikit-learn, the operating point, and exact gathering over devices and hosts."""

import functools
import json

import jax
import numpy as np
import pytest
from sklearn import calibration, metrics as sk

from melanoma_jax import clinical_report, input_pipeline, metrics as metrics_lib, steps, train

NUM_CLASSES = 5
ABSENT = 2  # A class no label has.


def _predictions(seed, ties, n=300):
  """Random probabilities [n, 5] and labels without class ABSENT; `ties` rounds scores to 0.1."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, NUM_CLASSES)) * 2
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  if ties:
    probs = np.round(probs, 1)
  labels = rng.choice([c for c in range(NUM_CLASSES) if c != ABSENT], n)
  return probs, labels


CASES = pytest.mark.parametrize('seed,ties', [(0, False), (1, True), (2, True)])


@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')  # ABSENT, on purpose
@CASES
def test_confusion_and_per_class_metrics_match_sklearn(seed, ties):
  probs, labels = _predictions(seed, ties)
  predicted = probs.argmax(axis=1)
  classes = list(range(NUM_CLASSES))
  confusion = metrics_lib.confusion_matrix(labels, predicted, NUM_CLASSES)
  np.testing.assert_array_equal(confusion, sk.confusion_matrix(labels, predicted, labels=classes))
  ours = metrics_lib.per_class_metrics(confusion)
  precision, recall, f1, support = sk.precision_recall_fscore_support(
      labels, predicted, labels=classes, zero_division=np.nan)
  for name, expected in (('precision', precision), ('recall', recall), ('f1', f1), ('support', support)):
    np.testing.assert_allclose(ours[name], expected, err_msg=name)
  specificity = [sk.recall_score(labels == c, predicted == c, pos_label=False) for c in classes]
  np.testing.assert_allclose(ours['specificity'], specificity)
  assert np.isnan(ours['recall'][ABSENT])

  report = clinical_report.report(probs, labels, [f'c{c}' for c in classes])
  assert report['accuracy'] == pytest.approx(sk.accuracy_score(labels, predicted))
  assert report['balanced_accuracy'] == pytest.approx(sk.balanced_accuracy_score(labels, predicted))
  assert report['macro_f1'] == pytest.approx(
      sk.f1_score(labels, predicted, labels=classes, average='macro', zero_division=np.nan))
  assert report['per_class'][f'c{ABSENT}']['recall'] is None  # JSON null, not NaN
  assert report['melanoma'] is None


@CASES
def test_roc_auc_and_curve_match_sklearn(seed, ties):
  probs, labels = _predictions(seed, ties)
  report = clinical_report.report(probs, labels, [f'c{c}' for c in range(NUM_CLASSES)])
  expected = []
  for c in range(NUM_CLASSES):
    ours = report['per_class'][f'c{c}']['roc_auc']
    if c == ABSENT:
      assert ours is None
      continue
    expected.append(sk.roc_auc_score(labels == c, probs[:, c]))
    assert ours == pytest.approx(expected[-1], abs=1e-12)
    fpr, tpr, thresholds = metrics_lib.roc_curve(probs[:, c], labels == c)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels == c, probs[:, c], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds, sk_thresholds)
  assert report['macro_roc_auc'] == pytest.approx(np.mean(expected))


@CASES
def test_melanoma_vs_rest_at_a_threshold_matches_sklearn(seed, ties):
  probs, labels = _predictions(seed, ties)
  names = ['a', 'b', 'c', 'melanoma', 'e']
  threshold = float(np.quantile(probs[:, 3], 0.6))  # A value the scores take: ties at it alert.
  melanoma = clinical_report.report(probs, labels, names, threshold)['melanoma']
  positive, alert = labels == 3, probs[:, 3] >= threshold
  tn, fp, fn, tp = sk.confusion_matrix(positive, alert).ravel()
  assert (melanoma['true_positives'], melanoma['false_negatives'], melanoma['false_positives'],
          melanoma['true_negatives']) == (tp, fn, fp, tn)
  assert melanoma['sensitivity'] == pytest.approx(sk.recall_score(positive, alert))
  assert melanoma['specificity'] == pytest.approx(sk.recall_score(positive, alert, pos_label=False))
  assert melanoma['ppv'] == pytest.approx(sk.precision_score(positive, alert))
  assert melanoma['npv'] == pytest.approx(sk.precision_score(positive, alert, pos_label=False))
  assert melanoma['roc_auc'] == pytest.approx(sk.roc_auc_score(positive, probs[:, 3]))
  assert melanoma['support'] == positive.sum()


def _reference_ece(probability, outcome, num_bins):
  """ECE straight from its definition, bin by bin."""
  edges = np.linspace(0, 1, num_bins + 1)
  total = 0.0
  for b in range(num_bins):
    members = (probability > edges[b]) & (probability <= edges[b + 1]) | (
        (b == 0) & (probability == 0))
    if members.any():
      total += members.sum() * abs(outcome[members].mean() - probability[members].mean())
  return total / len(probability)


@CASES
def test_calibration_matches_sklearn_and_the_definition(seed, ties):
  probs, labels = _predictions(seed, ties)
  for probability, outcome in ((probs.max(axis=1), probs.argmax(axis=1) == labels),
                               (probs[:, 1], labels == 1)):
    bins = metrics_lib.reliability(probability, outcome)
    filled = bins['count'] > 0
    sk_frequency, sk_mean = calibration.calibration_curve(
        outcome, probability, n_bins=metrics_lib.NUM_CALIBRATION_BINS, strategy='uniform')
    np.testing.assert_allclose(bins['frequency'][filled], sk_frequency)
    np.testing.assert_allclose(bins['mean_probability'][filled], sk_mean)
    assert metrics_lib.expected_calibration_error(probability, outcome) == pytest.approx(
        _reference_ece(probability, outcome, metrics_lib.NUM_CALIBRATION_BINS))


@pytest.mark.parametrize('target', [0.5, 0.9, 0.95, 1.0])
@CASES
def test_threshold_reaches_the_target_sensitivity_with_fewest_alerts(seed, ties, target):
  probs, labels = _predictions(seed, ties)
  p, positive = probs[:, 3], labels == 3
  threshold = metrics_lib.choose_threshold(p, positive, target)
  assert np.mean(p[positive] >= threshold) >= target
  higher = p[p > threshold]
  if len(higher):  # The next threshold up misses the target: none alerts less.
    assert np.mean(p[positive] >= higher.min()) < target


def test_threshold_needs_melanomas_and_a_sensible_target():
  with pytest.raises(ValueError, match='No melanoma'):
    metrics_lib.choose_threshold(np.array([0.2, 0.7]), np.array([False, False]), 0.9)
  with pytest.raises(ValueError, match='target_sensitivity'):
    metrics_lib.choose_threshold(np.array([0.2, 0.7]), np.array([True, False]), 0.0)


def test_binary_task_reports_the_melanoma_column_and_is_strict_json():
  probs, labels = _predictions(3, False)
  p = probs[:, :2] / probs[:, :2].sum(axis=1, keepdims=True)
  binary = (labels == 1).astype(int)
  report = clinical_report.report(p, binary, ('other', 'melanoma'), threshold=0.5)
  assert report['melanoma']['roc_auc'] == pytest.approx(sk.roc_auc_score(binary, p[:, 1]))
  assert report['melanoma']['sensitivity'] == pytest.approx(sk.recall_score(binary, p[:, 1] >= 0.5))
  json.dumps(report, allow_nan=False)


# Exact gathering: 4 fake devices, and two simulated hosts.

N = 27  # Not a multiple of the batch: the last batch is padded.
BATCH = 8


@pytest.fixture(scope='module')
def model_and_examples(tiny_config):
  state = train.build_state(tiny_config, 9, 0.9)
  rng = np.random.default_rng(0)
  examples = input_pipeline.Examples(
      rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8), rng.integers(0, 9, N).astype(np.int32),
      np.array([f'{i}.png' for i in range(N)]), np.array([''] * N))
  return state, examples


def test_gathering_over_devices_counts_each_example_once(model_and_examples):
  state, examples = model_and_examples
  gathered = clinical_report.gather_predictions(state, examples, BATCH)
  probs, labels = gathered.probs, gathered.labels
  # One device, in the per-device batch of 2, so the arithmetic is the same to the bit.
  padded = {'image': np.concatenate([examples.images, examples.images[:1]]),
            'label': np.concatenate([examples.labels, examples.labels[:1]])}
  outputs = [jax.jit(steps.predict_with_loss)(state, jax.tree.map(lambda x: x[i:i + 2], padded))
             for i in range(0, N + 1, 2)]
  single = np.concatenate([p for p, _ in outputs])[:N]
  np.testing.assert_array_equal(labels, examples.labels)
  np.testing.assert_array_equal(probs, single)
  np.testing.assert_array_equal(gathered.losses, np.concatenate([l for _, l in outputs])[:N])
  names = [f'c{c}' for c in range(8)] + ['melanoma']
  threshold = float(np.median(single[:, 8]))
  assert (clinical_report.report(probs, labels, names, threshold) ==
          clinical_report.report(single, examples.labels, names, threshold))


def test_gathering_over_hosts_restores_dataset_order(model_and_examples, monkeypatch):
  state, examples = model_and_examples
  expected = clinical_report.gather_predictions(state, examples, BATCH)
  shares = {}

  def allgather(local):
    """Host 1 runs first; host 0 then sees both shares, as after a real all-gather."""
    shares[jax.process_index()] = local
    return jax.tree.map(lambda *xs: np.stack(xs), *(shares.get(p, local) for p in range(2)))

  monkeypatch.setattr(clinical_report.multihost_utils, 'process_allgather', allgather)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for host in (1, 0):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    # Twice the batch: each host's 4 devices still get 2 examples, as above.
    gathered = clinical_report.gather_predictions(state, examples, 2 * BATCH)
  for field in ('probs', 'labels', 'losses'):
    np.testing.assert_array_equal(getattr(gathered, field), getattr(expected, field))


def test_summary_of_predictions_equals_the_eval_step_metrics(model_and_examples):
  state, examples = model_and_examples
  p_eval = jax.pmap(functools.partial(steps.eval_step, axis_name='d'), axis_name='d',
                    in_axes=(None, 0), out_axes=None)
  total = None
  for batch in input_pipeline.eval_batches(examples, BATCH):
    total = metrics_lib.accumulate(total, p_eval(state, batch))
  expected = metrics_lib.summarize(total, 'val')
  summary = clinical_report.gather_predictions(state, examples, BATCH).summary('val')
  assert summary.keys() == expected.keys()
  assert summary['val_loss'] == pytest.approx(expected['val_loss'], rel=1e-6)
  for key in expected.keys() - {'val_loss'}:
    assert summary[key] == expected[key], key
