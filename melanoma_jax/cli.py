"""What the commands that use a trained run share: its flags and its restore."""

import argparse
import sys
from typing import Any

import ml_collections

from melanoma_jax import steps


def run_parser(doc: str) -> argparse.ArgumentParser:
  """A parser with --workdir (the run) and --step (its checkpoint); `doc` is the help."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='The training run (launch.py --workdir).')
  parser.add_argument('--step', type=int, default=None,
                      help='Checkpoint step; default: the best by validation loss.')
  return parser


def restore(args: argparse.Namespace) -> tuple[steps.TrainState, ml_collections.ConfigDict, dict[str, Any]]:
  """(state, config, meta) of the run's checkpoint, or exit with the reason."""
  # TensorFlow only decodes data here: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from melanoma_jax import train  # pylint: disable=g-import-not-at-top
  try:
    return train.restore_for_inference(args.workdir, args.step)
  except FileNotFoundError as e:
    sys.exit(f'Error: {e}')


def stored_image_size(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> int:
  """The side the run's dataset stored images at, which files are decoded to before resizing.

  Runs from before it was recorded decode files straight to `image_size`.
  """
  return meta.get('stored_image_size') or config.image_size
