"""What the commands that use a trained run share: its flags and its restore."""

import argparse
from typing import Any

import ml_collections

from melanoma_jax import steps


def probability(text: str) -> float:
  """An argparse type: a number in [0, 1] (NaN is not)."""
  value = float(text)
  if not 0 <= value <= 1:
    raise argparse.ArgumentTypeError(f'{text} is not in [0, 1]')
  return value


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text} is not >= 1')
  return value


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
  from melanoma_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    return train.restore_for_inference(args.workdir, args.step)
  except (FileNotFoundError, errors.UserError) as e:
    errors.exit_with(str(e))
