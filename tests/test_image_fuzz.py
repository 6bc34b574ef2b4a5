"""Whatever bytes a file holds, reading it gives a valid RGB image or a clear, caught error."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from melanoma_jax import errors, preprocessing

SIZE = 16
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(tmp_path, data: bytes, name: str = 'x.jpg'):
  path = tmp_path / name
  path.write_bytes(data)
  try:
    decoded = preprocessing.decode_image(path, SIZE)
  except errors.UnreadableImageError as error:
    assert str(error)  # a reason the preparation report can show
    return None
  assert decoded.pixels.shape == (SIZE, SIZE, 3) and decoded.pixels.dtype == np.uint8
  return decoded


def _encoded(width, height, mode, fmt):
  rng = np.random.default_rng(width * 1000 + height)
  channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if mode == 'L' else pixels).save(buffer, fmt)
  return buffer.getvalue()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(tmp_path, data):
  _check(tmp_path, data)


@FUZZ
@given(width=st.integers(1, 64), height=st.integers(1, 64), mode=st.sampled_from(['L', 'RGB', 'RGBA']),
       fmt=st.sampled_from(['PNG', 'JPEG', 'BMP']), cut=st.floats(0.0, 1.0))
def test_truncated_images_of_odd_shapes(tmp_path, width, height, mode, fmt, cut):
  if fmt == 'JPEG' and mode == 'RGBA':
    mode = 'RGB'
  data = _encoded(width, height, mode, fmt)
  whole = _check(tmp_path, data, 'whole.' + fmt.lower())
  assert whole is not None, 'an intact image always decodes'
  _check(tmp_path, data[:int(len(data) * cut)], 'cut.' + fmt.lower())


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 4096))
def test_flipped_bytes_inside_a_valid_png(tmp_path, junk, at):
  data = bytearray(_encoded(40, 30, 'RGB', 'PNG'))
  at = at % len(data)
  data[at:at + len(junk)] = junk
  _check(tmp_path, bytes(data), 'x.png')
