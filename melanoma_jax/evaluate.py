"""The full evaluation report of any checkpoint of a run, on any split.

  python -m melanoma_jax.evaluate --workdir=runs/balanced [--step=N] [--split=test] [--output_dir=DIR]

Writes report.json, report.md and the plots (as at the end of training) to
DIR, by default WORKDIR/evaluation/<split>-step<N>/. The melanoma threshold
is chosen on validation for this checkpoint; training's own is in
WORKDIR/operating_point.json and is left alone.
"""

import math
from collections.abc import Sequence

from melanoma_jax import runtime

if __name__ == '__main__':
  runtime.configure()  # Before JAX and TensorFlow load (XLA flags; TensorFlow's banners off).

import jax
from etils import epath

from melanoma_jax import cli, evaluation, input_pipeline

DEFAULT_TARGET_SENSITIVITY = 0.9  # For runs whose config predates config.target_sensitivity.


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.run_parser(__doc__)
  parser.add_argument('--split', choices=('train', 'val', 'test'), default='test',
                      help='Split to report on (besides validation, where the threshold is chosen).')
  parser.add_argument('--output_dir', default=None, type=cli.user_path,
                      help='Default: WORKDIR/evaluation/<split>-step<N>.')
  parser.add_argument('--target_sensitivity', type=float, default=None,
                      help='Melanoma sensitivity the threshold must reach on validation; '
                      "default: the run's config.")
  args = parser.parse_args(argv)
  state, config, meta = cli.restore(args)
  data = input_pipeline.load_data(config)
  if list(data.class_names) != list(meta['class_names']):
    raise SystemExit(f'Error: the checkpoint has classes {meta["class_names"]}, the data {data.class_names}.')
  target = args.target_sensitivity or config.get('target_sensitivity', DEFAULT_TARGET_SENSITIVITY)
  step = int(state.step)
  checkpoint = {'step': step, 'epoch': meta['epoch'],
                'selected_by': 'lowest validation loss' if args.step is None else 'given --step'}
  # Any device count: round the batch up to a multiple of it.
  batch_size = math.ceil(config.batch_size / jax.device_count()) * jax.device_count()
  result = evaluation.evaluate_checkpoint(state, data, args.split, target, batch_size, checkpoint)
  output_dir = epath.Path(args.output_dir or
                          epath.Path(args.workdir) / 'evaluation' / f'{args.split}-step{step}')
  evaluation.write_reports(output_dir, result)
  if jax.process_index() == 0:
    print(f'Wrote {output_dir / evaluation.REPORT_MD}, {evaluation.REPORT_JSON}, '
          f'{evaluation.PREDICTIONS_CSV} and plots.')


if __name__ == '__main__':
  main()
