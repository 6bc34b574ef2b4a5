"""Reading weight files users downloaded into flat {name: numpy array} dicts.

Numpy only: no torch, TensorFlow or JAX is needed to read them. Each family's
converter maps these names onto its flax variables.
"""

from collections.abc import Callable, Sequence

import numpy as np
from etils import epath
from safetensors import numpy as safetensors_numpy

from melanoma_jax.models.keras_h5 import read_keras_h5

Arrays = dict[str, np.ndarray]


def read_safetensors(path: epath.PathLike) -> Arrays:
  """A timm / torchvision / Hugging Face `.safetensors` file."""
  return dict(safetensors_numpy.load(epath.Path(path).read_bytes()))


def read_npz(path: epath.PathLike) -> Arrays:
  """A big_vision / vision_transformer `.npz` file (names as stored, '/'-separated)."""
  with epath.Path(path).open('rb') as f, np.load(f, allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


# Suffix (without the dot) -> reader.
READERS: dict[str, Callable[[epath.PathLike], Arrays]] = {
    'safetensors': read_safetensors,
    'npz': read_npz,
    'h5': read_keras_h5,  # Keras: legacy .h5 and Keras 3 .weights.h5
}


def format_of(path: epath.PathLike) -> str:
  return epath.Path(path).suffix.lstrip('.').lower()


def read(path: epath.PathLike, formats: Sequence[str]) -> Arrays:
  """The arrays of `path`, whose suffix must be one of `formats` (those the model converts)."""
  path = epath.Path(path)
  fmt = format_of(path)
  if fmt not in formats or fmt not in READERS:
    raise ValueError(f'{path}: cannot read .{fmt} weights for this model; it takes '
                     f'{", ".join("." + f for f in formats) or "no pretrained weights"}.')
  if not path.exists():
    raise FileNotFoundError(f'Weight file {path} not found (weights are never downloaded: download '
                            'it yourself, see README "Fine-tune a pretrained backbone").')
  try:
    return READERS[fmt](path)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable .{fmt} weight file: {e}') from None
