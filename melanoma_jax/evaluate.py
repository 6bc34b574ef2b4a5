"""The full evaluation report of any checkpoint of a run, or of an ensemble, on any split.

  python -m melanoma_jax.evaluate --workdir=runs/balanced [--step=N] [--split=test] [--output_dir=DIR] [--tta]
  python -m melanoma_jax.evaluate --workdir runs/cv [runs/other ...] [--combine=mean|rank] [--tta]

Writes report.json, report.md and the plots (as at the end of training) to
DIR, by default WORKDIR/evaluation/<split>-step<N>/. The temperature and the
melanoma threshold are fitted on validation for this checkpoint (for the
best one they equal training's); training's own are in
WORKDIR/calibration.json and operating_point.json and are left alone. --tta
averages the 8 flips and rotations of every image (validation included).

Several runs, or a cross-validation run (launch.py --all_folds), are
evaluated as an ensemble of their best checkpoints (`melanoma_jax.ensemble`),
with the threshold chosen on the ensemble's validation (out-of-fold)
predictions; DIR (default FIRST_WORKDIR/evaluation/ensemble-<split>[-rank][-tta])
also gets predictions.csv, operating_point.json and ensemble.json, which
`inference --ensemble=DIR` uses.
"""

import math
from collections.abc import Sequence

from melanoma_jax import runtime

if __name__ == '__main__':
  runtime.configure()  # Before JAX and TensorFlow load (XLA flags; TensorFlow's banners off).

import jax
from etils import epath

from melanoma_jax import cli, clinical_report, ensemble, errors, input_pipeline, paths

DEFAULT_TARGET_SENSITIVITY = 0.9  # For runs whose config predates config.target_sensitivity.


def _evaluate_ensemble(args) -> None:
  if args.step is not None:
    raise SystemExit('Error: --step applies to one run; an ensemble uses each run\'s best checkpoint.')
  from melanoma_jax import checkpointing  # pylint: disable=g-import-not-at-top
  first = ensemble.model_dirs(args.workdir[0])[0]
  target = args.target_sensitivity or checkpointing.read_config(first).get(
      'target_sensitivity', DEFAULT_TARGET_SENSITIVITY)
  try:
    result = ensemble.evaluate_runs(args.workdir, args.split, args.combine, args.tta, target)
  except (errors.EnsembleError, FileNotFoundError) as e:
    raise SystemExit(f'Error: {e}') from None
  name = f'ensemble-{args.split}' + ('-rank' if args.combine == 'rank' else '') + ('-tta' if args.tta else '')
  output_dir = epath.Path(args.output_dir or epath.Path(args.workdir[0]) / 'evaluation' / name)
  ensemble.write(output_dir, result)
  if jax.process_index() == 0:
    print(clinical_report.headline(result.evaluation.report))
    print(f'Wrote {output_dir / clinical_report.REPORT_MD}, {clinical_report.REPORT_JSON}, '
          f'{clinical_report.PREDICTIONS_CSV}, {ensemble.ENSEMBLE_FILE} and plots.')


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.run_parser(__doc__, several=True)
  parser.add_argument('--split', choices=('train', 'val', 'test'), default='test',
                      help='Split to report on (besides validation, where the threshold is chosen).')
  parser.add_argument('--output_dir', default=None, type=paths.user_path,
                      help='Default: WORKDIR/evaluation/<split>-step<N>.')
  parser.add_argument('--target_sensitivity', type=float, default=None,
                      help='Melanoma sensitivity the threshold must reach on validation; '
                      "default: the run's config.")
  parser.add_argument('--tta', action='store_true',
                      help='Average the 8 flips and rotations of every image.')
  parser.add_argument('--combine', choices=ensemble.COMBINE, default='mean',
                      help='Ensembles: average probabilities (mean) or quantile ranks (rank).')
  args = parser.parse_args(argv)
  if len(args.workdir) > 1 or ensemble.is_cv_run(args.workdir[0]):
    _evaluate_ensemble(args)
    return
  args.workdir = args.workdir[0]
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
  result = clinical_report.evaluate_checkpoint(state, data, args.split, target, batch_size, checkpoint, args.tta)
  output_dir = epath.Path(args.output_dir or epath.Path(args.workdir) / 'evaluation' /
                          (f'{args.split}-step{step}' + ('-tta' if args.tta else '')))
  clinical_report.write_reports(output_dir, result)
  if jax.process_index() == 0:
    print(f'Wrote {output_dir / clinical_report.REPORT_MD}, {clinical_report.REPORT_JSON}, '
          f'{clinical_report.PREDICTIONS_CSV} and plots.')


if __name__ == '__main__':
  main()
