"""The optimizer: Adam/AdamW/SGD, a step schedule, and a Keras-style plateau rule.

Fine-tuning adds a linear warmup + cosine decay schedule, and for the
backbone (every parameter but the head) a lower learning rate or none at
all for the first epochs (`optax.multi_transform`).

`optax.contrib.reduce_on_plateau` is built to see one value per update call.
We want Keras' `ReduceLROnPlateau(monitor='val_loss')`: one value per epoch.
So the optimizer state is the state of `optax.chain(adam, reduce_on_plateau)`,
but the train step only runs Adam and scales its updates by the plateau
scale, and the training loop feeds the validation loss to the plateau part
once per epoch. The plateau state stays in the optimizer state and hence in
every checkpoint.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import ReduceLROnPlateauState

from melanoma_jax.errors import ConfigError

OptState = tuple[Any, ReduceLROnPlateauState]


@dataclasses.dataclass(frozen=True)
class PlateauOptimizer:
  """A base optimizer whose updates are scaled by a per-epoch plateau rule."""
  base: optax.GradientTransformation
  plateau: optax.GradientTransformationExtraArgs
  learning_rate: float
  # The head's learning rate by step, before the plateau scale; None: constant.
  schedule: Callable[[Any], Any] | None = None

  def init(self, params: Any) -> OptState:
    return optax.chain(self.base, self.plateau).init(params)

  def update(self, grads: Any, opt_state: OptState, params: Any) -> tuple[Any, OptState]:
    """One training step: base update scaled by the current plateau scale."""
    base_state, plateau_state = opt_state
    updates, base_state = self.base.update(grads, base_state, params)
    updates = optax.tree.scale(plateau_state.scale, updates)
    return updates, (base_state, plateau_state)

  def end_epoch(self, opt_state: OptState, val_loss: float) -> OptState:
    """Feeds one epoch's validation loss to the plateau rule."""
    base_state, plateau_state = opt_state
    return base_state, _plateau_update(self.plateau, plateau_state, jnp.asarray(val_loss, jnp.float32))

  def current_learning_rate(self, opt_state: OptState, step: int | None = None) -> float:
    """The head's learning rate at `step` (the scheduled one when there is a schedule)."""
    rate = self.learning_rate if self.schedule is None or step is None else float(self.schedule(step))
    return rate * float(jax.device_get(opt_state[1].scale))


@functools.partial(jax.jit, static_argnums=0)
def _plateau_update(plateau: optax.GradientTransformationExtraArgs,
                    state: ReduceLROnPlateauState, value: jax.Array) -> ReduceLROnPlateauState:
  return plateau.update(updates=(), state=state, value=value)[1]


def keras_plateau(learning_rate: float, factor: float, patience: int,
                  min_delta: float, cooldown: int,
                  min_lr: float) -> optax.GradientTransformationExtraArgs:
  """`reduce_on_plateau` with the semantics of Keras `ReduceLROnPlateau`.

  Keras compares `val < best - min_delta` (absolute), floors the learning
  rate at `min_lr` (absolute) and, because it decrements its cooldown
  counter before testing it, rests for `cooldown - 1` epochs after a
  reduction; optax rests for `cooldown` update calls. Hence the mapping.
  """
  if min_delta <= 0:
    raise ConfigError(
        f'plateau.min_delta must be > 0 (got {min_delta}); optax needs a '
        'positive tolerance. Keras\' default is 1e-4.')
  if not 0 < factor < 1:
    raise ConfigError(f'plateau.factor must be in (0, 1), got {factor}.')
  if patience < 1:
    raise ConfigError(f'plateau.patience must be >= 1 epoch, got {patience}.')
  return optax.contrib.reduce_on_plateau(
      factor=factor, patience=patience, rtol=0.0, atol=min_delta,
      cooldown=max(cooldown - 1, 0), min_scale=min_lr / learning_rate)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """config.schedule: 'constant', or 'warmup_cosine' (linear from 0, then cosine to final_fraction x).

  A run no longer than its warmup (e.g. a short trial of a recipe) only warms up.
  """
  sched = config.get('schedule') or ml_collections.ConfigDict({'name': 'constant'})
  if sched.name == 'constant':
    return optax.constant_schedule(config.learning_rate)
  if sched.name != 'warmup_cosine':
    raise ConfigError(f"config.schedule.name must be 'constant' or 'warmup_cosine', got {sched.name!r}.")
  total = config.num_epochs * steps_per_epoch
  if sched.warmup_epochs < 0:
    raise ConfigError(f'config.schedule.warmup_epochs={sched.warmup_epochs} must be >= 0.')
  warmup = int(round(sched.warmup_epochs * steps_per_epoch))
  if warmup >= total:  # a run no longer than its warmup only warms up
    return optax.linear_schedule(0.0, config.learning_rate, total)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup, decay_steps=total,
      end_value=config.learning_rate * sched.final_fraction)


