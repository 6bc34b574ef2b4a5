"""Range checks of the config's numeric fields and of the memory a run needs.

They run before anything is written or loaded, so a value that cannot work
fails in a second with the field's name, instead of minutes later (or, for a
learning rate of -1, never: that run "trains" to a loss of 1e10).
"""

import math
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from melanoma_jax import preprocessing
from melanoma_jax.errors import ConfigError

INF = math.inf
# field: (low, high, low inclusive, high inclusive); a missing field is not checked.
RANGES = {
    'learning_rate': (0, INF, False, False),
    'momentum': (0, 1, True, False),
    'seed': (0, 2**32 - 1, True, True),
    'log_every_steps': (1, INF, True, False),
    'checkpoints_to_keep': (1, INF, True, False),
    'checkpoint_every_steps': (0, INF, True, False),
    'model.dropout_rate': (0, 1, True, False),
    'model.bn_momentum': (0, 1, True, False),
    'plateau.min_lr': (0, INF, True, False),
    'plateau.cooldown': (0, INF, True, False),
    'augment.rotation_degrees': (0, 180, True, True),
    'augment.zoom': (0, 1, True, False),
    'augment.brightness': (0, 1, True, True),
    'augment.contrast': (0, 1, True, True),
    'augment.saturation': (0, 1, True, True),
    'augment.hue': (0, 0.5, True, True),
}
# Training keeps each layer's output for the backward pass and about as much
# again for its gradient.
ACTIVATION_COPIES = 2
# Parameters, their gradient, and the donated copy of the state during a step.
STATE_COPIES = 2


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  for key in dotted.split('.'):
    if config is None or key not in config:
      return None
    config = config[key]
  return config


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field outside its range (NaN included)."""
  for field, (low, high, low_in, high_in) in RANGES.items():
    value = _get(config, field)
    if value is None or isinstance(value, bool):
      continue
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if not (above and below):  # also true for NaN
      interval = f'{"[" if low_in else "("}{low}, {high}{"]" if high_in else ")"}'
      raise ConfigError(f'config.{field}={value} must be in {interval}.')


def check_preprocess(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming a config.preprocess field that cannot work, with its choices."""
  try:
    preprocessing.Preprocess.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def available_memory_bytes() -> tuple[int | None, str]:
  """(bytes one device may use, where) or (None, '') when unknown."""
  device = jax.local_devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    return stats.get('bytes_limit'), f'each {device.device_kind}'
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      info = dict(line.split(':', 1) for line in f)
    return int(info['MemAvailable'].split()[0]) * 1024, 'this machine'
  except (OSError, KeyError, ValueError):
    pages = os.sysconf('SC_AVPHYS_PAGES') if hasattr(os, 'sysconf') else None
    return (pages * os.sysconf('SC_PAGE_SIZE'), 'this machine') if pages else (None, '')


def _nbytes(tree: Any) -> int:
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def training_memory_bytes(config: ml_collections.ConfigDict, state_fn: Callable[[], Any]
                          ) -> tuple[int, int, int]:
  """(state, activations per device batch, per device total) estimated without allocating.

  `state_fn` builds the train state; it is only traced (`jax.eval_shape`).
  """
  state = jax.eval_shape(state_fn)
  image = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), 'uint8')
  _, captured = jax.eval_shape(lambda v, x: state.model.apply(
      v, x, train=False, capture_intermediates=True, mutable=['intermediates']), state.variables, image)
  per_device_batch = max(1, config.batch_size // jax.device_count())
  activations = _nbytes(captured) * per_device_batch * ACTIVATION_COPIES
  state_bytes = _nbytes(state)
  return state_bytes, activations, state_bytes * STATE_COPIES + activations


def check_memory(config: ml_collections.ConfigDict, state_fn: Callable[[], Any]) -> None:
  """Refuses an image_size or batch_size whose training cannot fit in memory, with the estimate."""
  available, where = available_memory_bytes()
  if not available:
    return
  try:
    state_bytes, activations, per_device = training_memory_bytes(config, state_fn)
  except Exception as error:  # pylint: disable=broad-except  # an estimate must never block a run
    logging.warning('Could not estimate the memory training needs (%s: %s).', type(error).__name__, error)
    return
  # CPU "devices" share the host's memory.
  needed = per_device * (jax.local_device_count() if where == 'this machine' else 1)
  if needed > available:
    gib = lambda n: f'{n / 2**30:.1f} GiB'
    raise ConfigError(
        f'config.image_size={config.image_size} with config.batch_size={config.batch_size} needs an '
        f'estimated {gib(needed)} to train ({gib(state_bytes)} of parameters and optimizer state, '
        f'{gib(activations)} of activations per device batch), but {where} has {gib(available)} '
        'available. Lower config.image_size or config.batch_size.')
