"""Out-of-distribution refusal: no melanoma alert on an image unlike the training lesions.

A classifier answers for any input: shown a landscape photograph it still
says "melanoma, p = 0.85". So every prediction also gets a score of how far
the image lies from the training data, and an image scoring above a
threshold is refused: its row says so and raises no alert.

Scores, higher meaning further from the training data:
- `mahalanobis` (Lee et al., 2018): the smallest Mahalanobis distance of the
  image's penultimate features (the input of the classifier, the Dense layer
  named `head` in every model) to a class mean, with one covariance shared
  by the classes, fitted on the training split.
- `energy` (Liu et al., 2020): -logsumexp of the logits (a 1-unit head's
  logit z is the pair [0, z]).
The threshold is chosen on validation so that PASS_FRACTION of its images
pass. Measured on the synthetic lesions, Mahalanobis separates photographs
from lesions and energy does not (the network is as sure of itself on a
photograph as on a lesion), so Mahalanobis is the default. The features are
captured with `flax.linen.intercept_methods`, so any model with a `head`
Dense works unchanged.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from melanoma_jax import clinical_report, input_pipeline, steps

OOD_FILE = 'ood.npz'
METHODS = ('mahalanobis', 'energy')
DEFAULT_METHOD = 'mahalanobis'
# The fraction of validation images that pass. Test images pass less often
# than validation ones, which also chose the checkpoint, so this is set above
# the rate wanted on Test (README gives the Test pass rate measured).
PASS_FRACTION = 0.97
HEAD = 'head'


def features_and_logits(state: steps.TrainState, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(penultimate features [B, D] float32, logits [B, K]) in evaluation mode.

  The features are the input of the model's Dense `head`, captured on the
  way in, so the model runs once. A model that wraps another (a backbone
  with its own `head`) calls its own classifier last: the last call counts.
  """
  captured = []

  def capture_head_input(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and module.name == HEAD and context.method_name == '__call__':
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture_head_input):
    logits = state.model.apply(state.variables, images, train=False)
  if not captured:
    raise ValueError(f'{type(state.model).__name__} has no Dense layer named {HEAD!r} (the classifier); '
                     'out-of-distribution scores need its input.')
  features = captured[-1]
  return jnp.asarray(features.reshape(features.shape[0], -1), jnp.float32), jnp.asarray(logits, jnp.float32)


@jax.jit
def energy(logits: jax.Array) -> jax.Array:
  """-logsumexp of the logits [B]; a 1-unit head's logit z counts as [0, z]."""
  if logits.shape[-1] == 1:
    logits = jnp.concatenate([jnp.zeros_like(logits), logits], axis=-1)
  return -jax.nn.logsumexp(logits, axis=-1)


@jax.jit
def mahalanobis(features: jax.Array, means: jax.Array, precision: jax.Array) -> jax.Array:
  """min over classes of (f - mean_c)^T precision (f - mean_c) [B], in float32."""
  features, means, precision = (jnp.asarray(x, jnp.float32) for x in (features, means, precision))
  diff = features[:, None, :] - means[None, :, :]  # [B, C, D]
  return jnp.min(jnp.einsum('bcd,de,bce->bc', diff, precision, diff), axis=-1)


def score_features(features: jax.Array, logits: jax.Array, detector: dict[str, Any]) -> jax.Array:
  """The detector's out-of-distribution score of each example [B]; higher is further out."""
  if detector['method'] == 'energy':
    return energy(logits)
  return mahalanobis(features, detector['means'], detector['precision'])


_p_features_and_logits = jax.pmap(features_and_logits, in_axes=(None, 0))


def gather_features(state: steps.TrainState, examples: input_pipeline.Examples,
                    batch_size: int) -> dict[str, np.ndarray]:
  """A split's features, logits and labels, in its order, on every host (as gather_predictions)."""
  local = {'features': [], 'logits': [], 'labels': [], 'mask': []}
  for batch in input_pipeline.eval_batches(examples, batch_size):
    features, logits = _p_features_and_logits(state, batch['image'])
    local['features'].append(features)
    local['logits'].append(logits)
    local['labels'].append(batch['label'])
    local['mask'].append(batch['mask'])
  return clinical_report.gather_in_order(local)


