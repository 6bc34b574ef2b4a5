"""The training loop: epochs of pmapped steps, evaluation, checkpoints, logs.

All side effects of training live here (and in `reporting`); the maths is in
`steps`, `optim` and `models`.
"""

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from melanoma_jax import (calibration, checkpointing, clinical_report, config_checks, datasets, distributed,
                          input_pipeline, intervals, losses, metrics as metrics_lib, model_summary, models,
                          ood, optim, paths, preemption, reporting, steps, workdir_lock)
from melanoma_jax import metadata as metadata_lib
from melanoma_jax.errors import ConfigError

AXIS = 'batch'
# With config.skip_nonfinite_steps, the run stops once an epoch has had this
# many non-finite steps and none finite since the last check: skipping cannot
# help parameters that make every batch non-finite.
MAX_NONFINITE_TO_SKIP = 20
COMPUTE_DTYPES = ('float32', 'bfloat16')


def num_outputs(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """Head units for the label space: 1 (sigmoid) for 2 classes, else one per class."""
  expected = 1 if num_classes == 2 else num_classes
  requested = config.model.num_outputs
  if requested is not None and requested != expected and not (num_classes == 2 and requested == 2):
    raise ConfigError(
        f'config.model.num_outputs={requested} cannot match {num_classes} classes '
        f'(task={config.task}): a 1-unit sigmoid head needs exactly 2 classes and a softmax head one '
        f'unit per class. Use num_outputs={expected} or leave it unset.')
  return expected if requested is None else requested


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, before any data or compilation, on values that cannot work."""
  devices = jax.device_count()
  if config.batch_size <= 0 or config.batch_size % devices:
    raise ConfigError(f'config.batch_size={config.batch_size} must be a positive multiple of the '
                      f'{devices} devices, so each gets an equal share.')
  if config.model.name not in models.MODELS:
    raise ConfigError(f'config.model.name={config.model.name!r}; available: {", ".join(models.MODELS)}.')
  try:
    models.MODELS[config.model.name].check(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model.dtype not in COMPUTE_DTYPES:
    raise ConfigError(f'config.model.dtype={config.model.dtype!r}; choose one of {COMPUTE_DTYPES} '
                      '(parameters always stay float32).')
  if not 0 < config.val_fraction < 1:
    raise ConfigError(f'config.val_fraction={config.val_fraction} must be in (0, 1).')
  num_folds = config.get('num_folds', 0)
  if num_folds and not (num_folds >= 2 and 0 <= config.fold < num_folds):
    raise ConfigError(f'config.num_folds={num_folds}, config.fold={config.fold}: cross-validation '
                      'needs num_folds >= 2 (0 turns it off) and fold in [0, num_folds).')
  if config.num_epochs < 1:
    raise ConfigError(f'config.num_epochs={config.num_epochs} must be >= 1.')
  if not 0 < config.target_sensitivity <= 1:
    raise ConfigError(f'config.target_sensitivity={config.target_sensitivity} must be in (0, 1].')
  optim.make_optimizer(config)  # raises on invalid optimizer, schedule or plateau settings
  losses.make_loss(config.get('loss'), None)  # raises on invalid loss settings
  config_checks.check_ranges(config)
  config_checks.check_preprocess(config)
  config_checks.check_memory(config, lambda: build_state(config, config.model.num_outputs or 9))


def build_state(config: ml_collections.ConfigDict, outputs: int, steps_per_epoch: int | None = None,
                class_counts: np.ndarray | None = None) -> steps.TrainState:
  """A freshly initialised train state for `config`'s model, optimizer and loss.

  `steps_per_epoch` and `class_counts` (training examples per class) are
  None outside training; they set the schedule, model settings such as a
  BatchNorm momentum, and class weights.
  """
  model = models.build(config.model, outputs, steps_per_epoch)
  if config.model.get('metadata'):
    model = metadata_lib.MetadataModel(model, num_classes=outputs, dtype=model.dtype,
                                       feature_dropout=config.model.metadata_dropout)
  return steps.create_train_state(jax.random.key(config.seed), model,
                                  optim.make_optimizer(config, steps_per_epoch or 1),
                                  (config.image_size, config.image_size, 3),
                                  losses.make_loss(config.get('loss'), class_counts))


def restore_for_inference(workdir: str, step: int | None = None
                          ) -> tuple[steps.TrainState, ml_collections.ConfigDict, dict[str, Any]]:
  """(state, config, meta) of a run's checkpoint: `step`, or the best by validation loss."""
  config = checkpointing.read_config(workdir)
  manager = checkpointing.manager(workdir)
  step = manager.best_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'No checkpoint {step if step is not None else ""} in {workdir}/checkpoints; '
                            f'kept steps: {list(manager.all_steps())}.')
  template = lambda meta: jax.eval_shape(lambda: build_state(
      config, num_outputs(config, len(meta['class_names']))))
  state, meta = checkpointing.restore_step(manager, step, template)
  manager.close()
  return state, config, meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       start_over: bool = False) -> dict[str, Any] | None:
  """Trains, resuming from `workdir` if it holds checkpoints; returns Test metrics.

  Returns None when preempted (SIGTERM): the state was saved at a step
  boundary (or, outside the training loop, everything was saved already)
  and the same call resumes it. Test is evaluated once, at the end, with
  the checkpoint of lowest validation loss. The workdir is locked for the
  whole call: a second run on it is refused.
  """
  validate_config(config)
  workdir = epath.Path(paths.user_path(str(workdir)))  # orbax refuses relative paths
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0), preemption.stop_on_sigterm():
    try:
      return _train_and_evaluate(config, workdir, start_over)
    except preemption.Stopped:
      logging.warning('Stopped by SIGTERM outside the training steps; every finished epoch is saved. '
                      'Rerun the same command to resume.')
      return None


