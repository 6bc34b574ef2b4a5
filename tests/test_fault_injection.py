"""Fault injection: each way a user lost work (issue 16), reproduced and shown fixed.

Kills are injected in-process at the phase boundaries of an epoch end (an
exception raised where SIGKILL would stop the process: nothing after it
runs, and nothing of ours writes on the way out), signals are real, and a
second run is a real process holding the workdir.
"""

import csv
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from melanoma_jax import (checkpointing, cli, clinical_report, errors, inference, input_pipeline, reporting,
                          train, workdir_lock)
from melanoma_jax.datasets import groups_csv
from melanoma_jax.datasets import preparation
from test_train import _config as _with, _final_params


def _config(base, **overrides):
  """One epoch unless told otherwise: every kill below hits the last epoch's end."""
  return _with(base, **{'num_epochs': 1, **overrides})


class Killed(BaseException):
  """Stands for SIGKILL: not an Exception, so no handler of ours catches it."""


@pytest.fixture(scope='module')
def reference(one_epoch_run):
  """An uninterrupted run (one epoch, as `_config`): what every interrupted run must end as."""
  return one_epoch_run


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path / 'run')
  return tmp_path / 'run'


def _assert_same_run(workdir, reference_dir, result, reference_result):
  history, expected = reporting.read_history(workdir), reporting.read_history(reference_dir)
  assert [row['epoch'] for row in history] == [row['epoch'] for row in expected]
  for key in ('step', 'lr', 'train_loss', 'val_loss'):
    assert [row[key] for row in history] == [row[key] for row in expected]
  assert result['test_accuracy'] == reference_result['test_accuracy']
  assert json.loads((workdir / 'test_metrics.json').read_text())['best_epoch'] == reference_result['best_epoch']
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), _final_params(workdir),
                       _final_params(reference_dir))
  assert max(jax.tree.leaves(diffs)) == 0


def _truncate_arrays(checkpoint):
  """Cuts the array data of a checkpoint short; its metadata stays readable."""
  for f in (checkpoint / 'state').rglob('d/*'):
    f.write_bytes(f.read_bytes()[:100])


# --- 1. A checkpoint that does not fit is refused, never moved aside or retrained ----------


def test_rerun_with_skip_nonfinite_steps_resumes_the_same_run(reference, tiny_config, tmp_path):
  ref_dir, ref_result = reference
  workdir = _copy(ref_dir, tmp_path)
  result = train.train_and_evaluate(_config(tiny_config, skip_nonfinite_steps=True), str(workdir))
  assert not (workdir / 'corrupt_checkpoints').exists()
  _assert_same_run(workdir, ref_dir, result, ref_result)


