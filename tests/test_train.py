"""End to end on the tiny synthetic set: outputs, resume, and failures that lose nothing."""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import melanoma_jax
from melanoma_jax import reporting, steps, train

HISTORY_KEYS = {'epoch', 'step', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                'val_balanced_accuracy', 'lr', 'epoch_seconds', 'images_per_sec'}


def _config(base, **overrides):
  config = base.copy_and_resolve_references()
  for key, value in overrides.items():
    config[key] = value
  return config


def _final_params(workdir):
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state', 'meta'))
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))
  manager.close()
  return restored.state['params']


def test_run_leaves_history_curves_tensorboard_checkpoints_and_test_metrics(finished_run):
  workdir, result = finished_run
  history = reporting.read_history(workdir)
  assert [row['epoch'] for row in history] == [1, 2, 3]
  assert all(HISTORY_KEYS <= row.keys() for row in history)
  assert history[-1]['step'] == 3 * history[0]['step']
  assert (workdir / 'curves.png').stat().st_size > 10_000
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert json.loads((workdir / 'test_metrics.json').read_text())['test_accuracy'] == result['test_accuracy']
  assert 0 <= result['test_balanced_accuracy'] <= 1
  assert result['best_epoch'] == min(history, key=lambda row: row['val_loss'])['epoch']


def test_resumed_run_equals_uninterrupted_run(finished_run, tiny_config, tmp_path):
  uninterrupted, _ = finished_run
  train.train_and_evaluate(_config(tiny_config, num_epochs=2), str(tmp_path))
  train.train_and_evaluate(_config(tiny_config, num_epochs=3), str(tmp_path))  # resumes at epoch 3
  history = reporting.read_history(tmp_path)
  assert [row['epoch'] for row in history] == [1, 2, 3]
  expected = reporting.read_history(uninterrupted)
  for key in ('step', 'lr', 'train_loss', 'val_loss'):
    np.testing.assert_allclose([r[key] for r in history], [r[key] for r in expected], rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), _final_params(tmp_path),
                       _final_params(uninterrupted))
  assert max(jax.tree.leaves(diffs)) < 1e-5


def test_rerunning_a_finished_run_repeats_no_epoch_and_initialises_nothing(finished_run, tiny_config, monkeypatch):
  workdir, result = finished_run
  initialised = []  # whether each init computed values (rather than only traced shapes)
  init = steps.init_variables
  monkeypatch.setattr(steps, 'init_variables', lambda model, rng, *args: initialised.append(
      not isinstance(rng, jax.core.Tracer)) or init(model, rng, *args))
  again = train.train_and_evaluate(_config(tiny_config, num_epochs=3), str(workdir))
  assert initialised and not any(initialised)
  assert [row['epoch'] for row in reporting.read_history(workdir)] == [1, 2, 3]
  assert again['test_accuracy'] == result['test_accuracy']


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_config, tmp_path):
  train.train_and_evaluate(_config(tiny_config, num_epochs=1), str(tmp_path))
  saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  with pytest.raises(FloatingPointError, match=r'Non-finite .* between steps 24 and .*checkpoint was saved: step 23'):
    train.train_and_evaluate(_config(tiny_config, num_epochs=2, learning_rate=1e30), str(tmp_path))
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == saved
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1]


def test_mismatched_head_fails_before_training(tiny_config, tmp_path):
  config = _config(tiny_config)
  config.model.num_outputs = 1
  with pytest.raises(train.ConfigError, match='cannot match 9 classes'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_not_divisible_by_devices_is_refused(tiny_config, tmp_path):
  with pytest.raises(train.ConfigError, match='multiple of the 4 devices'):
    train.train_and_evaluate(_config(tiny_config, batch_size=6), str(tmp_path))


@pytest.mark.parametrize('field, value, message', [('conv_impl', 'winograd', 'choose auto or one of'),
                                                   ('dtype', 'float16', 'parameters always stay float32')])
def test_unknown_model_lowering_or_dtype_is_refused(tiny_config, tmp_path, field, value, message):
  config = _config(tiny_config)
  config.model[field] = value
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_config_selects_lowering_and_mixed_precision(tiny_config):
  config = _config(tiny_config)
  config.model.conv_impl, config.model.dtype = 'native', 'bfloat16'
  state = train.build_state(config, 9)
  batch = np.zeros((2, config.image_size, config.image_size, 3), np.uint8)
  hlo = jax.jit(lambda s, x: s.model.apply(s.variables, x,
                                          train=False)).lower(state, batch).as_text()
  assert 'bf16' in hlo and 'convolution' in hlo
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}


def test_launcher_refuses_unknown_config_keys(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/balanced.py:synthetic',
       '--config.learning_rat=0.1', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert 'learning_rat' in proc.stderr
  assert not list(tmp_path.iterdir())


def test_best_checkpoint_restores_for_inference(finished_run):
  workdir, result = finished_run
  state, config, meta = train.restore_for_inference(str(workdir))
  assert meta['epoch'] == result['best_epoch']
  assert tuple(meta['class_names']) == tuple(result['class_names'])
  assert config.image_size == 32
  probs = jax.jit(melanoma_jax.predict)(state, np.zeros((2, 32, 32, 3), np.uint8))
  np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-5)


def test_inference_on_a_workdir_without_a_run_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not hold a training run'):
    train.restore_for_inference(str(tmp_path))