class Preempted(Exception):
  """SIGTERM reached the training steps and the state is saved at `step`: a rerun resumes there."""

  def __init__(self, step: int):
    super().__init__(f'preempted; step {step} is saved')
    self.step = step


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        start_over: bool) -> dict[str, Any] | None:
  """Set up, then each epoch's steps and its end, then the final evaluation.

  Preemption, in an epoch's steps or at its end, leaves here and only here.
  """
  checkpointing.check_workdir(workdir, config, start_over)
  data = input_pipeline.load_data(config)
  run, state, meta, history = _start(config, workdir, data)
  distributed.wait_for_all_processes('melanoma_jax_training_starts')
  try:
    with preemption.PreemptionWatch(run.manager) as preempted:
      for epoch in range(int(state.step) // run.epoch_steps + 1, config.num_epochs + 1):
        trained = _train_epoch(run, state, epoch, meta.get('partial_train_metrics'), history, preempted)
        state, history = _end_epoch(run, epoch, trained, history)
        if preempted(int(state.step)):
          raise Preempted(int(state.step))
  except Preempted as stop:
    logging.warning('Preempted: saved step %d; rerun the same command to resume.', stop.step)
    run.manager.close()
    return None
  logging.info('Final parameters sha256 %s (process %d)', params_digest(state.params), jax.process_index())
  result = _final_evaluation(run.manager, state, history, data, config, workdir)
  run.manager.close()
  return result


@dataclasses.dataclass(frozen=True)
class Run:
  """What every epoch of one run uses: its config and data, the pmapped step, where it writes."""
  config: ml_collections.ConfigDict
  data: input_pipeline.Data
  workdir: epath.Path
  manager: Any  # orbax.checkpoint.CheckpointManager of workdir/checkpoints
  epoch_steps: int
  train_step: Callable[[steps.TrainState, Any], tuple[steps.TrainState, metrics_lib.Metrics]]
  writer: tf.summary.SummaryWriter | None  # TensorBoard; None on processes other than 0
  # Epochs whose batches are already on their way (at most the next one), by epoch.
  ahead: dict[int, input_pipeline.BatchesAhead] = dataclasses.field(default_factory=dict)


def _start(config: ml_collections.ConfigDict, workdir: epath.Path, data: input_pipeline.Data
           ) -> tuple[Run, steps.TrainState, dict[str, Any], list[dict[str, Any]]]:
  """The run's state (its latest checkpoint, or fresh), that checkpoint's meta, and its history.

  Writes what a started run has: config.json, the model's layer table, the
  dataset overview (first start only), history.jsonl and the curves.
  """
  num_classes = len(data.class_names)
  epoch_steps = input_pipeline.steps_per_epoch(len(data.train), config.batch_size)
  fresh = functools.partial(build_state, config, num_outputs(config, num_classes), epoch_steps,
                            np.bincount(data.train.labels, minlength=num_classes))
  manager = checkpointing.manager(workdir, config.checkpoints_to_keep)
  # Resuming needs the state's shapes only (the checkpoint holds its values): no initialisation to compile.
  state, meta = (checkpointing.restore_latest(manager, jax.eval_shape(fresh), workdir)
                 if manager.all_steps() else (None, {}))
  if not meta:
    state = fresh()
  logging.info('Classes %s; train %d, val %d, test %d examples; %d steps per epoch; model %s',
               data.class_names, len(data.train), len(data.val), len(data.test), epoch_steps, state.model)
  first_epoch = int(state.step) // epoch_steps + 1
  # Its pipeline warms up during the rest of the set-up and the step's compile.
  ahead = {first_epoch: _batches_ahead(config, data, first_epoch, epoch_steps, int(state.step) % epoch_steps)
           } if first_epoch <= config.num_epochs else {}
  checkpointing.write_config(workdir, config)  # the run has started: data and state fit
  _warn_without_validation_melanoma(data)
  if not meta and config.model.get('init_from'):
    state = _init_from_pretrained(state, config)
  reporting.write_model_summary(workdir, model_summary.layer_table(
      state.model, (config.image_size, config.image_size, 3), train=False))
  if not meta:
    reporting.plot_dataset_overview(workdir, data, input_pipeline.expected_draws_per_class(
        data.train.labels, num_classes, config.balance_classes, epoch_steps * config.batch_size))
  # Replicated on this host's devices, as the pmapped step returns it: the
  # step donates the state, and donation that needs resharding fails on
  # multi-host pmap.
  state = jax.device_put(state, NamedSharding(Mesh(np.array(jax.local_devices()), (AXIS,)), P()))
  # The checkpoint carries the history up to it: history.jsonl may lag behind
  # a checkpoint (a kill between the two writes) or run ahead of it.
  history = meta['history'] if 'history' in meta else [
      row for row in reporting.read_history(workdir) if row['epoch'] <= meta.get('epoch', 0)]
  reporting.write_history(workdir, history)
  reporting.plot_curves(workdir, history)
  if meta:
    logging.info('Resumed from step %d (epoch %d done) in %s', int(state.step), meta['epoch'], workdir)
  p_train = jax.pmap(functools.partial(steps.train_step, axis_name=AXIS), axis_name=AXIS,
                     in_axes=(None, 0), out_axes=None, donate_argnums=(0,))
  if ahead:
    p_train = _compile_ahead(p_train, state, ahead[first_epoch].element_spec())
  writer = tf.summary.create_file_writer(str(workdir / 'tensorboard')) if jax.process_index() == 0 else None
  return Run(config, data, workdir, manager, epoch_steps, p_train, writer, ahead), state, meta, history


def _batches_ahead(config: ml_collections.ConfigDict, data: input_pipeline.Data, epoch: int,
                   epoch_steps: int, offset: int = 0) -> input_pipeline.BatchesAhead:
  """`epoch`'s training batches (from step `offset` on), set going now."""
  return input_pipeline.BatchesAhead(lambda: input_pipeline.train_dataset(
      data.train, config, len(data.class_names), epoch, epoch_steps, offset))


def _compile_ahead(p_train: Any, state: steps.TrainState, spec: dict[str, tf.TensorSpec]) -> Any:
  """The pmapped step compiled now for batches of `spec`, while the first batch is on its way.

  (A pmapped function's ahead-of-time compile does not serve its later
  calls, so the compiled step replaces it.) Several processes compile at
  the first call: pmap's `lower` cannot take the host-local shapes there.
  """
  if jax.process_count() > 1 or not all(s.shape.is_fully_defined() for s in jax.tree.leaves(spec)):
    return p_train  # compiled at its first call
  started = time.perf_counter()
  batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s.shape), s.dtype.as_numpy_dtype), spec)
  compiled = p_train.lower(state, batch).compile()
  logging.info('Training step compiled in %.1f s.', time.perf_counter() - started)
  return compiled


