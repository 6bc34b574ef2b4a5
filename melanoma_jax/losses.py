"""Training losses selectable in config.loss: cross-entropy, class-weighted, focal.

All take the head's logits (1 unit: sigmoid; more: softmax) and integer
labels, and give one loss per example. Label smoothing applies to each.
Evaluation always reports the plain cross-entropy (`steps.head_loss`), so
validation losses stay comparable across training losses.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from melanoma_jax.errors import ConfigError

NAMES = ('cross_entropy', 'weighted_cross_entropy', 'focal')


@dataclasses.dataclass(frozen=True)
class Loss:
  """A per-example training loss; hashable, so it can be a static part of the train state.

  Attributes:
    label_smoothing: targets (1 - e) * one_hot + e / K (K = 2 for a sigmoid head).
    focal_gamma: > 0 down-weights well-classified examples by (1 - p)^gamma
      per class term (Lin et al., 2017); 0 is cross-entropy.
    class_weights: per-class factors on each example's loss (by its label);
      empty for none.
  """
  label_smoothing: float = 0.0
  focal_gamma: float = 0.0
  class_weights: tuple[float, ...] = ()

  def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:
      # Sigmoid head: the same maths over the two classes [1 - p, p].
      log_p1 = jax.nn.log_sigmoid(logits[..., 0])
      log_probs = jnp.stack([jax.nn.log_sigmoid(-logits[..., 0]), log_p1], axis=-1)
    else:
      log_probs = jax.nn.log_softmax(logits, axis=-1)
    k = log_probs.shape[-1]
    targets = jax.nn.one_hot(labels, k) * (1.0 - self.label_smoothing) + self.label_smoothing / k
    terms = -targets * log_probs
    if self.focal_gamma:
      terms = terms * (1.0 - jnp.exp(log_probs)) ** self.focal_gamma
    loss = jnp.sum(terms, axis=-1)
    if self.class_weights:
      loss = loss * jnp.asarray(self.class_weights, jnp.float32)[labels]
    return loss


def inverse_frequency_weights(class_counts: np.ndarray) -> tuple[float, ...]:
  """n / (K * n_c) per class: each class then weighs as much in total (scikit-learn's 'balanced')."""
  counts = np.asarray(class_counts, np.float64)
  if np.any(counts == 0):
    raise ConfigError(f'Class-weighted loss needs every class in the training split; counts {counts.tolist()}.')
  return tuple(float(w) for w in counts.sum() / (len(counts) * counts))


def make_loss(loss_config: ml_collections.ConfigDict | None,
              class_counts: np.ndarray | None) -> Loss | None:
  """The Loss config.loss names; `class_counts` (training labels per class) for the weighted one.

  None for plain cross-entropy: the train step then uses `steps.head_loss`,
  bit for bit the seed recipe's.
  """
  if loss_config is None:
    return None
  if loss_config.name not in NAMES:
    raise ConfigError(f'config.loss.name={loss_config.name!r}; choose one of {NAMES}.')
  if not 0 <= loss_config.label_smoothing < 1:
    raise ConfigError(f'config.loss.label_smoothing={loss_config.label_smoothing} must be in [0, 1).')
  if loss_config.name == 'focal' and loss_config.focal_gamma <= 0:
    raise ConfigError(f'config.loss.focal_gamma={loss_config.focal_gamma} must be > 0 for the focal loss.')
  weights = ()
  if loss_config.name == 'weighted_cross_entropy' and class_counts is not None:
    weights = inverse_frequency_weights(class_counts)
  if loss_config.name == 'cross_entropy' and not loss_config.label_smoothing:
    return None
  return Loss(label_smoothing=loss_config.label_smoothing,
              focal_gamma=loss_config.focal_gamma if loss_config.name == 'focal' else 0.0,
              class_weights=weights)