def test_other_optimizer_is_refused_naming_what_differs(reference, tiny_config, tmp_path):
  workdir = _copy(reference[0], tmp_path)
  saved = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  sgd = _config(tiny_config, optimizer='sgd')
  with pytest.raises(errors.ConfigError, match=r"optimizer: 'adam' -> 'sgd'.*--start_over"):
    train.train_and_evaluate(sgd, str(workdir))
  # A config.json that no longer tells (edited, or written by older code): the
  # checkpoint's own layout is the backstop.
  config_file = workdir / checkpointing.CONFIG_FILE
  config_file.write_text(config_file.read_text().replace('"adam"', '"sgd"'))
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r'arrays only in the checkpoint \(e\.g\. opt_state/0/0/count\).*--start_over'):
    train.train_and_evaluate(sgd, str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == saved
  assert not (workdir / 'corrupt_checkpoints').exists()


# Orbax's own read of the truncated arrays leaves an unawaited coroutine behind.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_checkpoints_are_moved_aside_under_fresh_names(reference, tiny_config, tmp_path):
  ref_dir, ref_result = reference
  workdir = _copy(ref_dir, tmp_path)
  latest = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  (workdir / 'corrupt_checkpoints' / str(latest)).mkdir(parents=True)  # from an earlier accident
  _truncate_arrays(workdir / 'checkpoints' / str(latest))
  result = train.train_and_evaluate(_config(tiny_config), str(workdir))
  assert (workdir / 'corrupt_checkpoints' / f'{latest}-2' / 'state').is_dir()
  _assert_same_run(workdir, ref_dir, result, ref_result)


# --- 2. A kill at any phase boundary of an epoch end loses nothing -------------------------


def _kill_when(monkeypatch, module, name, condition):
  original = getattr(module, name)

  def wrapper(*args, **kwargs):
    if condition(*args, **kwargs):
      raise Killed(name)
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize('module, name, condition', [
    # after the last epoch's checkpoint, before its history row is written
    (reporting, 'write_history', lambda workdir, history: history and history[-1]['epoch'] == 1),
    # after the history row, before TensorBoard and the curves
    (reporting, 'write_summaries', lambda writer, row: row['epoch'] == 1),
    # in the final evaluation, before the reports
    (clinical_report, 'write_reports', lambda *args: True),
], ids=['before_history', 'before_summaries', 'in_final_evaluation'])
def test_kill_at_an_epoch_end_resumes_to_the_uninterrupted_run(reference, tiny_config, tmp_path,
                                                                monkeypatch, module, name, condition):
  ref_dir, ref_result = reference
  with monkeypatch.context() as patch:
    _kill_when(patch, module, name, condition)
    with pytest.raises(Killed):
      train.train_and_evaluate(_config(tiny_config), str(tmp_path))
  result = train.train_and_evaluate(_config(tiny_config), str(tmp_path))
  _assert_same_run(tmp_path, ref_dir, result, ref_result)


# --- 3. One run per workdir -----------------------------------------------------------------

_HOLD = ('import sys, time\n'
         'from melanoma_jax import workdir_lock\n'
         'with workdir_lock.hold(sys.argv[1]):\n'
         '  print("locked", flush=True)\n'
         '  sys.stdin.read() if sys.argv[2] == "wait" else __import__("os").kill(__import__("os").getpid(), 9)\n')


def _holder(workdir, mode):
  proc = subprocess.Popen([sys.executable, '-c', _HOLD, str(workdir), mode], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=os.environ.copy())
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_second_run_on_a_busy_workdir_is_refused_at_once(tiny_config, tmp_path):
  holder = _holder(tmp_path, 'wait')
  try:
    start = time.perf_counter()
    with pytest.raises(errors.WorkdirBusyError, match=rf'in use by another run: PID {holder.pid} on host '):
      train.train_and_evaluate(_config(tiny_config), str(tmp_path))
    assert time.perf_counter() - start < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lock.LOCK_FILE]
  finally:
    holder.communicate('')


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  dead = _holder(tmp_path, 'kill')
  assert dead.wait() == -signal.SIGKILL
  assert str(dead.pid) in (tmp_path / workdir_lock.LOCK_FILE).read_text()
  with workdir_lock.hold(tmp_path):
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['pid'] == os.getpid()
    with pytest.raises(errors.WorkdirBusyError, match=f'PID {os.getpid()}'):
      with workdir_lock.hold(tmp_path):  # a second open file: flock refuses it, even in-process
        pass


# --- 4 and 8. Unicode file names; groups by relative path -----------------------------------

UNICODE_NAME = 'ünïcødé_病变.png'


def _tree(root, names):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)


