"""One path from an image file to the model's input, shared by training and prediction.

A file reaches the model in two steps, the same ones whichever command reads it:

1. `decode_image`: decoded once, EXIF orientation applied, any mode made 8-bit
   RGB, then the run's `Preprocess` options (`config.preprocess`: dermoscope
   border crop, aspect ratio, Shades-of-Gray colour constancy), resized with
   PIL's LANCZOS to the dataset's stored square (256 px for the folder
   builders). The dataset builders store exactly these pixels (losslessly, as
   PNG).
2. `resize`: the stored square resized to the model's `image_size`
   (bilinear with antialiasing, rounded to uint8). The input pipeline applies
   it to stored images inside tf.data; `model_inputs` computes the same
   pixels with XLA for prediction; `model_input` applies both steps to a file.

So `inference` and `saliency` feed a file the very pixels that training and
`evaluate` fed its dataset image, and give it the same probabilities.
"""

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from etils import epath
from PIL import Image, ImageOps

from melanoma_jax.errors import UnreadableImageError

_EXIF_ORIENTATION = 0x0112
_MODE_NAMES = {
    '1': 'black-and-white',
    'L': 'grayscale',
    'LA': 'grayscale+alpha',
    'P': 'palette',
    'PA': 'palette+alpha',
}
# A JPEG may be decoded at a DCT scale (1/2, 1/4, 1/8) whose sides are at
# least this fraction of the stored size, then resized: a 600x450 ISIC JPEG
# at 1/2 (300x225) for 256 px. Training at most this fraction of the stored
# size (180 of 256 by default) then sees no detail lost; 1.0 turns it off
# for everything but JPEGs at least twice the stored size.
DRAFT_MIN_FRACTION = 7 / 8
# With the dermoscope border cropped, JPEGs are decoded at twice that size,
# so a lit field down to half the image's side keeps the same detail.
BORDER_DRAFT_SCALE = 2
# The dermoscope border: a pixel is lit when its luminance is above
# BORDER_LEVEL x the image's bright level (its 95th percentile), and a row or
# column is inside the field when at least BORDER_LINE_FRACTION of it is lit.
# An image is cropped only when a side loses at least BORDER_MIN_MARGIN of
# its length (less is noise, not a border) and the field keeps at least
# BORDER_MIN_FIELD of its area (less is a dark image, not a border).
BORDER_LEVEL = 0.25
BORDER_LINE_FRACTION = 0.1
BORDER_MIN_MARGIN = 0.02
BORDER_MIN_FIELD = 0.25
_BORDER_DETECTION_SIZE = 256  # The border is found on a copy reduced to about this size.
ASPECTS = ('squash', 'center_crop', 'pad')
_ASPECT_TAGS = {'center_crop': 'crop', 'pad': 'pad'}
MAX_SHADES_OF_GRAY_P = 64
# What PIL raises on corrupt, truncated or non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What preparation does to a decoded file before storing it (`config.preprocess`).

  The defaults do nothing: the pixels every dataset had before these options.
  They change the stored data, so they name the prepared dataset
  (`config_name`) and travel with the run's config to prediction.

  Attributes:
    crop_border: crop the dark circular border of dermoscopes to the lit
      field's bounding box (`dermoscope_field`); images without one stay as
      they are.
    color_constancy: Shades-of-Gray colour constancy (`shades_of_gray`).
    shades_of_gray_p: its Minkowski norm (6, as the ISIC 2019 and 2020 winners).
    aspect: how a non-square image becomes the stored square: 'squash'
      (stretched), 'center_crop' (the central square) or 'pad' (whole, with
      black bars).
  """
  crop_border: bool = False
  color_constancy: bool = False
  shades_of_gray_p: int = 6
  aspect: str = 'squash'

  @classmethod
  def from_config(cls, config: Any) -> 'Preprocess':
    """The options of a run's config; runs from before they existed have the defaults.

    Raises:
      ValueError: an unknown field or a value that cannot work (`check`).
    """
    section = config.get('preprocess')
    if section is None:
      return cls()
    fields = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'config.preprocess has no field {sorted(unknown)[0]!r}; its fields are '
                       f'{[f.name for f in dataclasses.fields(cls)]}.')
    options = cls(**fields)
    options.check()
    return options

  def check(self) -> None:
    """Raises ValueError naming the field to fix and its choices."""
    for name in ('crop_border', 'color_constancy'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'config.preprocess.{name}={getattr(self, name)!r} must be True or False.')
    if self.aspect not in ASPECTS:
      raise ValueError(
          f"config.preprocess.aspect={self.aspect!r} must be one of 'squash' (stretch to the "
          "square, the default), 'center_crop' (keep the aspect ratio, cut the long side) or "
          "'pad' (keep the whole image, black bars).")
    p = self.shades_of_gray_p
    if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= MAX_SHADES_OF_GRAY_P:
      raise ValueError(
          f'config.preprocess.shades_of_gray_p={p!r} must be an integer in [1, '
          f'{MAX_SHADES_OF_GRAY_P}]: 6 as the ISIC 2019 and 2020 winners, 1 is grey world, '
          'larger tends to max-RGB.')

  @property
  def tag(self) -> str:
    """The options in short, '' for the defaults: e.g. 'border_sog6_pad'."""
    parts = ['border'] * self.crop_border + [f'sog{self.shades_of_gray_p}'] * self.color_constancy
    if self.aspect != 'squash':
      parts.append(_ASPECT_TAGS.get(self.aspect, self.aspect))
    return '_'.join(parts)

  def config_name(self, size: int) -> str:
    """The name of a dataset prepared at `size` with these options: '256px', '256px_border_sog6'."""
    return f'{size}px' + (f'_{self.tag}' if self.tag else '')


_CONFIG_NAME = re.compile(r'^(\d+)px(_border)?(?:_sog(\d+))?(?:_(crop|pad))?$')


def parse_config_name(name: str) -> tuple[int, Preprocess] | None:
  """(stored size, options) of a `Preprocess.config_name`; None for other names."""
  match = _CONFIG_NAME.match(name)
  if not match:
    return None
  size, border, p, aspect = match.groups()
  options = Preprocess(crop_border=bool(border), color_constancy=p is not None,
                       shades_of_gray_p=int(p) if p else Preprocess.shades_of_gray_p,
                       aspect={v: k for k, v in _ASPECT_TAGS.items()}.get(aspect, 'squash'))
  return int(size), options


def shades_of_gray(pixels: np.ndarray, p: int) -> np.ndarray:
  """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004) of uint8 RGB pixels [H, W, 3].

  The illuminant is estimated per channel as the Minkowski p-mean of the
  image, e_c = (mean f_c^p)^(1/p) (p = 1 is grey world, p -> inf max-RGB),
  and each channel is multiplied by |e| / (sqrt(3) e_c), which makes the
  illuminant grey of the same norm (a von Kries correction); the result is
  rounded and clipped to uint8. Black pixels (padding, a dermoscope's
  border) leave the estimate's direction, hence the correction, unchanged.
  """
  values = pixels.reshape(-1, 3).astype(np.float64) / 255  # In [0, 1]: no overflow at any p.
  illuminant = np.mean(values ** p, axis=0) ** (1 / p)
  norm = np.sqrt(np.sum(illuminant ** 2))
  gains = np.where(illuminant > 0, norm / (np.sqrt(3) * np.maximum(illuminant, 1e-300)), 1.0)
  return np.clip(np.rint(pixels * gains), 0, 255).astype(np.uint8)


def dermoscope_field(image: Image.Image) -> tuple[int, int, int, int] | None:
  """The box (left, top, right, bottom) of the lit field inside a dermoscope's dark border.

  None when the image has no such border: no row or column band along an
  edge darker than BORDER_LEVEL x its bright level (see the BORDER_* constants).
  """
  width, height = image.size
  factor = max(1, min(width, height) // _BORDER_DETECTION_SIZE)
  small = image.reduce(factor) if factor > 1 else image
  gray = np.asarray(small.convert('L'), np.float32)
  lit = gray > BORDER_LEVEL * np.percentile(gray, 95)
  rows = np.flatnonzero(lit.mean(axis=1) >= BORDER_LINE_FRACTION)
  columns = np.flatnonzero(lit.mean(axis=0) >= BORDER_LINE_FRACTION)
  if not len(rows) or not len(columns):
    return None
  box = (int(columns[0]) * factor, int(rows[0]) * factor,
         min(width, (int(columns[-1]) + 1) * factor), min(height, (int(rows[-1]) + 1) * factor))
  margins = (box[0] / width, box[1] / height, 1 - box[2] / width, 1 - box[3] / height)
  area = (box[2] - box[0]) * (box[3] - box[1])
  if max(margins) < BORDER_MIN_MARGIN or area < BORDER_MIN_FIELD * width * height:
    return None
  return box


@dataclasses.dataclass(frozen=True)
class DecodedImage:
  """A uint8 RGB square image and the conversions done to get it."""
  pixels: np.ndarray
  conversions: tuple[str, ...]


def _to_8bit(values: np.ndarray) -> np.ndarray:
  """Scales 16-bit samples to 8 bits with rounding; PIL's `convert` clips at 255."""
  wide = np.clip(values.astype(np.int64), 0, 65535)
  return ((wide + 128) // 257).astype(np.uint8)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
  """Converts any PIL mode to RGB; returns the conversion done, if any."""
  mode = image.mode
  name = _MODE_NAMES.get(mode, mode)
  if mode.startswith('I'):  # 'I;16', 'I;16B', 'I': a 16-bit grayscale PNG.
    gray = Image.fromarray(_to_8bit(np.asarray(image)))
    return gray.convert('RGB'), '16-bit grayscale -> 8-bit RGB'
  if image.has_transparency_data:
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB'), (
        f'{name} -> RGB (alpha composited on white)')
  if mode == 'RGB':
    return image, None
  return image.convert('RGB'), f'{name} -> RGB'