@dataclasses.dataclass(frozen=True)
class ProgressWindow:
  """The steps since the last progress line: its images/s and the non-finite checks cover them."""
  after_step: int  # the global step the window starts after
  started: float  # time.perf_counter() at that step
  nonfinite_before: int  # the epoch's non-finite steps up to that step

  def images_per_sec(self, step: int, now: float, batch_size: int) -> float:
    return (step - self.after_step) * batch_size / (now - self.started)


@dataclasses.dataclass(frozen=True)
class TrainedEpoch:
  """The state after an epoch's steps, and the metrics summed over them."""
  state: steps.TrainState
  metrics: metrics_lib.Metrics  # the whole epoch's, the part done before a resume included
  steps_run: int  # by this run: fewer than the epoch's when it resumed mid-epoch
  started: float  # time.perf_counter() when this run began the epoch
  first_batch_seconds: float  # from `started` until the first batch was ready
  first_step_seconds: float  # the first step's call (its compile, in a run's first epoch)


def _train_epoch(run: Run, state: steps.TrainState, epoch: int, partial_metrics: dict[str, Any] | None,
                 history: list[dict[str, Any]], preempted: Callable[[int], bool]) -> TrainedEpoch:
  """Runs the steps of `epoch` not done yet: progress lines, non-finite checks, mid-epoch checkpoints.

  `partial_metrics` are the running sums a mid-epoch checkpoint saved, for
  the epoch it resumes. Every progress line and mid-epoch checkpoint first
  checks the steps for non-finite values. Raises Preempted once SIGTERM's
  step is saved.
  """
  config, epoch_steps = run.config, run.epoch_steps
  started = time.perf_counter()
  offset = int(state.step) - (epoch - 1) * epoch_steps  # > 0 after a mid-epoch save
  total = metrics_lib.from_json(partial_metrics) if offset else None
  window = ProgressWindow(int(state.step), started, int(total['nonfinite'][0]) if total else 0)
  ahead = run.ahead.pop(epoch, None)
  batches = ahead.batches() if ahead else input_pipeline.train_batches(
      run.data.train, config, len(run.data.class_names), epoch, epoch_steps, offset)
  # Exactly the epoch's batches: asking the stream for one more would
  # wait for tf.data to discover its end.
  first_batch_seconds = first_step_seconds = None
  for i, batch in zip(range(offset + 1, epoch_steps + 1), batches):
    if first_batch_seconds is None:
      first_batch_seconds = time.perf_counter() - started
    state, step_metrics = run.train_step(state, batch)
    if first_step_seconds is None:  # the call returns once dispatched: no wait for the device
      first_step_seconds = time.perf_counter() - started - first_batch_seconds
    total = metrics_lib.accumulate(total, step_metrics)
    step = (epoch - 1) * epoch_steps + i  # as state.step, without waiting for the device
    log = i % config.log_every_steps == 0 or i == epoch_steps
    stop = i < epoch_steps and preempted(step)
    save = stop or bool(i < epoch_steps and config.checkpoint_every_steps
                        and step % config.checkpoint_every_steps == 0)
    if log or save:
      nonfinite = _check_finite(run, total, step, window, epoch_end=i == epoch_steps)
    if log:
      now = time.perf_counter()
      logging.info('%s', progress_line(epoch, i, epoch_steps, config,
                                       window.images_per_sec(step, now, config.batch_size)))
      window = ProgressWindow(step, now, nonfinite)
    if save:
      _save(run, state, epoch=epoch - 1, partial_train_metrics=metrics_lib.to_json(total), history=history)
    if stop:
      raise Preempted(step)
  return TrainedEpoch(state, total, epoch_steps - offset, started, first_batch_seconds, first_step_seconds)