def ledoit_wolf(centred: np.ndarray) -> np.ndarray:
  """Ledoit-Wolf shrunk covariance of centred rows [N, D]: (1 - a) S + a mean(diag S) I.

  With fewer training images than feature dimensions the sample covariance
  S is singular and fits the training images too closely (they would all
  look nearer than any new image); the shrinkage a is the one of least
  expected squared error (Ledoit and Wolf, 2004).
  """
  n, d = centred.shape
  covariance = centred.T @ centred / n
  mu = np.trace(covariance) / d
  squared = centred ** 2
  beta = (np.sum(squared.T @ squared) / n - np.sum(covariance ** 2)) / (n * d)
  delta = (np.sum(covariance ** 2) - 2 * mu * np.trace(covariance) + d * mu ** 2) / d
  shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
  return (1 - shrinkage) * covariance + shrinkage * mu * np.eye(d)


def fit_class_gaussians(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(class means [C, D] of the classes present, shared precision [D, D]) in float64."""
  features, labels = np.asarray(features, np.float64), np.asarray(labels)
  classes = np.unique(labels)
  means = np.stack([features[labels == c].mean(axis=0) for c in classes])
  covariance = ledoit_wolf(features - means[np.searchsorted(classes, labels)])
  # Features constant on the training data (ReLU units that never fire) leave no variance at all.
  ridge = np.finfo(np.float32).eps * max(np.trace(covariance) / len(covariance), 1.0)
  return means, np.linalg.inv(covariance + ridge * np.eye(len(covariance)))


def pass_threshold(scores: np.ndarray, pass_fraction: float = PASS_FRACTION) -> float:
  """The lowest threshold that passes (score <= threshold) at least `pass_fraction` of `scores`."""
  scores = np.sort(np.asarray(scores, np.float64))
  # The tolerance keeps 0.95 * 20 from rounding up to 20.
  return float(scores[max(1, math.ceil(pass_fraction * len(scores) - 1e-9)) - 1])


def fit(state: steps.TrainState, data: input_pipeline.Data, batch_size: int,
        checkpoint: dict[str, Any], method: str = DEFAULT_METHOD) -> dict[str, Any]:
  """The detector of a run: statistics from train, threshold from validation.

  Returns the arrays to store (`means`, `precision`; none for energy) and a
  JSON-able `summary` with the threshold and the pass rates of validation
  and Test.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown out-of-distribution score {method!r}; choose one of {METHODS}.')
  splits = {name: gather_features(state, examples, batch_size)
            for name, examples in (('train', data.train), ('val', data.val), ('test', data.test))}
  detector = {'method': method}
  if method == 'mahalanobis':
    detector['means'], detector['precision'] = fit_class_gaussians(
        splits['train']['features'], splits['train']['labels'])
  scores = {name: np.asarray(score_features(split['features'], split['logits'], detector))
            for name, split in splits.items()}
  detector['threshold'] = pass_threshold(scores['val'], PASS_FRACTION)
  detector['summary'] = {
      'method': method, 'threshold': detector['threshold'], 'pass_fraction': PASS_FRACTION,
      'rule': 'in distribution when score <= threshold; refused (no alert) otherwise',
      'fitted_on': 'train (statistics), validation (threshold)', 'checkpoint': checkpoint,
      **{f'{name}_pass_rate': float(np.mean(s <= detector['threshold'])) for name, s in scores.items()}}
  return detector


def write(workdir: epath.PathLike, detector: dict[str, Any]) -> None:
  """ood.npz with the run (process 0): method, threshold, checkpoint step, statistics."""
  if jax.process_index() != 0:
    return
  arrays = {k: np.asarray(detector[k], np.float32) for k in ('means', 'precision') if k in detector}
  with (epath.Path(workdir) / OOD_FILE).open('wb') as f:
    np.savez(f, method=np.array(detector['method']), threshold=np.array(detector['threshold']),
             step=np.array(detector['summary']['checkpoint']['step']), **arrays)


def read(workdir: epath.PathLike) -> dict[str, Any] | None:
  """The run's detector, or None for a run without one."""
  path = epath.Path(workdir) / OOD_FILE
  if not path.exists():
    return None
  with path.open('rb') as f, np.load(f) as stored:
    detector = {k: stored[k] for k in stored.files}
  detector['method'], detector['threshold'] = str(detector['method']), float(detector['threshold'])
  detector['checkpoint'] = {'step': int(detector.pop('step'))}
  return detector
