"""The generic model interface: registry, models without BatchNorm, older checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from melanoma_jax import checkpointing, models, optim, steps, train
from melanoma_jax.errors import ConfigError


class _NoBatchNorm(nn.Module):
  """A model with parameters only (as ViT): its state has no other collection."""
  num_classes: int
  axis_name: str | None = None

  @nn.compact
  def __call__(self, images, *, train: bool):
    x = models.mark_features(self, nn.Conv(4, (3, 3))(jnp.asarray(images, jnp.float32) / 255))
    return nn.Dense(self.num_classes, name='head')(jnp.mean(x, axis=(1, 2)))


def _tx():
  return optim.make_optimizer(default.get_config('synthetic'))


def test_model_without_batch_norm_trains_with_empty_model_state():
  state = steps.create_train_state(jax.random.key(0), _NoBatchNorm(3), _tx(), (8, 8, 3))
  assert state.model_state == {}
  batch = {'image': np.full((4, 8, 8, 3), 200, np.uint8), 'label': np.array([0, 1, 2, 0], np.int32)}
  new_state, metrics = jax.jit(steps.train_step)(state, batch)
  assert new_state.model_state == {} and int(new_state.step) == 1
  assert np.isfinite(float(metrics['loss'][0]))


def test_unknown_model_name_lists_the_registry():
  config = default.get_config('synthetic')
  config.model.name = 'resnet51'
  with pytest.raises(ConfigError, match='available: seed_cnn, resnet18'):
    train.validate_config(config)
  config.model.name, config.image_size = 'resnet18', 16
  with pytest.raises(ConfigError, match='too small for ResNet'):
    train.validate_config(config)


def test_checkpoint_with_the_former_batch_stats_field_restores(tmp_path):
  """Checkpoints saved before `model_state` held `batch_stats` as a field of the state."""
  config = default.get_config('synthetic')
  config.image_size = 32
  state = train.build_state(config, 9)
  state = state.replace(step=state.step + 3, model_state=jax.tree.map(lambda x: x + 1.5, state.model_state))
  former = {'step': state.step, 'params': state.params, 'batch_stats': state.model_state['batch_stats'],
            'opt_state': state.opt_state, 'rng': state.rng}
  manager = checkpointing.manager(tmp_path)
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(former),
                                          meta=ocp.args.JsonSave({'epoch': 1})))
  manager.wait_until_finished()
  restored, meta = checkpointing.restore(manager, 3, train.build_state(config, 9))
  assert meta == {'epoch': 1} and int(restored.step) == 3
  for ours, theirs in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(ours, theirs)