def _end_epoch(run: Run, epoch: int, trained: TrainedEpoch, history: list[dict[str, Any]]
               ) -> tuple[steps.TrainState, list[dict[str, Any]]]:
  """Validates the epoch and records it: its history row, the plateau rule, the checkpoint,
  history.jsonl, TensorBoard, the curves and a log line. Returns the state and the history."""
  state, config = trained.state, run.config
  train_seconds = time.perf_counter() - trained.started
  if epoch < config.num_epochs:  # the next epoch's pipeline warms up during validation
    run.ahead[epoch + 1] = _batches_ahead(config, run.data, epoch + 1, run.epoch_steps)
  val = clinical_report.gather_predictions(state, run.data.val, config.batch_size)
  row = epoch_row(epoch, state, trained.metrics, val, run.data.class_names)
  epoch_seconds = time.perf_counter() - trained.started
  # Training throughput; validation time is the difference of the two.
  row.update(epoch_seconds=epoch_seconds, train_seconds=train_seconds,
             images_per_sec=trained.steps_run * config.batch_size / train_seconds,
             first_batch_seconds=trained.first_batch_seconds, first_step_seconds=trained.first_step_seconds)
  if config.plateau.enabled:
    state = state.replace(opt_state=state.tx.end_epoch(state.opt_state, row['val_loss']))
  history = [*history, row]
  # One commit: the checkpoint holds the history up to and with this epoch.
  _save(run, state, epoch=epoch, val_loss=row['val_loss'], history=history)
  reporting.write_history(run.workdir, history)
  reporting.write_summaries(run.writer, row)
  reporting.plot_curves(run.workdir, history)
  logging.info('epoch %d: %s lr=%.2e (%.1f s, %.1f images/s)', epoch, _format(row, (
      'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_balanced_accuracy')),
               row['lr'], epoch_seconds, row['images_per_sec'])
  return state, history


