"""Reads Keras weight files (legacy `.h5` and Keras 3 `.weights.h5`) into flat arrays.

Both formats come out with the same keys, `'<layer name>/<i>'`, the i-th
weight of that layer in Keras' saving order (trainable, then non-trainable:
a BatchNormalization layer's gamma, beta, moving_mean, moving_variance), so a
converter handles both. The legacy format lists every weight by name; the
Keras 3 format stores numbered variables under groups named for the layer's
class, with the layer's own name in the group's `name` attribute.
"""

from pathlib import Path

import h5py
import numpy as np


def _text(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _attribute_list(group: h5py.Group, name: str) -> list[str]:
  """A string-list attribute; Keras splits long ones into name0, name1, ..."""
  if name in group.attrs:
    return [_text(v) for v in group.attrs[name]]
  values, chunk = [], 0
  while f'{name}{chunk}' in group.attrs:
    values += [_text(v) for v in group.attrs[f'{name}{chunk}']]
    chunk += 1
  return values


def _read_legacy(root: h5py.Group) -> dict[str, np.ndarray]:
  arrays = {}
  for layer in _attribute_list(root, 'layer_names'):
    group = root[layer]
    for i, weight in enumerate(_attribute_list(group, 'weight_names')):
      arrays[f'{layer}/{i}'] = np.asarray(group[weight])
  return arrays


def _read_keras3(root: h5py.Group) -> dict[str, np.ndarray]:
  arrays = {}

  def visit(path: str, item) -> None:
    if isinstance(item, h5py.Group) and path.rsplit('/', 1)[-1] == 'vars' and len(item):
      layer = _text(item.attrs.get('name', path.rsplit('/', 1)[0]))
      for i in range(len(item)):
        arrays[f'{layer}/{i}'] = np.asarray(item[str(i)])

  root.visititems(visit)
  return arrays


def read_keras_h5(path: str | Path) -> dict[str, np.ndarray]:
  """Flat `'<layer>/<i>' -> array` of a legacy `.h5` or a Keras 3 `.weights.h5` file."""
  try:
    file = h5py.File(path, 'r')
  except OSError as error:
    raise ValueError(f'{path}: not a readable HDF5 weight file ({error})') from error
  with file:
    root = file['model_weights'] if 'model_weights' in file else file  # a whole-model .h5
    if 'layer_names' in root.attrs or 'layer_names0' in root.attrs:
      arrays = _read_legacy(root)
    elif 'layers' in root:
      arrays = _read_keras3(root['layers'])
    else:
      raise ValueError(f'{path}: neither a legacy Keras .h5 (no layer_names attribute) '
                       'nor a Keras 3 .weights.h5 (no layers group)')
  if not arrays:
    raise ValueError(f'{path}: holds no weights')
  return arrays
