"""What the command-line tools share: a trained run's flags and restore."""

import argparse
from typing import Any

import ml_collections

from melanoma_jax import paths, steps


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


def run_parser(doc: str, several: bool = False) -> argparse.ArgumentParser:
  """A parser with --workdir (the run; `several`: one or more) and --step; `doc` is the help."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  if several:
    parser.add_argument('--workdir', required=True, nargs='+', metavar='WORKDIR', type=paths.user_path,
                        help='The training run (launch.py --workdir); several, or a cross-validation '
                        'run (launch.py --all_folds), make an ensemble.')
  else:
    parser.add_argument('--workdir', required=True, type=paths.user_path, help='The training run (launch.py --workdir).')
  parser.add_argument('--step', type=int, default=None,
                      help='Checkpoint step; default: the best by validation loss.')
  return parser


def restore(args: argparse.Namespace) -> tuple[steps.TrainState, ml_collections.ConfigDict, dict[str, Any]]:
  """(state, config, meta) of the run's checkpoint, or exit with the reason."""
  # TensorFlow only decodes data here: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from melanoma_jax import errors, train  # pylint: disable=g-import-not-at-top
  try:
    return train.restore_for_inference(args.workdir, args.step)
  except (FileNotFoundError, errors.UserError) as e:
    errors.exit_with(str(e))


def stored_image_size(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> int:
  """The side the run's dataset stored images at, which files are decoded to before resizing.

  Runs from before it was recorded decode files straight to `image_size`.
  """
  return meta.get('stored_image_size') or config.image_size