def _save(run: Run, state: steps.TrainState, **meta: Any) -> None:
  """Writes a checkpoint: the one place that does.

  `meta` holds `val_loss` at an epoch's end, `partial_train_metrics` in the
  middle of one (`epoch` is then the last finished epoch). A non-finite
  validation loss means the parameters diverged: nothing is saved. (Mid-epoch,
  `_check_finite` has just passed the steps.)
  """
  if 'val_loss' in meta and not np.isfinite(meta['val_loss']):
    raise FloatingPointError(
        f'The validation loss after epoch {meta["epoch"]} is {meta["val_loss"]}: the parameters '
        f'diverged, so the epoch is not saved (last checkpoint: step {run.manager.latest_step()}). '
        'Lower config.learning_rate and rerun to resume.')
  checkpointing.save(run.manager, state, {'class_names': list(run.data.class_names),
                                          'stored_image_size': run.data.stored_image_size, **meta})


def epoch_row(epoch: int, state: steps.TrainState, train_metrics: metrics_lib.Metrics,
              val: clinical_report.Predictions, class_names: Sequence[str]) -> dict[str, Any]:
  """An epoch's history row, less its timings: step, learning rate, training and validation figures."""
  step = int(state.step)
  row = {'epoch': epoch, 'step': step, 'lr': state.tx.current_learning_rate(state.opt_state, step)}
  row.update(metrics_lib.summarize(train_metrics, 'train'))
  row.update(val.summary('val'))
  # Beyond accuracy: ROC AUC, macro F1, calibration.
  report = clinical_report.report(val.probs, val.labels, class_names)
  row.update({'val_macro_f1': report['macro_f1'], 'val_macro_roc_auc': report['macro_roc_auc'],
              'val_expected_calibration_error': report['expected_calibration_error'],
              'val_melanoma_roc_auc': (report['melanoma'] or {}).get('roc_auc')})
  return row


def progress_line(epoch: int, i: int, epoch_steps: int, config: ml_collections.ConfigDict,
                  images_per_sec: float) -> str:
  """'epoch E/N step i/S: R images/s, ETA hh:mm:ss', the ETA at that rate to the run's last step."""
  remaining = ((config.num_epochs - epoch) * epoch_steps + epoch_steps - i) * config.batch_size
  eta = time.strftime('%H:%M:%S', time.gmtime(remaining / images_per_sec))
  return (f'epoch {epoch}/{config.num_epochs} step {i}/{epoch_steps}: {images_per_sec:.1f} images/s, '
          f'ETA {eta}')


def _check_finite(run: Run, total: metrics_lib.Metrics, step: int, window: ProgressWindow,
                  epoch_end: bool = False) -> int:
  """Stops on a non-finite loss or gradient, naming the steps and the last good checkpoint.

  Skipping (config.skip_nonfinite_steps) stops too once skipping cannot
  help: when every step of `window` (to `step`) was non-finite and the epoch
  has had MAX_NONFINITE_TO_SKIP of them, or at the epoch's end when all its
  steps were. Returns the epoch's count of non-finite steps.
  """
  bad, steps_done = (int(x) for x in jax.device_get(total['nonfinite']))
  if not bad:
    return bad
  latest = run.manager.latest_step()
  saved = (f'nothing after the last good checkpoint was saved: step {latest} in {run.workdir / "checkpoints"}'
           if latest is not None else 'no checkpoint was saved yet, so a rerun starts from the beginning')
  if not run.config.skip_nonfinite_steps:
    raise FloatingPointError(
        f'Non-finite loss or gradient in {bad} step(s) between steps {window.after_step + 1} and '
        f'{step}; {saved}. Lower config.learning_rate and rerun to resume, or set '
        'config.skip_nonfinite_steps=True to skip such steps.')
  window_all_bad = bad - window.nonfinite_before == step - window.after_step
  if (window_all_bad and bad >= MAX_NONFINITE_TO_SKIP) or (epoch_end and bad == steps_done):
    raise FloatingPointError(
        f'Every step from {window.after_step + 1} to {step} had a non-finite loss or gradient ({bad} this '
        f'epoch), so skipping them cannot get past it; {saved}. Lower config.learning_rate and '
        'rerun to resume.')
  logging.warning('%d non-finite step(s) skipped so far this epoch (by step %d).', bad, step)
  return bad


