"""The full evaluation report of any checkpoint of a run, or of an ensemble, on any split.

  python -m melanoma_jax.evaluate --workdir=runs/balanced [--step=N] [--split=test] [--output_dir=DIR] [--tta]
  python -m melanoma_jax.evaluate --workdir=runs/cv [--workdir=runs/other ...] [--combine=mean|rank] [--tta]

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
  # Before JAX and TensorFlow load (XLA flags, malloc settings; TensorFlow's banners off).
  runtime.configure(reexec=True, workload='forward')

import jax
from absl import flags
from etils import epath

from melanoma_jax import cli, clinical_report, ensemble, errors, input_pipeline

DEFAULT_TARGET_SENSITIVITY = 0.9  # For runs whose config predates config.target_sensitivity.

FLAGS = flags.FlagValues()  # This tool's own (`cli.parse`).
cli.define_run_flags(FLAGS, several=True)
flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'],
                  'Split to report on (besides validation, where the threshold is chosen).',
                  flag_values=FLAGS)
cli.define_path('output_dir', 'Where the report goes; default: WORKDIR/evaluation/<split>-step<N>.', FLAGS)
cli.define_probability('target_sensitivity', 'Melanoma sensitivity the threshold must reach on '
                       "validation; default: the run's config.", FLAGS)
flags.DEFINE_bool('tta', False, 'Average the 8 flips and rotations of every image.', flag_values=FLAGS)
flags.DEFINE_enum('combine', 'mean', list(ensemble.COMBINE),
                  'Ensembles: average probabilities (mean) or quantile ranks (rank).', flag_values=FLAGS)


def _evaluate_ensemble() -> None:
  if FLAGS.step is not None:
    raise SystemExit('Error: --step applies to one run; an ensemble uses each run\'s best checkpoint.')
  from melanoma_jax import checkpointing  # pylint: disable=g-import-not-at-top
  first = ensemble.model_dirs(FLAGS.workdir[0])[0]
  target = FLAGS.target_sensitivity
  if target is None:
    target = checkpointing.read_config(first).get('target_sensitivity', DEFAULT_TARGET_SENSITIVITY)
  try:
    result = ensemble.evaluate_runs(FLAGS.workdir, FLAGS.split, FLAGS.combine, FLAGS.tta, target)
  except (errors.EnsembleError, FileNotFoundError) as e:
    raise SystemExit(f'Error: {e}') from None
  name = f'ensemble-{FLAGS.split}' + ('-rank' if FLAGS.combine == 'rank' else '') + ('-tta' if FLAGS.tta else '')
  output_dir = epath.Path(FLAGS.output_dir or epath.Path(FLAGS.workdir[0]) / 'evaluation' / name)
  ensemble.write(output_dir, result)
  if jax.process_index() == 0:
    print(clinical_report.headline(result.evaluation.report))
    print(f'Wrote {output_dir / clinical_report.REPORT_MD}, {clinical_report.REPORT_JSON}, '
          f'{clinical_report.PREDICTIONS_CSV}, {ensemble.ENSEMBLE_FILE} and plots.')


def main(argv: Sequence[str] | None = None) -> None:
  """The command with arguments `argv` (without the program name; default the command line's)."""
  cli.parse(FLAGS, argv, __doc__)
  if len(FLAGS.workdir) > 1 or ensemble.is_cv_run(FLAGS.workdir[0]):
    _evaluate_ensemble()
    return
  workdir = FLAGS.workdir[0]
  state, config, meta = cli.restore(workdir, FLAGS.step)
  data = input_pipeline.load_data(config)
  if list(data.class_names) != list(meta['class_names']):
    raise SystemExit(f'Error: the checkpoint has classes {meta["class_names"]}, the data {data.class_names}.')
  target = FLAGS.target_sensitivity
  if target is None:
    target = config.get('target_sensitivity', DEFAULT_TARGET_SENSITIVITY)
  step = int(state.step)
  checkpoint = {'step': step, 'epoch': meta['epoch'],
                'selected_by': 'lowest validation loss' if FLAGS.step is None else 'given --step'}
  # Any device count: round the batch up to a multiple of it.
  batch_size = math.ceil(config.batch_size / jax.device_count()) * jax.device_count()
  result = clinical_report.evaluate_checkpoint(state, data, FLAGS.split, target, batch_size, checkpoint, FLAGS.tta)
  output_dir = epath.Path(FLAGS.output_dir or epath.Path(workdir) / 'evaluation' /
                          (f'{FLAGS.split}-step{step}' + ('-tta' if FLAGS.tta else '')))
  clinical_report.write_reports(output_dir, result)
  if jax.process_index() == 0:
    print(f'Wrote {output_dir / clinical_report.REPORT_MD}, {clinical_report.REPORT_JSON}, '
          f'{clinical_report.PREDICTIONS_CSV} and plots.')


if __name__ == '__main__':
  main()
