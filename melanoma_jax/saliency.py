"""Grad-CAM: where in the image the model found evidence for a class.

  python -m melanoma_jax.saliency --workdir=runs/balanced --image=lesion.jpg --class=melanoma --output=cam.png

Grad-CAM (Selvaraju et al., 2017) weighs the feature maps a model marks
with `models.mark_features` (the last convolution stage for CNNs, SeedCNN's
rectified conv4; the last block's patch tokens for ViT) by the mean gradient
of the class score (the logit, before softmax) with respect to them, keeps
the positive part, and upsamples it onto the image. So a clinician can check that an alert
rests on the lesion, not on a ruler, hair or the vignette.
"""

import os
import sys
from collections.abc import Sequence

from melanoma_jax import runtime

if __name__ == '__main__':
  runtime.configure()  # Before JAX and TensorFlow load (XLA flags; TensorFlow's banners off).

import jax
import jax.numpy as jnp
from jax.scipy import ndimage
import numpy as np
from absl import flags

from melanoma_jax import cli, errors, models, plots, preprocessing, steps

FLAGS = flags.FlagValues()  # This tool's own (`cli.parse`).
cli.define_run_flags(FLAGS)
cli.define_path('image', 'The image file to explain.', FLAGS, required=True)
flags.DEFINE_string('class', None, 'Class name or number; default: the predicted class.', flag_values=FLAGS)
cli.define_path('output', 'PNG file to write.', FLAGS, required=True)


def _class_score(logits: jax.Array, class_index: jax.Array) -> jax.Array:
  """The logit of the class; a 1-unit sigmoid head's logit favours class 1, so class 0 is its negative."""
  if logits.shape[-1] == 1:
    return jnp.where(class_index == 1, logits[0], -logits[0])
  return logits[class_index]


def _features_and_gradients(state: steps.TrainState, image: jax.Array,
                            class_index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The marked feature maps [h, w, K] and the class score's gradient there.

  The gradient at the maps is the gradient at the zero perturbation the
  model adds to them (`models.mark_features`).
  """
  _, marked = state.model.apply(state.variables, image[None], train=False,
                                mutable=['intermediates', 'perturbations'])
  if models.FEATURES not in marked.get('perturbations', {}):
    raise ValueError(f'{type(state.model).__name__} marks no feature map for Grad-CAM '
                     '(models.mark_features).')
  features = marked['intermediates'][models.FEATURES][0]

  def score(perturbations):
    logits = state.model.apply({**state.variables, 'perturbations': perturbations}, image[None],
                               train=False)
    return _class_score(logits[0], class_index)

  gradients = jax.grad(score)(marked['perturbations'])[models.FEATURES]
  return features[0], gradients[0]


@jax.jit
def grad_cam(state: steps.TrainState, image: jax.Array, class_index: jax.Array) -> jax.Array:
  """Grad-CAM of `class_index` for one uint8 image [H, W, 3]: [H, W] in [0, 1], 1 at the peak."""
  features, gradients = _features_and_gradients(state, image, class_index)
  cam = jax.nn.relu(jnp.tensordot(features, jnp.mean(gradients, axis=(0, 1)), axes=1))
  # Feature pixels are `feature_stride` image pixels apart (by default the
  # image size over the map size), centred on the image (valid convolutions
  # trim the border); interpolate bilinearly between their centres and hold
  # the edge values out to the image border.
  stride = getattr(state.model, 'feature_stride', None)
  coords = []
  for size, n in zip(image.shape[:2], cam.shape):
    step = stride or size / n
    coords.append((jnp.arange(size) + 0.5 - (size - step * n) / 2) / step - 0.5)
  cam = ndimage.map_coordinates(cam, jnp.meshgrid(*coords, indexing='ij'), order=1, mode='nearest')
  return jnp.clip(cam / jnp.maximum(jnp.max(cam), 1e-12), 0.0, 1.0)


def class_index(name_or_index: str, class_names: Sequence[str]) -> int:
  """A class given by name or number."""
  if name_or_index in class_names:
    return list(class_names).index(name_or_index)
  if name_or_index.isdigit() and int(name_or_index) < len(class_names):
    return int(name_or_index)
  raise ValueError(f'Unknown class {name_or_index!r}; classes: {list(class_names)}.')


def main(argv: Sequence[str] | None = None) -> None:
  """The command with arguments `argv` (without the program name; default the command line's)."""
  cli.parse(FLAGS, argv, __doc__)
  state, config, meta = cli.restore(FLAGS.workdir, FLAGS.step)
  class_names = meta['class_names']
  chosen = FLAGS['class'].value
  try:
    pixels = preprocessing.model_input(FLAGS.image, cli.stored_image_size(config, meta), config.image_size,
                                       preprocessing.Preprocess.from_config(config))
    probs = np.asarray(jax.jit(steps.predict)(state, pixels[None]))[0]
    index = int(np.argmax(probs)) if chosen is None else class_index(chosen, class_names)
  except (errors.UnreadableImageError, ValueError) as e:
    sys.exit(f'Error: {FLAGS.image}: {e}')
  cam = np.asarray(grad_cam(state, pixels, jnp.asarray(index)))
  os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
  plots.grad_cam_overlay(FLAGS.output, pixels, cam, f'Grad-CAM: {class_names[index]} '
                         f'(p={probs[index]:.3f}; predicted {class_names[int(np.argmax(probs))]})')
  print(f'Wrote {FLAGS.output}')


if __name__ == '__main__':
  main()