def _format(summary: dict[str, Any], keys: tuple[str, ...]) -> str:
  return ' '.join(f'{k}={summary[k]:.4f}' for k in keys if summary.get(k) is not None)


def _init_from_pretrained(state: steps.TrainState, config: ml_collections.ConfigDict) -> steps.TrainState:
  """`state` with the backbone (and its BatchNorm statistics) of config.model.init_from.

  Only for a run that starts: a checkpoint to resume always wins.
  """
  path = config.model.init_from
  try:
    _, pretrained = models.load_pretrained(config.model.name, path)
    with_metadata = getattr(state.model, 'uses_metadata', False)
    fit = metadata_lib.fit_pretrained if with_metadata else models.fit_pretrained
    variables = fit(config.model.name, pretrained, jax.device_get(state.variables))
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f'config.model.init_from={path}: {e}') from None
  params = variables.pop('params')
  logging.info('Initialised %s from %s (head re-initialised for %d outputs).', config.model.name, path,
               state.num_outputs)
  return state.replace(params=params, model_state=variables, opt_state=steps.init_optimizer(state.tx, params))


def params_digest(params: Any) -> str:
  """A fingerprint of the parameters, to check that all hosts agree."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(params)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def _warn_without_validation_melanoma(data: input_pipeline.Data) -> None:
  if datasets.MELANOMA in data.class_names and not np.any(
      data.val.labels == data.class_names.index(datasets.MELANOMA)):
    logging.warning('Validation holds no melanoma: no melanoma alert threshold can be chosen, so no '
                    'operating_point.json will be written. Raise config.val_fraction or add melanoma images.')


def _final_evaluation(manager: Any, state: steps.TrainState, history: list[dict[str, Any]],
                      data: input_pipeline.Data, config: ml_collections.ConfigDict,
                      workdir: epath.Path) -> dict[str, Any]:
  """Test metrics of the checkpoint of lowest validation loss, written to the workdir."""
  state, meta = checkpointing.restore(manager, manager.best_step(), state)
  # From the checkpoint's own history, so a short history.jsonl cannot matter.
  rows = {row['epoch']: row for row in [*history, *meta.get('history', [])]}
  best = rows.get(meta['epoch'], {'epoch': meta['epoch'], 'val_loss': meta['val_loss']})
  result = {'best_epoch': best['epoch'], 'class_names': list(data.class_names)}
  result.update({k: v for k, v in best.items() if k.startswith('val_')})
  full = clinical_report.evaluate_checkpoint(state, data, 'test', config.target_sensitivity, config.batch_size, {
      'step': int(state.step), 'epoch': best['epoch'], 'selected_by': 'lowest validation loss'})
  result.update(full.predictions.summary('test'))
  detector = ood.fit(state, data, config.batch_size, full.report['checkpoint'])
  full.report['out_of_distribution'] = detector['summary']
  ood.write(workdir, detector)
  clinical_report.write_reports(workdir, full)
  clinical_report.write_operating_point(workdir, full.report['operating_point'])
  calibration.write(workdir, full.report['calibration'])
  test = full.report['splits']['test']
  result['test_macro_roc_auc'] = intervals.value(test['macro_roc_auc'])
  result.update({f'test_melanoma_{k}': intervals.value((test['melanoma'] or {}).get(k))
                 for k in ('threshold', 'roc_auc', 'sensitivity', 'specificity')})
  if jax.process_index() == 0:
    (workdir / 'test_metrics.json').write_text(json.dumps(result, indent=2))
  logging.info('Best epoch %d: %s', best['epoch'], _format(result, ('val_loss', 'val_accuracy', 'val_balanced_accuracy')))
  logging.info('Test: %s', _format(result, ('test_loss', 'test_accuracy', 'test_balanced_accuracy')))
  logging.info('%s. Report: %s', clinical_report.headline(full.report), workdir / clinical_report.REPORT_MD)
  return result
