"""Entry point: `python launch.py --config=configs/balanced.py:synthetic --workdir=runs/x`.

`--mode=prepare` only prepares the dataset (training does it on first use).
`--config.num_folds=K --all_folds` trains every fold of a K-fold
cross-validation into WORKDIR/fold_i/ (`melanoma_jax.cross_validation`).

Any config field can be overridden (`--config.num_epochs=5`); unknown fields
are refused. Rerunning the same command on the same workdir resumes.
"""

import os

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from melanoma_jax import cli, runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/balanced.py:synthetic.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, history, curves and TensorBoard logs go; '
                    'relative to the current directory, or a gs:// path.')
flags.DEFINE_enum('mode', 'train', ['train', 'prepare'],
                  'train (preparing the dataset first if needed), or only prepare the dataset.')
flags.DEFINE_bool('start_over', False, 'Move a previous run in --workdir aside (to previous_runs/) '
                  'instead of resuming it; needed when the model or data changed.')
flags.DEFINE_bool('all_folds', False, 'Cross-validation: train every fold of --config.num_folds into '
                  'WORKDIR/fold_i/ (finished folds skipped), then write out-of-fold predictions, '
                  'the fold ensemble\'s report and cv_report.md.')
flags.DEFINE_bool('distributed', False, 'Multi-host: join the other processes, found automatically '
                  'on Cloud TPU VMs and under SLURM.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host, explicit: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Multi-host, explicit: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host, explicit: this process, 0 to num_processes-1.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.mode == 'train' and not FLAGS.workdir:
    raise app.UsageError('--workdir is required to train.')
  # The console is for our progress: libraries' INFO lines (TFDS, JAX) stay out, and
  # orbax's lines (every checkpoint I/O step, how long a save waited) altogether.
  logging.get_absl_handler().addFilter(
      runtime.show_info_only_from(os.path.dirname(runtime.__file__), __file__))
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  runtime.import_tensorflow_quietly()
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  # pylint: disable=g-import-not-at-top
  from melanoma_jax import cross_validation, distributed, errors, paths, train
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.distributed)
  # Paths relative to the current directory, or with ~, become absolute here, once.
  paths.resolve_config_paths(FLAGS.config)
  workdir = paths.user_path(FLAGS.workdir)
  logging.info('Config:\n%s', FLAGS.config)
  try:
    if FLAGS.mode == 'prepare':
      _prepare(FLAGS.config)
    elif FLAGS.all_folds:
      cross_validation.run_all_folds(FLAGS.config, workdir, start_over=FLAGS.start_over)
    else:
      train.train_and_evaluate(FLAGS.config, workdir, start_over=FLAGS.start_over)
  except (errors.UserError, FloatingPointError, OSError) as e:
    message = errors.user_message(e)
    if message is None:
      raise
    # The details for a bug report, not on the console (--verbosity=1 shows them).
    logging.debug('Details:', exc_info=True)
    errors.exit_with(message)


def _prepare(config: ml_collections.ConfigDict) -> None:
  """Prepares every dataset `config.dataset` names; SIGTERM stops it, and a rerun goes on."""
  from melanoma_jax import input_pipeline, preemption  # pylint: disable=g-import-not-at-top
  try:
    # TFDS removes its half-written folder when Stopped unwinds through it.
    with preemption.stop_on_sigterm():
      for dataset in input_pipeline.combined_sources(config.dataset):
        builder = input_pipeline.prepared_builder(config, dataset)
        logging.info('%s is prepared in %s', builder.info.full_name, builder.data_path)
  except preemption.Stopped:
    logging.warning('Stopped by SIGTERM before the dataset was prepared. Rerun to prepare: '
                    'the images decoded so far are reused.')


if __name__ == '__main__':
  # TensorFlow and JAX load in `main`, once the command line has parsed: --help
  # and a mistyped flag answer without waiting for them.
  runtime.configure(reexec=True, tensorflow=False)
  cli.run(main)
