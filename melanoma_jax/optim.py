"""Adam chained with a Keras-style reduce-learning-rate-on-plateau.

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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from optax.contrib import ReduceLROnPlateauState

OptState = tuple[Any, ReduceLROnPlateauState]


@dataclasses.dataclass(frozen=True)
class PlateauOptimizer:
  """A base optimizer whose updates are scaled by a per-epoch plateau rule."""
  base: optax.GradientTransformation
  plateau: optax.GradientTransformationExtraArgs
  learning_rate: float

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

  def current_learning_rate(self, opt_state: OptState) -> float:
    return self.learning_rate * float(jax.device_get(opt_state[1].scale))


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
    raise ValueError(
        f'plateau.min_delta must be > 0 (got {min_delta}); optax needs a '
        'positive tolerance. Keras\' default is 1e-4.')
  if not 0 < factor < 1:
    raise ValueError(f'plateau.factor must be in (0, 1), got {factor}.')
  if patience < 1:
    raise ValueError(f'plateau.patience must be >= 1 epoch, got {patience}.')
  return optax.contrib.reduce_on_plateau(
      factor=factor, patience=patience, rtol=0.0, atol=min_delta,
      cooldown=max(cooldown - 1, 0), min_scale=min_lr / learning_rate)


def make_optimizer(config: ml_collections.ConfigDict) -> PlateauOptimizer:
  """Adam (or SGD) at `config.learning_rate`, with the plateau rule from `config.plateau`.

  With `config.plateau.enabled` False the training loop never calls
  `end_epoch`, so the scale stays 1 and the learning rate constant. Steps
  with a non-finite gradient change nothing whatever the config
  (`steps.train_step`), so the state's layout never depends on
  `config.skip_nonfinite_steps`.
  """
  p = config.plateau
  if config.optimizer == 'adam':
    base = optax.adam(config.learning_rate, eps=1e-7)  # Keras' epsilon, as the seed recipe
  elif config.optimizer == 'sgd':
    base = optax.sgd(config.learning_rate, momentum=config.momentum or None)
  else:
    raise ValueError(f"config.optimizer must be 'adam' or 'sgd', got {config.optimizer!r}.")
  return PlateauOptimizer(
      base=base,
      plateau=keras_plateau(config.learning_rate, p.factor, p.patience,
                            p.min_delta, p.cooldown, p.min_lr),
      learning_rate=config.learning_rate)
