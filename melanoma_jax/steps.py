"""The functional core: train state, loss, metrics and the per-device steps.

`train_step` and `eval_step` are pure functions of (state, batch). They are
written per device with an optional `axis_name`: under `jax.pmap` or
`jax.shard_map` the collectives average gradients and BatchNorm statistics
and sum metrics over that axis; with `axis_name=None` they run under plain
`jax.jit` on one device.

Metrics are `{name: (sum, count)}` pairs summed over devices, so the host
divides once and means are exact whatever the batch split or padding.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from melanoma_jax import losses, optim

Batch = dict[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


class TrainState(struct.PyTreeNode):
  """Everything a step needs and a checkpoint keeps.

  `model` and `tx` are static (not pytree leaves): they are configuration,
  rebuilt from the config file on restore. `model_state` holds the model's
  non-parameter collections by name (`{'batch_stats': ...}` for a model
  with BatchNorm, `{}` for one without).
  """
  step: jax.Array
  params: Any
  model_state: dict[str, Any]
  opt_state: optim.OptState
  rng: jax.Array
  model: nn.Module = struct.field(pytree_node=False)
  tx: optim.PlateauOptimizer = struct.field(pytree_node=False)
  # The training loss; None: `head_loss`. Evaluation always uses `head_loss`.
  loss: losses.Loss | None = struct.field(pytree_node=False, default=None)

  @property
  def num_outputs(self) -> int:
    return self.params['head']['kernel'].shape[-1]

  @property
  def variables(self) -> dict[str, Any]:
    """What `model.apply` takes."""
    return {'params': self.params, **self.model_state}


# Collections `apply` fills on demand (Grad-CAM's hooks), never state.
_TRANSIENT_COLLECTIONS = ('intermediates', 'perturbations')


def create_train_state(rng: jax.Array, model: nn.Module,
                       tx: optim.PlateauOptimizer,
                       image_shape: tuple[int, int, int],
                       loss: losses.Loss | None = None) -> TrainState:
  """Initialises parameters, other model collections and optimizer state."""
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng, image_shape)
  params = variables['params']
  model_state = {name: tree for name, tree in variables.items()
                 if name != 'params' and name not in _TRANSIENT_COLLECTIONS}
  return TrainState(
      step=jnp.asarray(0, jnp.int32), params=params,
      model_state=model_state, opt_state=init_optimizer(tx, params),
      rng=jax.random.key_data(state_rng), model=model, tx=tx, loss=loss)


def init_optimizer(tx: optim.PlateauOptimizer | optax.GradientTransformation, params: Any) -> Any:
  """`tx.init(params)` as one compiled program per (optimizer, parameter shapes).

  Op by op, the zeros of every new parameter shape compile on their own.
  """
  if not _hashable(tx):  # a program for this call alone
    return jax.jit(tx.init)(params)
  return _compiled_optimizer_init(tx, params)


@functools.partial(jax.jit, static_argnums=0)
def _compiled_optimizer_init(tx: Any, params: Any) -> Any:
  return tx.init(params)


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """`model.init` on uint8 images of `image_shape`, as one compiled program per (model, image shape).

  Run op by op, every initializer compiles on its own for each parameter
  shape, which made a run's start wait longest on its initialisation. On the
  CPU it compiles at LLVM optimisation level 1: the program runs once, so its
  compile is nearly all its time. The values are flax's own op-by-op `init`
  (to the bit for the seed model, tests/test_steps.py; a fused normal
  initializer may round its last bit differently).
  """
  # Compiler options are for a top-level jit only, not one inside a caller's trace (eval_shape).
  backend = jax.default_backend() if not isinstance(rng, jax.core.Tracer) else None
  if not _hashable(model):  # a field flax cannot hash (a list): a program for this call alone
    return jax.jit(functools.partial(_init, model), static_argnums=1,
                   compiler_options=_init_options(backend))(rng, tuple(image_shape))
  return _compiled_init(backend)(model, rng, tuple(image_shape))


def _hashable(value: Any) -> bool:
  """Whether `value` can be a static argument of a cached jitted function."""
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _init(model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  return model.init(rng, jnp.zeros((1, *image_shape), jnp.uint8), train=False)


def _init_options(backend: str | None) -> dict[str, Any] | None:
  return {'xla_backend_optimization_level': 1} if backend == 'cpu' else None


@functools.cache
def _compiled_init(backend: str | None) -> Callable[[nn.Module, jax.Array, tuple[int, int, int]], dict[str, Any]]:
  """The jitted init, reused by equal models (flax modules compare and hash by their fields)."""
  return jax.jit(_init, static_argnums=(0, 2), compiler_options=_init_options(backend))


def head_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example loss; the head decides it, so the two can never disagree.

  One unit is a sigmoid with binary cross-entropy on {0, 1} labels; more
  units are a softmax with cross-entropy on integer labels.
  """
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def head_probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities [batch, max(units, 2)]; a 1-unit head gives [1-p, p]."""
  if logits.shape[-1] == 1:
    p1 = jax.nn.sigmoid(logits)
    return jnp.concatenate([1.0 - p1, p1], axis=-1)
  return jax.nn.softmax(logits)


def _metrics(loss: jax.Array, predicted: jax.Array, labels: jax.Array,
             weights: jax.Array, num_classes: int,
             axis_name: str | None) -> Metrics:
  """(sum, count) pairs over the weighted examples, summed over devices."""
  count = jnp.sum(weights)
  confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, predicted].add(weights)
  metrics = {
      'loss': (jnp.sum(loss * weights), count),
      'accuracy': (jnp.sum((predicted == labels) * weights), count),
      'confusion': (confusion, count),
  }
  return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)


def _dropout_rng(state: TrainState, axis_name: str | None) -> jax.Array:
  """A fresh key per step and per device, derived from the state alone."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return rng


