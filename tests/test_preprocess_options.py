"""config.preprocess: Shades-of-Gray, the dermoscope border crop, aspect ratio, and the data's identity."""

import numpy as np
import pytest
from PIL import Image

from configs import default
from melanoma_jax import config_checks, input_pipeline, preprocessing
from melanoma_jax.datasets import preparation
from melanoma_jax.errors import ConfigError, DataError

Preprocess = preprocessing.Preprocess


def _published_shades_of_gray(image: np.ndarray, p: int) -> np.ndarray:
  """Finlayson & Trezzi (2004) as published: e = (mean f^p)^(1/p) per channel, von Kries
  correction to the grey illuminant of the same norm, f' = f / (sqrt(3) e / |e|)."""
  f = image.astype(np.float64)
  e = np.power(np.mean(np.power(f, p), axis=(0, 1)), 1.0 / p)
  e_hat = e / np.linalg.norm(e)
  return np.clip(np.rint(f / (np.sqrt(3) * e_hat)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('p', [1, 6])
def test_shades_of_gray_is_the_published_formula(p):
  image = np.random.default_rng(p).integers(0, 256, (3, 4, 3), np.uint8)
  np.testing.assert_array_equal(preprocessing.shades_of_gray(image, p),
                                _published_shades_of_gray(image, p))


def test_shades_of_gray_removes_a_colour_cast():
  rng = np.random.default_rng(0)
  base = rng.integers(20, 200, (12, 12, 3), np.uint8)
  # The channels of a scene made of a patch and its channel rotations have the same
  # Minkowski means: its illuminant is grey, and the correction leaves it as it is.
  scene = np.concatenate([np.roll(base, shift, axis=-1) for shift in range(3)])
  np.testing.assert_array_equal(preprocessing.shades_of_gray(scene, 6), scene)
  cast = np.array([1.0, 0.75, 0.5])
  corrected = preprocessing.shades_of_gray(np.rint(scene * cast).astype(np.uint8), 6)
  # The cast goes, up to the one brightness scale the correction keeps: |cast| / sqrt(3).
  expected = scene * np.linalg.norm(cast) / np.sqrt(3)
  assert np.abs(corrected - expected).max() <= 1.5
  means = corrected.reshape(-1, 3).mean(axis=0)
  assert means.max() / means.min() < 1.01
  # Black (padding, a dermoscope's border) changes the estimate's length, not its direction.
  framed = np.pad(np.rint(scene * cast).astype(np.uint8), ((10, 10), (0, 20), (0, 0)))
  framed_corrected = preprocessing.shades_of_gray(framed, 6)
  assert np.abs(framed_corrected[10:-10, :-20].astype(int) - corrected).max() <= 1
  assert not framed_corrected[:10].any()


def _dermoscope(path, size=(240, 180), center=(124, 88), radius=80, seed=0):
  """A textured bright field inside the dark circle of a dermoscope, with a dark lesion."""
  rng = np.random.default_rng(seed)
  width, height = size
  y, x = np.mgrid[:height, :width]
  texture = np.asarray(Image.fromarray(rng.integers(120, 230, (9, 12, 3), np.uint8)).resize(
      size, Image.Resampling.BICUBIC), np.float64)
  lesion = np.hypot(x - center[0], y - center[1]) < radius / 3
  texture[lesion] *= 0.3
  field = np.hypot(x - center[0] + 0.5, y - center[1] + 0.5) < radius
  noise = rng.integers(0, 12, (height, width, 3))
  pixels = np.where(field[..., None], texture, noise)
  Image.fromarray(pixels.astype(np.uint8)).save(path)
  return (center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius)


def test_border_crop_finds_the_dermoscope_field_and_leaves_other_images_alone(tmp_path):
  box = _dermoscope(tmp_path / 'scope.png')
  with Image.open(tmp_path / 'scope.png') as image:
    found = preprocessing.dermoscope_field(image)
  # The field's bounding box, give or take the few rows where a circle's chord is short.
  assert found is not None and np.abs(np.subtract(found, box)).max() <= 3
  cropped = preprocessing.decode_image(tmp_path / 'scope.png', 64, Preprocess(crop_border=True))
  assert cropped.conversions == ('dermoscope border cropped',)
  plain = preprocessing.decode_image(tmp_path / 'scope.png', 64)
  assert plain.pixels[:, 0].mean() < 15 < cropped.pixels[32, :3].mean()
  # The same lesion without the border (its field fills the image): untouched, bit for bit.
  _dermoscope(tmp_path / 'skin.png', size=(160, 160), center=(80, 80), radius=200)
  with Image.open(tmp_path / 'skin.png') as image:
    assert preprocessing.dermoscope_field(image) is None
  untouched = preprocessing.decode_image(tmp_path / 'skin.png', 64, Preprocess(crop_border=True))
  np.testing.assert_array_equal(untouched.pixels,
                                preprocessing.decode_image(tmp_path / 'skin.png', 64).pixels)
  assert untouched.conversions == ()
  # Cropping twice changes nothing more: the cropped field has no border left.
  Image.fromarray(cropped.pixels).save(tmp_path / 'again.png')
  with Image.open(tmp_path / 'again.png') as image:
    assert preprocessing.dermoscope_field(image) is None


def test_defaults_are_a_plain_lanczos_resize(tmp_path):
  """The default options store what PIL's own RGB conversion and LANCZOS resize give."""
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(tmp_path / 'a.png')
  with Image.open(tmp_path / 'a.png') as image:
    expected = np.asarray(image.convert('RGB').resize((32, 32), Image.Resampling.LANCZOS,
                                                      reducing_gap=3.0))
  np.testing.assert_array_equal(preprocessing.decode_image(tmp_path / 'a.png', 32).pixels, expected)
  assert Preprocess().config_name(256) == '256px'


def test_aspect_ratio_squash_center_crop_pad(tmp_path):
  """A 3:1 image of red, green and blue thirds."""
  thirds = np.zeros((40, 120, 3), np.uint8)
  for c in range(3):
    thirds[:, 40 * c:40 * (c + 1), c] = 255
  Image.fromarray(thirds).save(tmp_path / 'wide.png')
  decode = lambda aspect: preprocessing.decode_image(
      tmp_path / 'wide.png', 30, Preprocess(aspect=aspect)).pixels.astype(int)
  squash, crop, pad = decode('squash'), decode('center_crop'), decode('pad')
  # Squashed: the thirds span the full height.
  assert (squash[:, 2, 0] > 200).all() and (squash[:, 15, 1] > 200).all() and (squash[:, 27, 2] > 200).all()
  # Center crop: only the green middle third is left.
  assert (crop[:, :, 1] > 200).all() and (crop[:, :, [0, 2]] < 60).all()
  # Pad: the whole image, 30x10, between black bars of 10 rows.
  assert (pad[:9] < 5).all() and (pad[21:] < 5).all()
  assert pad[15, 2, 0] > 200 and pad[15, 15, 1] > 200 and pad[15, 27, 2] > 200


def test_options_name_the_prepared_data_and_round_trip():
  options = Preprocess(crop_border=True, color_constancy=True, shades_of_gray_p=4, aspect='center_crop')
  assert options.config_name(256) == '256px_border_sog4_crop'
  for each in (options, Preprocess(aspect='pad'), Preprocess(color_constancy=True), Preprocess()):
    assert preprocessing.parse_config_name(each.config_name(128)) == (128, each)
  assert preprocessing.parse_config_name('tiny') is None
  # A builder config per name, the same object each time (TFDS refuses look-alikes).
  config = preparation.FolderBuilder.get_builder_config('256px_border_sog4_crop')
  assert config.preprocess == options and config.image_size == 256
  assert preparation.FolderBuilder.get_builder_config('256px_border_sog4_crop') is config


def _config(**preprocess):
  config = default.get_config('isic')
  config.preprocess.update(preprocess)
  return config


@pytest.mark.parametrize('preprocess, message', [
    ({'aspect': 'letterbox'}, r"aspect='letterbox' must be one of 'squash'.*'center_crop'.*'pad'"),
    ({'shades_of_gray_p': 0}, r'shades_of_gray_p=0 must be an integer in \[1, 64\]'),
    ({'gamma': 2.2}, r"config.preprocess has no field 'gamma'"),
])
def test_bad_options_are_refused_with_the_choices(preprocess, message):
  with pytest.raises(ConfigError, match=message):
    config_checks.check_preprocess(_config(**preprocess))
  with pytest.raises(ConfigError, match=message):  # --mode=prepare checks them too
    input_pipeline.prepared_builder(_config(**preprocess))


def test_options_apply_to_datasets_of_image_files_only(tmp_path):
  config = _config(color_constancy=True)
  config.dataset, config.data_dir = 'synthetic_lesions/tiny', str(tmp_path)
  with pytest.raises(DataError, match='synthetic_lesions is not one'):
    input_pipeline.prepared_builder(config)
  config.dataset = 'isic_skin_cancer/256px'
  with pytest.raises(DataError, match="write config.dataset='isic_skin_cancer'"):
    input_pipeline.prepared_builder(config)