def _base(config: ml_collections.ConfigDict, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  if config.optimizer == 'adam':
    return optax.adam(learning_rate, eps=1e-7)  # Keras' epsilon, as the seed recipe
  if config.optimizer == 'adamw':
    # No decay of biases and normalisation scales (1-D parameters).
    return optax.adamw(learning_rate, weight_decay=config.get('weight_decay', 0.0),
                       mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
  if config.optimizer == 'sgd':
    return optax.sgd(learning_rate, momentum=config.momentum or None)
  raise ConfigError(f"config.optimizer must be 'adam', 'adamw' or 'sgd', got {config.optimizer!r}.")


def head_or_backbone(params: Any) -> Any:
  """Labels every parameter 'head' (the classifier, params['head']) or 'backbone'."""
  return {name: jax.tree.map(lambda _, n=name: 'head' if n == 'head' else 'backbone', tree)
          for name, tree in params.items()}


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> PlateauOptimizer:
  """The base optimizer on `config.schedule`, with the plateau rule from `config.plateau`.

  With `config.plateau.enabled` False the training loop never calls
  `end_epoch`, so the plateau scale stays 1. `config.backbone` gives every
  parameter but the head `lr_multiplier` x the learning rate, and none for
  its first `frozen_epochs`. Steps with a non-finite gradient change nothing
  whatever the config (`steps.train_step`), so the state's layout never
  depends on `config.skip_nonfinite_steps`.
  """
  p = config.plateau
  schedule = learning_rate_schedule(config, steps_per_epoch)
  constant = (config.get('schedule') or {}).get('name', 'constant') == 'constant'
  backbone = config.get('backbone') or ml_collections.ConfigDict({'lr_multiplier': 1.0, 'frozen_epochs': 0})
  if backbone.lr_multiplier < 0 or backbone.frozen_epochs < 0:
    raise ConfigError(f'config.backbone.lr_multiplier={backbone.lr_multiplier} and frozen_epochs='
                     f'{backbone.frozen_epochs} must be >= 0.')
  if backbone.lr_multiplier == 1 and not backbone.frozen_epochs:
    # A constant rate as a float: the optimizer state of the seed recipe (and its checkpoints).
    base = _base(config, config.learning_rate if constant else schedule)
  else:
    frozen_steps = backbone.frozen_epochs * steps_per_epoch
    backbone_schedule = lambda step: jnp.where(step < frozen_steps, 0.0,
                                               backbone.lr_multiplier * schedule(step))
    base = optax.multi_transform({'head': _base(config, schedule),
                                  'backbone': _base(config, backbone_schedule)}, head_or_backbone)
  return PlateauOptimizer(
      base=base,
      plateau=keras_plateau(config.learning_rate, p.factor, p.patience,
                            p.min_delta, p.cooldown, p.min_lr),
      learning_rate=config.learning_rate,
      schedule=None if constant else schedule)