def square_rgb(image: Image.Image, size: int, original_size: tuple[int, int] | None = None,
               preprocess: Preprocess = Preprocess()) -> DecodedImage:
  """A decoded PIL image as the stored uint8 RGB square of side `size` (step 1).

  `original_size` is the file's size before any `Image.draft`. In order: the
  dermoscope border is cropped, the aspect ratio handled, the image resized
  (LANCZOS), and the colours corrected, as `preprocess` says.
  """
  conversions = []
  if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
    image = ImageOps.exif_transpose(image)
    conversions.append('EXIF orientation applied')
  image, conversion = _to_rgb(image)
  if conversion:
    conversions.append(conversion)
  whole = (0, 0, *image.size)
  box = whole
  if preprocess.crop_border and (field := dermoscope_field(image)) is not None:
    box = field
    conversions.append('dermoscope border cropped')
  width, height = box[2] - box[0], box[3] - box[1]
  if preprocess.aspect == 'center_crop':
    side = min(width, height)
    left, top = box[0] + (width - side) / 2, box[1] + (height - side) / 2
    box = (left, top, left + side, top + side)
  # The sides, in the file's pixels, that the resize scales to `size`.
  scale = max(original_size or image.size) / max(image.size)
  sides = (original_size or image.size) if box == whole else (width * scale, height * scale)
  if (max(sides) if preprocess.aspect == 'pad' else min(sides)) < size:
    conversions.append(f'upscaled (a side under {size} px)')
  resample = Image.Resampling.LANCZOS
  if preprocess.aspect == 'pad':
    fit = size / max(width, height)
    target = (max(1, round(width * fit)), max(1, round(height * fit)))
    canvas = Image.new('RGB', (size, size))
    canvas.paste(image.resize(target, resample, box=box, reducing_gap=3.0),
                 ((size - target[0]) // 2, (size - target[1]) // 2))
    image = canvas
  elif box != whole or image.size != (size, size):
    image = image.resize((size, size), resample, box=box, reducing_gap=3.0)
  pixels = np.asarray(image, dtype=np.uint8)
  if preprocess.color_constancy:
    pixels = shades_of_gray(pixels, preprocess.shades_of_gray_p)
  return DecodedImage(pixels, tuple(conversions))


def decode_image(path: epath.PathLike, size: int,
                 preprocess: Preprocess = Preprocess()) -> DecodedImage:
  """Decodes any supported image file to its stored uint8 RGB square (step 1).

  A large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
  (`Image.draft`) before the LANCZOS resize, at the smallest scale that keeps
  each side at least `DRAFT_MIN_FRACTION` of `size` (BORDER_DRAFT_SCALE times
  that when the border is cropped): several times faster, for pixel
  differences of a few grey levels (measured in README.md).

  Raises:
    UnreadableImageError: corrupt, truncated or non-image file.
  """
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as image:
      original_size = image.size
      least = math.ceil(size * DRAFT_MIN_FRACTION * (BORDER_DRAFT_SCALE if preprocess.crop_border else 1))
      image.draft(image.mode, (least, least))  # A no-op but for JPEGs.
      image.load()  # Decode now, so truncation shows up here.
      return square_rgb(image, size, original_size, preprocess)
  except Image.UnidentifiedImageError as error:
    raise UnreadableImageError('not an image file (unrecognised format)') from error
  except _DECODE_ERRORS as error:
    raise UnreadableImageError(
        f'corrupt, truncated or unsupported ({type(error).__name__}: {error})') from error


def resize(images: tf.Tensor | np.ndarray, image_size: int) -> tf.Tensor:
  """Stored uint8 images [..., H, W, 3] at the model's `image_size`, uint8 (step 2).

  A TensorFlow op, so the input pipeline maps it inside tf.data.
  """
  resized = tf.image.resize(images, (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def model_input(path: epath.PathLike, stored_size: int, image_size: int,
                preprocess: Preprocess = Preprocess()) -> np.ndarray:
  """The model's uint8 input [image_size, image_size, 3] for an image file (steps 1 and 2).

  `stored_size` is the side the run's dataset stored its images at,
  `preprocess` the options it was prepared with (`Preprocess.from_config`).

  Raises:
    UnreadableImageError: corrupt, truncated or non-image file.
  """
  return np.asarray(model_inputs(decode_image(path, stored_size, preprocess).pixels[None], image_size))[0]


def model_inputs(stored: np.ndarray, image_size: int) -> jax.Array:
  """`resize` (step 2) of stored images [N, H, W, 3], computed by XLA (dispatched, not waited for).

  The same pixels as `resize` (TensorFlow's own weights, summed in its
  order), for a fraction of its CPU time: prediction is bound by CPU time.
  Computed on the host's CPU, as the input pipeline computes it (a TPU has
  no IEEE float64), and left uncommitted: the model's program takes it to
  its own devices.
  """
  with jax.enable_x64(True), jax.default_device(jax.local_devices(backend='cpu')[0]):
    return _resize(stored, image_size)


@functools.partial(jax.jit, static_argnames='image_size')
def _resize(images: jax.Array, image_size: int) -> jax.Array:
  """TensorFlow's antialiased resize as its kernel computes it: rows first, then columns.

  Each pass adds one tap at a time, product and sum each rounded to float32
  as TensorFlow rounds them. They are computed in float64 (which holds a
  float32 product exactly, and rounds a float32 sum correctly) because XLA
  fuses a float32 multiply and add into one FMA, which rounds once and
  moves some pixels by one grey level.
  """
  def one_axis(x: jax.Array, axis: int) -> jax.Array:
    starts, weights = _taps(x.shape[axis], image_size)
    shape = [1] * x.ndim
    shape[axis] = -1
    total = None
    for k in range(weights.shape[1]):
      product = (jnp.take(x, starts + k, axis=axis).astype(jnp.float64)
                 * weights[:, k].astype(np.float64).reshape(shape)).astype(jnp.float32)
      total = product if total is None else (total.astype(jnp.float64) + product).astype(jnp.float32)
    return total

  resized = one_axis(one_axis(images, 1), 2)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


@functools.cache
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(first input index [out_size], float32 weights [out_size, taps]) of `resize` along one axis.

  The weights are TensorFlow's: an identity image resized along that axis
  alone is its weight matrix (each output adds one nonzero product). A band
  is shifted to fit the input, its extra taps weighing zero.
  """
  identity = tf.eye(in_size)[None, :, None, :]  # [1, in_size, 1, in_size]: channel c is the c-th impulse.
  dense = tf.image.resize(identity, (out_size, 1), antialias=True).numpy()[0, :, 0, :]
  nonzero = [np.flatnonzero(row) for row in dense]
  taps = max(index[-1] - index[0] + 1 for index in nonzero)
  starts = np.minimum([index[0] for index in nonzero], in_size - taps)
  return starts, np.take_along_axis(dense, starts[:, None] + np.arange(taps), axis=1)