def _inputs(model: nn.Module, images: jax.Array, metadata: jax.Array | None) -> tuple:
  """The model's positional inputs: metadata too for models that take it (`uses_metadata`)."""
  return (images, metadata) if getattr(model, 'uses_metadata', False) else (images,)


def train_step(state: TrainState, batch: Batch,
               axis_name: str | None = None) -> tuple[TrainState, Metrics]:
  """One optimizer step on this device's share of the global batch."""
  model = state.model.clone(axis_name=axis_name)
  labels = batch['label']

  def loss_fn(params):
    logits, model_state = model.apply(
        {'params': params, **state.model_state},
        *_inputs(model, batch['image'], batch.get('metadata')),
        train=True, rngs={'dropout': _dropout_rng(state, axis_name)},
        mutable=list(state.model_state))
    loss = (state.loss or head_loss)(logits, labels)
    predicted = jnp.argmax(head_probabilities(logits), axis=-1)
    return jnp.mean(loss), (loss, predicted, model_state)

  params = state.params
  if axis_name is not None:
    # Differentiate per device, then average explicitly: shard_map would
    # otherwise sum the gradients of device-invariant params implicitly.
    params = jax.lax.pcast(params, axis_name, to='varying')
  grads, (loss, predicted, model_state) = jax.grad(loss_fn, has_aux=True)(params)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  # A non-finite step counts in no metric and changes no parameter, optimizer
  # state or BatchNorm statistic (all of model_state); the loop then stops
  # or, with config.skip_nonfinite_steps, goes on. Either way the state's
  # layout is the same, so checkpoints move between the two settings.
  # A conditional rather than a select on every array: XLA:CPU then updates
  # each optimizer array in fewer passes over memory.
  finite = jnp.isfinite(optax.tree.sum(grads))  # grads are averaged: the same on every device

  def updated(new_model_state):
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), new_model_state, opt_state

  params, model_state, opt_state = jax.lax.cond(
      finite, updated, lambda _: (state.params, state.model_state, state.opt_state), model_state)
  new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                            opt_state=opt_state)
  weights = jnp.where(finite, jnp.ones_like(loss), jnp.zeros_like(loss))
  metrics = _metrics(jnp.where(finite, loss, 0.0), predicted, labels, weights,
                     max(state.num_outputs, 2), axis_name)
  metrics['nonfinite'] = (1.0 - finite.astype(jnp.float32), jnp.ones([], jnp.float32))
  return new_state, metrics


def _eval_logits(state: TrainState, images: jax.Array,
                 metadata: jax.Array | None = None) -> jax.Array:
  return state.model.apply(state.variables, *_inputs(state.model, images, metadata), train=False)


def predict(state: TrainState, images: jax.Array, metadata: jax.Array | None = None) -> jax.Array:
  """Class probabilities [batch, classes] in evaluation mode (metadata: see `metadata.py`)."""
  return head_probabilities(_eval_logits(state, images, metadata))


def predict_with_loss(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(class probabilities, per-example loss) in evaluation mode: one pass for every metric.

  The loss comes from the logits, so it stays finite where a probability
  underflows to 0.
  """
  logits = _eval_logits(state, batch['image'], batch.get('metadata'))
  return head_probabilities(logits), head_loss(logits, batch['label'])


def dihedral(images: jax.Array, k: int) -> jax.Array:
  """The k-th of the 8 rotations (k % 4 quarter turns) and flips (k >= 4) of square images [B, H, W, C]."""
  rotated = jnp.rot90(images, k % 4, axes=(1, 2))
  return jnp.flip(rotated, axis=2) if k >= 4 else rotated


def predict_tta(state: TrainState, images: jax.Array, metadata: jax.Array | None = None) -> jax.Array:
  """Class probabilities averaged over the 8 dihedral transforms: lesions have no orientation."""
  batch = images.shape[0]
  metadata = None if metadata is None else jnp.tile(metadata, (8, 1))
  probs = predict(state, jnp.concatenate([dihedral(images, k) for k in range(8)]), metadata)
  return jnp.mean(probs.reshape(8, batch, -1), axis=0)


def predict_with_loss_tta(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """As `predict_with_loss` over the 8 dihedral views: averaged probabilities and their cross-entropy."""
  probs = predict_tta(state, batch['image'], batch.get('metadata'))
  p_label = jnp.take_along_axis(probs, batch['label'][:, None].astype(jnp.int32), axis=-1)[:, 0]
  return probs, -jnp.log(jnp.maximum(p_label, jnp.finfo(probs.dtype).tiny))


def eval_step(state: TrainState, batch: Batch,
              axis_name: str | None = None) -> Metrics:
  """Metrics of one evaluation batch; `batch['mask']` zeroes padding."""
  logits = _eval_logits(state, batch['image'], batch.get('metadata'))
  predicted = jnp.argmax(head_probabilities(logits), axis=-1)
  return _metrics(head_loss(logits, batch['label']), predicted, batch['label'], batch['mask'].astype(jnp.float32),
                  max(state.num_outputs, 2), axis_name)
