"""What a model family provides to the rest of the framework.

A family module defines flax Modules (subclasses of `Classifier`) that take
uint8 RGB images [B, H, W, 3] and return float32 logits, with a Dense classifier named `head`, BatchNorm
statistics (if any) in `batch_stats`, dropout on the 'dropout' rng, and
`mark_features` on the feature map Grad-CAM explains. It registers one
`ModelSpec` per model name in `melanoma_jax.models.MODELS`.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Builds the module: (config.model, head units, steps per epoch or None
# outside training) -> module. Reads the shared fields of config.model
# (dropout_rate, dtype, bn_momentum) and its own.
Builder = Callable[[ml_collections.ConfigDict, int, int | None], nn.Module]
# Flat arrays of a weight file -> flax variables {'params': ..., 'batch_stats': ...}
# with the source's own head; raises ValueError naming the first bad tensor.
Converter = Callable[[Mapping[str, np.ndarray]], dict[str, Any]]

FEATURES = 'features'


class Classifier(nn.Module):
  """The fields every model family shares; a family subclasses it and adds its own.

  The builders and `steps` set these by keyword (`clone(axis_name=...)`), so
  every family takes them alike. A family may redeclare a field to change
  its default (its place in the constructor stays this one).

  Attributes:
    num_classes: head units; 1 means a sigmoid (binary) head, >= 2 softmax.
    dropout_rate: dropout before the head.
    axis_name: the device axis BatchNorm averages batch statistics over;
      None outside pmap/shard_map. Unused by a family without BatchNorm.
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int
  dropout_rate: float = 0.0
  axis_name: str | None = None
  dtype: Any = jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One registered model.

  Attributes:
    build: constructs the module from config.model.
    check: raises ValueError on a config this model cannot run (e.g. an
      image size too small for it); called before any data is loaded.
    converters: weight-file format ('safetensors', 'npz', 'h5') -> converter.
    adapt: optional; fits converted variables to a differently shaped module
      of the same model (e.g. resampled position embeddings for another image
      size): (converted, template) -> variables. None: shapes must match.
    pretrained_fields: weight-file format -> module fields `load_pretrained`
      sets so the module computes that source's function (e.g. timm's erf GELU
      for a ViT's .safetensors, where big_vision's .npz wants the tanh one).
  """
  build: Builder
  check: Callable[[ml_collections.ConfigDict], None] = lambda config: None
  converters: Mapping[str, Converter] = dataclasses.field(default_factory=dict)
  adapt: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
  pretrained_fields: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def mark_features(module: nn.Module, x: jax.Array) -> jax.Array:
  """Marks `x` [B, h, w, C] as the feature map Grad-CAM explains; returns it unchanged.

  Sows it (`intermediates/features`) and adds a zero perturbation
  (`perturbations/features`) whose gradient is the gradient at `x`. Not at
  init, so the perturbation never joins a model's variables.
  """
  module.sow('intermediates', FEATURES, x)
  if module.is_initializing():
    return x
  return module.perturb(FEATURES, x)


def check_min_image_size(config: ml_collections.ConfigDict, minimum: int, family: str, why: str) -> None:
  """Refuses an image size the model's downsampling cannot take, saying why."""
  if config.image_size < minimum:
    raise ValueError(f'config.image_size={config.image_size} is too small for {family} '
                     f'({why} need >= {minimum}).')


def bn_momentum(model_config: ml_collections.ConfigDict, default: float) -> float:
  """config.model.bn_momentum if set, else the model's own default."""
  value = model_config.get('bn_momentum')
  return default if value is None else value
