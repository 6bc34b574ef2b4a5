"""A file gets the same pixels, and the same probabilities, in training, evaluation and prediction."""

import csv
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from melanoma_jax import clinical_report, evaluate, inference, input_pipeline, preprocessing, train

CLASSES = ('melanoma', 'nevus', 'vascular lesion')
STORED = 256  # image_folder's stored size
IMAGE_SIZE = 40


# The winners' preprocessing (config.preprocess), which the end-to-end test trains with.
OPTIONS = preprocessing.Preprocess(crop_border=True, color_constancy=True, aspect='pad')


def _tree(root, per_split):
  """Images of assorted sizes and modes (down- and upscaled, grayscale, RGBA, JPEG and PNG,
  inside a dermoscope's dark circle)."""
  rng = np.random.default_rng(0)
  shapes = [(300, 280, 3), (60, 90, 3), (257, 257, 4), (120, 100), (240, 320, 3)]
  for split, n in per_split.items():
    for c, name in enumerate(CLASSES):
      (root / split / name).mkdir(parents=True)
      for i in range(n):
        shape = shapes[(c + i) % len(shapes)]
        # Smooth blobs plus noise: something for LANCZOS and the antialiasing to act on.
        pixels = rng.integers(0, 256, shape, np.uint8)
        if shape == shapes[-1]:
          y, x = np.mgrid[:shape[0], :shape[1]]
          pixels[np.hypot(y - 120, x - 160) > 110] //= 16
        image = Image.fromarray(pixels)
        ext = '.png' if len(shape) == 3 and shape[2] == 4 else '.jpg'
        image.save(root / split / name / f'{name[:3]}_{i}{ext}')


@pytest.fixture(scope='module')
def folder_config(tiny_config, tmp_path_factory):
  root = tmp_path_factory.mktemp('lesions')
  _tree(root, {'Train': 4, 'Test': 2})
  config = tiny_config.copy_and_resolve_references()
  config.dataset = 'image_folder'
  config.manual_dir = str(root)
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.image_size = IMAGE_SIZE
  config.num_epochs = 1
  config.preprocess.update(dataclasses.asdict(OPTIONS))
  return config


@pytest.mark.parametrize('shape,size', [((2, 256, 256), 180), ((3, 48, 64), 32), ((2, 20, 20), 32),
                                        ((2, 32, 32), 32), ((2, 7, 300), 5)])
def test_model_inputs_are_tensorflows_resize_pixel_for_pixel(shape, size):
  """Prediction's resize (XLA) against the input pipeline's (TensorFlow's op): down, up and no scale,
  on noise, on a checkerboard (ties at half a grey level) and on a ramp."""
  rng = np.random.default_rng(sum(shape) + size)
  noise = rng.integers(0, 256, (*shape, 3), np.uint8)
  checkerboard = np.broadcast_to((np.indices(shape[1:]).sum(0) % 2)[None, :, :, None] * [1, 255, 128],
                                 noise.shape).astype(np.uint8)
  ramp = np.linspace(0, 255, noise.size).reshape(noise.shape).round().astype(np.uint8)
  for stored in (noise, checkerboard, ramp):
    np.testing.assert_array_equal(preprocessing.model_inputs(stored, size),
                                  preprocessing.resize(stored, size).numpy())


@pytest.mark.parametrize('options', [preprocessing.Preprocess(), OPTIONS], ids=['default', 'options'])
def test_a_file_becomes_the_pixels_training_reads_for_it(folder_config, options):
  config = folder_config.copy_and_resolve_references()
  config.preprocess.update(dataclasses.asdict(options))
  builder = input_pipeline.prepared_builder(config)
  assert builder.info.features['image'].shape[0] == STORED
  assert epath.Path(builder.data_path).parent.name == options.config_name(STORED)  # Its own data.
  stored = list(tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False)))
  data = input_pipeline.load_data(config)
  assert data.stored_image_size == STORED
  root = config.manual_dir
  for example, trained_on in zip(stored, data.test.images):
    path = f'{root}/{example["file_name"].decode()}'
    # Step 1 gives what the builder stored (PNG is lossless), both steps what training read.
    np.testing.assert_array_equal(preprocessing.decode_image(path, STORED, options).pixels,
                                  example['image'])
    np.testing.assert_array_equal(preprocessing.model_input(path, STORED, IMAGE_SIZE, options),
                                  trained_on)
  if options.crop_border:
    assert 'dermoscope border cropped' in builder.preparation_report()['conversions']


def _read_csv(path):
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_inference_on_the_test_files_equals_evaluate_on_the_test_split(folder_config, tmp_path):
  """With the run's preprocessing options, which inference reads from the run."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(folder_config, str(workdir))
  evaluate.main(['--workdir', str(workdir), '--split', 'test', '--output_dir', str(tmp_path / 'eval')])
  inference.main(['--workdir', str(workdir), '--output', str(tmp_path / 'preds.csv'),
                  f'{folder_config.manual_dir}/Test'])
  eval_columns, eval_rows = _read_csv(tmp_path / 'eval' / clinical_report.PREDICTIONS_CSV)
  file_columns, file_rows = _read_csv(tmp_path / 'preds.csv')
  probability_columns = [f'p_{name}' for name in CLASSES]
  assert eval_columns == ['file', 'label', 'predicted_class', 'melanoma_probability', *probability_columns]
  assert set(eval_columns) - {'label'} <= set(file_columns)
  assert len(eval_rows) == len(file_rows) == 2 * len(CLASSES)
  by_file = {row['file'][len(folder_config.manual_dir) + 1:]: row for row in file_rows}
  for row in eval_rows:
    assert row['label'] == row['file'].split('/')[1]
    predicted = by_file[row['file']]
    np.testing.assert_allclose([float(predicted[c]) for c in probability_columns],
                               [float(row[c]) for c in probability_columns], atol=1e-5)
    assert predicted['predicted_class'] == row['predicted_class']
  # The training run's own final evaluation writes the same file for Test.
  _, final_rows = _read_csv(workdir / clinical_report.PREDICTIONS_CSV)
  assert final_rows == eval_rows
