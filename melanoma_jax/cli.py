"""What the commands that use a trained run share: its flags and its restore."""

import argparse
import sys
from typing import Any

import ml_collections

from melanoma_jax import steps


def run_parser(doc: str, several: bool = False) -> argparse.ArgumentParser:
  """A parser with --workdir (the run; `several`: one or more) and --step; `doc` is the help."""
  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  if several:
    parser.add_argument('--workdir', required=True, nargs='+', metavar='WORKDIR',
                        help='The training run (launch.py --workdir); several, or a cross-validation '
                        'run (launch.py --all_folds), make an ensemble.')
  else:
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