def test_unicode_names_and_groups_by_relative_path(tiny_config, tmp_path):
  names = [f'{split}/{cls}/img{i:03d}.png' for split, n in (('Train', 6), ('Test', 1))
           for cls in ('melanoma', 'nevus') for i in range(n)]
  _tree(tmp_path / 'tree', [*names, f'Train/nevus/{UNICODE_NAME}'])
  os.mkfifo(tmp_path / 'tree' / 'Train' / 'nevus' / 'x.jpg')  # would block a reader forever
  (tmp_path / 'groups.csv').write_text(
      'image,lesion_id\n' + ''.join(f'{cls}/img{i:03d}.png,{cls}{i // 2}\n'
                                    for cls in ('melanoma', 'nevus') for i in range(6))
      + f'{UNICODE_NAME},nevus0\n', encoding='utf-8')
  config = _config(tiny_config, dataset='image_folder', manual_dir=str(tmp_path / 'tree'),
                   data_dir=str(tmp_path / 'tfds'), groups_csv=str(tmp_path / 'groups.csv'))
  data = input_pipeline.load_data(config)
  train_val = {name: group for split in (data.train, data.val)
               for name, group in zip(split.file_names, split.group_ids)}
  assert train_val[f'Train/nevus/{UNICODE_NAME}'] == 'nevus0'
  assert train_val['Train/nevus/img000.png'] == 'nevus0'
  assert train_val['Train/melanoma/img000.png'] == 'melanoma0'  # not nevus' img000
  assert not set(data.train.group_ids) & set(data.val.group_ids)
  report = json.loads((input_pipeline.prepared_builder(config).data_path
                       / preparation.REPORT_FILE_NAME).read_text())
  assert {'file_name': 'Train/nevus/x.jpg', 'reason': 'not a regular file (FIFO, socket or device)'} \
      in report['skipped']
  # Prepared data needs no tree (evaluate after the tree moved).
  shutil.move(tmp_path / 'tree', tmp_path / 'moved')
  assert input_pipeline.load_data(config).class_names == ('melanoma', 'nevus')


def test_ambiguous_or_undecodable_groups_csv_is_a_clear_error(tmp_path):
  files = ['Train/melanoma/img000.png', 'Train/nevus/img000.png']
  (tmp_path / 'bare.csv').write_text('image,lesion_id\nimg000,L1\n')
  with pytest.raises(errors.DatasetLayoutError,
                     match=r"'img000' names 2 images \(Train/melanoma/img000.png, Train/nevus/img000.png\)"):
    groups_csv.match_groups(files, groups_csv.read_groups_csv(tmp_path / 'bare.csv'))
  (tmp_path / 'latin1.csv').write_bytes('image,lesion_id\nnævus,L1\n'.encode('latin-1'))
  with pytest.raises(errors.DatasetLayoutError, match=r'not UTF-8 text \(byte 0xe6'):
    groups_csv.read_groups_csv(tmp_path / 'latin1.csv')


# --- 5. Inference arguments and its CSV -----------------------------------------------------


@pytest.mark.parametrize('argument', ['--threshold=2', '--threshold=nan', '--threshold=-1',
                                      '--batch_size=0'])
def test_inference_refuses_out_of_range_arguments(tmp_path, argument):
  with pytest.raises(SystemExit, match=f'^Error: flag {argument.split("=")[0]}=') as exit_info:
    inference.main(['--workdir', str(tmp_path), '--output', str(tmp_path / 'p.csv'), argument, 'x.png'])
  assert '\n' not in str(exit_info.value.code)  # One line; Python prints it and exits 1.


def test_inference_csv_cells_cannot_be_formulas(tmp_path):
  row = inference.prediction_row(tmp_path / '=HYPERLINK("http://x").png', None, 'not an image', ['a'], None)
  row['file'] = '=HYPERLINK("http://x").png'
  inference.write_csv(tmp_path / 'p.csv', [row], ['a'])
  with open(tmp_path / 'p.csv', newline='') as f:
    assert next(csv.DictReader(f))['file'] == '\'=HYPERLINK("http://x").png'


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_checkpoint_for_inference_names_it_and_the_alternatives(reference, tmp_path):
  workdir = _copy(reference[0], tmp_path)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  _truncate_arrays(workdir / 'checkpoints' / str(steps[-1]))
  with pytest.raises(SystemExit, match=rf'Checkpoint {steps[-1]} .* cannot be read .*kept steps: '
                     rf'{re.escape(str(steps))}; choose one with --step'):
    cli.restore(str(workdir), steps[-1])


# --- 6. Validation before anything is written ------------------------------------------------


