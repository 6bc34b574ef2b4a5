"""One path from an image file to the model's input, shared by training and prediction.

A file reaches the model in two steps, the same ones whichever command reads it:

1. `decode_image`: decoded once, EXIF orientation applied, any mode made 8-bit
   RGB, resized with PIL's LANCZOS to the dataset's stored square (256 px for
   the folder builders). The dataset builders store exactly these pixels
   (losslessly, as PNG).
2. `resize`: the stored square resized to the model's `image_size`
   (bilinear with antialiasing, rounded to uint8). The input pipeline applies
   it to stored images; `model_input` applies both steps to a file.

So `inference` and `saliency` feed a file the very pixels that training and
`evaluate` fed its dataset image, and give it the same probabilities.
"""

import dataclasses
import math

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
# What PIL raises on corrupt, truncated or non-image files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


def square_rgb(image: Image.Image, size: int,
               original_size: tuple[int, int] | None = None) -> DecodedImage:
  """A decoded PIL image as the stored uint8 RGB square of side `size` (step 1).

  `original_size` is the file's size before any `Image.draft`.
  """
  conversions = []
  if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
    image = ImageOps.exif_transpose(image)
    conversions.append('EXIF orientation applied')
  image, conversion = _to_rgb(image)
  if conversion:
    conversions.append(conversion)
  if min(original_size or image.size) < size:
    conversions.append(f'upscaled (a side under {size} px)')
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
  return DecodedImage(np.asarray(image, dtype=np.uint8), tuple(conversions))


def decode_image(path: epath.PathLike, size: int) -> DecodedImage:
  """Decodes any supported image file to its stored uint8 RGB square (step 1).

  A large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
  (`Image.draft`) before the LANCZOS resize, at the smallest scale that keeps
  each side at least `DRAFT_MIN_FRACTION` of `size`: several times faster,
  for pixel differences of a few grey levels (measured in README.md).

  Raises:
    UnreadableImageError: corrupt, truncated or non-image file.
  """
  try:
    with epath.Path(path).open('rb') as f, Image.open(f) as image:
      original_size = image.size
      least = math.ceil(size * DRAFT_MIN_FRACTION)
      image.draft(image.mode, (least, least))  # A no-op but for JPEGs.
      image.load()  # Decode now, so truncation shows up here.
      return square_rgb(image, size, original_size)
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


def model_input(path: epath.PathLike, stored_size: int, image_size: int) -> np.ndarray:
  """The model's uint8 input [image_size, image_size, 3] for an image file (steps 1 and 2).

  `stored_size` is the side the run's dataset stored its images at.

  Raises:
    UnreadableImageError: corrupt, truncated or non-image file.
  """
  return resize(decode_image(path, stored_size).pixels, image_size).numpy()
