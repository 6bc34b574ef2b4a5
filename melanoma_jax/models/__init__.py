"""The model zoo: a registry of model names and pretrained-weight import.

Adding a model = a family module (see `interface`), one line in `MODELS`,
and its config fields (if any) in the config files.
"""

from typing import Any

import flax.linen as nn
from flax import traverse_util
import ml_collections
import numpy as np
from etils import epath

from melanoma_jax.models import efficientnet, interface, resnet, seed_cnn, vit, weight_files
from melanoma_jax.models.interface import FEATURES, ModelSpec, mark_features
from melanoma_jax.models.seed_cnn import SeedCNN

MODELS: dict[str, ModelSpec] = {
    'seed_cnn': seed_cnn.SPEC,
    'resnet18': resnet.spec(resnet.ResNet18),
    'resnet34': resnet.spec(resnet.ResNet34),
    'resnet50': resnet.spec(resnet.ResNet50),
    'efficientnet_b0': efficientnet.spec('b0'),
    'efficientnet_b1': efficientnet.spec('b1'),
    'efficientnet_b2': efficientnet.spec('b2'),
    'efficientnet_b3': efficientnet.spec('b3'),
    'vit_s16': vit.spec(vit.ViTS16),
    'vit_b16': vit.spec(vit.ViTB16),
}

HEAD = 'head'


def spec(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; available: {", ".join(sorted(MODELS))}.')
  return MODELS[name]


def build(model_config: ml_collections.ConfigDict, num_classes: int,
          steps_per_epoch: int | None = None) -> nn.Module:
  """The module config.model names, with `num_classes` head units."""
  return spec(model_config.name).build(model_config, num_classes, steps_per_epoch)


def load_pretrained(name: str, path: epath.PathLike,
                    model_config: ml_collections.ConfigDict | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
  """(module, variables) of a weight file, with the source's own head.

  `module.apply(variables, uint8_images, train=False)` gives the source
  framework's logits. The file's format comes from its suffix; nothing is
  downloaded. `model_config` sets the module's other fields (dtype,
  dropout_rate, ...); defaults otherwise.
  """
  model_spec = spec(name)
  arrays = weight_files.read(path, sorted(model_spec.converters))
  fmt = weight_files.format_of(path)
  variables = model_spec.converters[fmt](arrays)
  num_classes = variables['params'][HEAD]['kernel'].shape[-1]
  config = ml_collections.ConfigDict({'name': name, 'dropout_rate': 0.0})
  if model_config is not None:
    config.update(model_config)
  return build(config, num_classes).clone(**model_spec.pretrained_fields.get(fmt, {})), variables


def fit_pretrained(name: str, pretrained: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
  """`pretrained` variables in place of `template`'s, except the head, which `template` keeps.

  So a model pretrained on ImageNet starts training on a dataset's classes
  with its backbone (and BatchNorm statistics) and a fresh head. Raises
  ValueError naming the first tensor whose name or shape does not match.
  """
  adapt = spec(name).adapt
  if adapt is not None:
    pretrained = adapt(pretrained, template)
  flat_pretrained = traverse_util.flatten_dict(pretrained)
  flat_template = traverse_util.flatten_dict(template)
  for key in sorted(flat_template.keys() | flat_pretrained.keys()):
    where = '/'.join(key)
    if key[:2] == ('params', HEAD):
      continue
    if key not in flat_pretrained:
      raise ValueError(f'The pretrained weights lack {where} {flat_template[key].shape} that {name} needs.')
    if key not in flat_template:
      raise ValueError(f'The pretrained weights hold {where}, which {name} does not have.')
    if flat_pretrained[key].shape != flat_template[key].shape:
      raise ValueError(f'{where} has shape {flat_pretrained[key].shape} in the pretrained weights, '
                       f'{flat_template[key].shape} in {name} as configured.')
  merged = {key: (flat_template[key] if key[:2] == ('params', HEAD) else
                  np.asarray(flat_pretrained[key], flat_template[key].dtype)) for key in flat_template}
  return traverse_util.unflatten_dict(merged)