@pytest.mark.parametrize('field, value, message', [
    ('learning_rate', -1.0, r'learning_rate=-1.0 must be in \(0, inf\)'),
    ('image_size', 10000, r'image_size=10000 .* needs an estimated [\d.]+ GiB'),
    ('log_every_steps', 0, r'log_every_steps=0 must be in \[1, inf\)'),
    ('seed', -1, r'seed=-1 must be in \[0, '),
    ('checkpoints_to_keep', 0, r'checkpoints_to_keep=0 must be in \[1, inf\)'),
    ('model.dropout_rate', 1.5, r'dropout_rate=1.5 must be in \[0, 1\)'),
])
def test_invalid_config_is_refused_before_anything_is_written(tiny_config, tmp_path, field, value, message):
  config = _config(tiny_config)
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_failed_start_leaves_no_config_to_refuse_the_corrected_command(tiny_config, tmp_path):
  bad = _config(tiny_config, groups_csv=str(tmp_path / 'missing.csv'))
  with pytest.raises(errors.DatasetLayoutError, match='not found'):
    train.train_and_evaluate(bad, str(tmp_path))
  assert not (tmp_path / checkpointing.CONFIG_FILE).exists()
  # An old config.json with no checkpoint behind it holds nothing to protect.
  (tmp_path / checkpointing.CONFIG_FILE).write_text(_config(tiny_config, image_size=64).to_json())
  checkpointing.check_workdir(tmp_path, _config(tiny_config), start_over=False)


# --- 7. Errors a user can act on --------------------------------------------------------------


def test_nan_before_any_checkpoint_says_so(tiny_config, tmp_path):
  with pytest.raises(FloatingPointError, match='no checkpoint was saved yet'):
    train.train_and_evaluate(_config(tiny_config, learning_rate=1e30), str(tmp_path))


def test_skipping_nonfinite_steps_stops_when_every_step_is_nonfinite(tiny_config, tmp_path):
  with pytest.raises(FloatingPointError, match='skipping them cannot get past it'):
    train.train_and_evaluate(_config(tiny_config, learning_rate=1e30, skip_nonfinite_steps=True),
                             str(tmp_path))


def test_full_disk_is_one_line_and_loses_nothing(reference, tiny_config, tmp_path, monkeypatch):
  workdir = _copy(reference[0], tmp_path)
  saved = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
  with pytest.raises(errors.DiskFullError, match=r'Not enough space .* to save step .*rerun the same command'):
    train.train_and_evaluate(_config(tiny_config, num_epochs=2, checkpoint_every_steps=1), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == saved
  wrapped = ValueError('TensorStore write failed')
  wrapped.__cause__ = OSError(28, 'No space left on device', '/w/history.jsonl')
  assert errors.user_message(wrapped).startswith('No space left on device writing /w/history.jsonl')
  assert errors.user_message(ValueError('a bug')) is None


@pytest.mark.parametrize('phase', ['data_loading', 'final_evaluation'])
def test_sigterm_outside_the_training_steps_exits_cleanly(reference, tiny_config, tmp_path,
                                                          monkeypatch, phase):
  ref_dir, ref_result = reference
  workdir = _copy(ref_dir, tmp_path) if phase == 'final_evaluation' else tmp_path / 'run'
  module, name = ((input_pipeline, 'load_data') if phase == 'data_loading'
                  else (clinical_report, 'evaluate_checkpoint'))
  original = getattr(module, name)

  def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(module, name, signalled)
    assert train.train_and_evaluate(_config(tiny_config), str(workdir)) is None
  if phase == 'data_loading':
    assert not (workdir / checkpointing.CONFIG_FILE).exists()
  else:
    (workdir / 'test_metrics.json').unlink()
    result = train.train_and_evaluate(_config(tiny_config), str(workdir))
    _assert_same_run(workdir, ref_dir, result, ref_result)


def test_launcher_prints_one_line_for_a_user_error(tmp_path):
  holder = _holder(tmp_path, 'wait')
  try:
    proc = subprocess.run([sys.executable, 'launch.py', '--config=configs/balanced.py:synthetic',
                           f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy(), check=False)
  finally:
    holder.communicate('')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f'Error: {tmp_path} is in use by another run: '
                                                          f'PID {holder.pid}')
  assert 'Traceback' not in proc.stderr
