"""What a trained run gives a clinician: reports, predict, evaluate and Grad-CAM."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from melanoma_jax import (calibration, cli, clinical_report, evaluate, inference, ood, plots,
                          preprocessing, saliency, steps, train)


@pytest.fixture(scope='module')
def run(one_epoch_run):
  return one_epoch_run[0]


@pytest.fixture(scope='module')
def restored(run):
  return train.restore_for_inference(str(run))


def test_training_leaves_reports_plots_and_the_operating_point(run):
  report = json.loads((run / clinical_report.REPORT_JSON).read_text())
  assert report['split'] == 'test' and set(report['splits']) == {'val', 'test'}
  operating_point = clinical_report.read_operating_point(run)
  assert operating_point == report['operating_point']
  assert operating_point['target_sensitivity'] == 0.9
  validation = report['splits']['val']['melanoma']
  assert validation['threshold'] == operating_point['threshold']
  assert validation['sensitivity']['value'] >= 0.9
  lo, hi = validation['sensitivity']['ci95']
  assert lo <= validation['sensitivity']['value'] <= hi
  assert calibration.read(run) == report['calibration'] and report['calibration']['temperature'] > 0
  assert ood.read(run)['threshold'] == report['out_of_distribution']['threshold']
  assert report['splits']['test']['melanoma']['threshold'] == operating_point['threshold']
  assert 'Melanoma alert' in (run / clinical_report.REPORT_MD).read_text()
  for png in ('curves.png', *plots.REPORT_PLOTS.values()):
    assert (run / png).stat().st_size > 10_000, png


def _write_images(folder):
  """Three readable images (one in a subfolder, upper-case extension, RGBA) and a corrupt one."""
  rng = np.random.default_rng(0)
  (folder / 'sub').mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(folder / 'sub' / 'b.JPG', 'JPEG')
  Image.fromarray(rng.integers(0, 256, (20, 20, 4), np.uint8)).save(folder / 'c.bmp')
  (folder / 'sub' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  (folder / 'notes.txt').write_text('not an image: skipped in folders')


def test_predict_gives_every_file_a_row_and_the_corrupt_one_its_error(run, tmp_path):
  _write_images(tmp_path / 'images')
  output = tmp_path / 'out' / 'preds.csv'
  inference.main(['--workdir', str(run), '--output', str(output), '--json', '--batch_size', '2',
                str(tmp_path / 'images'), str(tmp_path / 'missing.png')])
  with output.open() as f:
    rows = {row['file'].split('/')[-1]: row for row in csv.DictReader(f)}
  assert set(rows) == {'a.png', 'b.JPG', 'c.bmp', 'corrupt.jpg', 'missing.png'}
  assert rows['missing.png']['error'] == 'no such file'
  assert rows['corrupt.jpg']['error'] and rows['corrupt.jpg']['melanoma_probability'] == ''
  threshold = clinical_report.read_operating_point(run)['threshold']
  class_names = json.loads(output.with_suffix('.json').read_text())['class_names']
  for name in ('a.png', 'b.JPG', 'c.bmp'):
    row = rows[name]
    probs = np.array([float(row[f'p_{c}']) for c in class_names])
    assert row['error'] == '' and probs.sum() == pytest.approx(1, abs=1e-5)
    assert row['predicted_class'] == class_names[int(np.argmax(probs))]
    assert row['melanoma_probability'] == row['p_melanoma']
    if row['in_distribution'] == 'no':  # Random pixels are no lesion: refused, no alert.
      assert row['melanoma_alert'] == '' and row['refused']
    else:
      assert row['melanoma_alert'] == ('yes' if float(row['p_melanoma']) >= threshold else 'no')


@pytest.mark.parametrize('tta', [False, True])
def test_overlapped_batches_predict_as_one_image_at_a_time(run, restored, tmp_path, tta):
  """Decoding threads, padding of the last batch and one program for model and refusal change nothing."""
  state, config, meta = restored
  stored_size, detector = cli.stored_image_size(config, meta), ood.read(run)
  rng = np.random.default_rng(4)
  files = []
  for i, shape in enumerate([(40, 50, 3), (64, 64, 3), (33, 20, 3), (80, 60, 3), (25, 25, 3)]):
    files.append(tmp_path / f'{i}.jpg')
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(files[-1])
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  files.insert(2, corrupt)  # 6 files in batches of 4: the second is padded
  results = list(inference.predict_files(state, files, config.image_size, 4, tta, stored_size,
                                         detector=detector, workers=3))
  assert [path for path, *_ in results] == files
  with pytest.raises(preprocessing.UnreadableImageError) as unreadable:
    preprocessing.model_input(corrupt, stored_size, config.image_size)
  assert results[2][1:] == (None, str(unreadable.value), None)
  predict = steps.predict_tta if tta else steps.predict
  for path, probs, error, score in results[:2] + results[3:]:
    image = preprocessing.model_input(path, stored_size, config.image_size)[None]
    assert error is None
    np.testing.assert_allclose(probs, predict(state, image)[0], rtol=1e-5, atol=1e-6)
    expected = ood.score_features(*ood.features_and_logits(state, image), detector)[0]
    assert score == pytest.approx(float(expected), rel=1e-5)


def test_tta_averages_the_eight_flips_and_rotations(restored):
  state, _, meta = restored
  images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
  predict_tta = jax.jit(steps.predict_tta)
  probs = predict_tta(state, images)
  assert probs.shape == (3, len(meta['class_names']))
  # The 8 transforms are a group: transforming the input only reorders them.
  turned = predict_tta(state, steps.dihedral(jnp.asarray(images), 5))
  np.testing.assert_allclose(turned, probs, rtol=1e-4, atol=1e-6)


def test_evaluate_writes_the_report_of_a_checkpoint_on_a_split(run, tmp_path):
  evaluate.main(['--workdir', str(run), '--split', 'val', '--output_dir', str(tmp_path)])
  report = json.loads((tmp_path / clinical_report.REPORT_JSON).read_text())
  assert report['split'] == 'val' and list(report['splits']) == ['val']
  assert report['operating_point']['threshold'] == clinical_report.read_operating_point(run)['threshold']
  assert (tmp_path / plots.ROC_PNG).exists()


def test_grad_cam_is_a_map_of_the_image_size_in_0_1(restored, tmp_path, run):
  state, _, _ = restored
  image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8)
  cam = np.asarray(saliency.grad_cam(state, image, jnp.asarray(3)))
  assert cam.shape == (32, 32)
  assert cam.min() >= 0 and cam.max() <= 1
  Image.fromarray(image).save(tmp_path / 'x.png')
  saliency.main(['--workdir', str(run), '--image', str(tmp_path / 'x.png'), '--class', 'melanoma',
                 '--output', str(tmp_path / 'cam.png')])
  assert (tmp_path / 'cam.png').stat().st_size > 10_000
