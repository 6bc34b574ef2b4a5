"""The training loop's pieces alone: an epoch's steps with a scripted step in place of the
model (progress windows, non-finite checks, mid-epoch checkpoints, preemption), the end
of an epoch on a real state with given predictions, and the one preemption exit."""

import dataclasses
import json
import logging
import os
import signal
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sklearn import metrics as sk

from melanoma_jax import checkpointing, clinical_report, input_pipeline, train

BATCH = 8


@dataclasses.dataclass(frozen=True)
class FakeState:
  step: int
  params: Any = None


class ScriptedStep:
  """Stands for the pmapped step: step s has loss s, takes s seconds on `clock`, and is
  non-finite when s is in `bad`."""

  def __init__(self, bad=()):
    self.bad, self.clock, self.steps = set(bad), 0.0, []

  def __call__(self, state, batch):
    del batch
    step = state.step + 1
    self.clock += step
    self.steps.append(step)
    return FakeState(step), {'loss': (np.float32(step), np.float32(BATCH)),
                             'nonfinite': (np.float32(step in self.bad), np.float32(1))}


@pytest.fixture
def loop(monkeypatch, tmp_path):
  """make(epoch_steps, bad=..., latest=..., **config) -> (run, scripted step); `saved` and
  `streams` record the checkpoints written and the batch streams asked for."""
  saved, streams = [], []

  def train_batches(train_split, config, num_classes, epoch, num_steps, skip_steps=0):
    streams.append((epoch, num_steps, skip_steps))
    return iter(range(num_steps - skip_steps))

  monkeypatch.setattr(input_pipeline, 'train_batches', train_batches)
  monkeypatch.setattr(checkpointing, 'save', lambda manager, state, meta: saved.append((state.step, meta)))

  def make(epoch_steps, bad=(), latest=None, **config):
    step = ScriptedStep(bad)
    monkeypatch.setattr(time, 'perf_counter', lambda: step.clock)
    config = ml_collections.ConfigDict({'batch_size': BATCH, 'num_epochs': 2, 'log_every_steps': 5,
                                        'checkpoint_every_steps': 0, 'skip_nonfinite_steps': False,
                                        **config})
    data = types.SimpleNamespace(train='train split', class_names=('a', 'b'), stored_image_size=64)
    manager = types.SimpleNamespace(latest_step=lambda: latest)
    return train.Run(config, data, tmp_path, manager, epoch_steps, step, None), step

  return types.SimpleNamespace(make=make, saved=saved, streams=streams)


def _never(step):
  del step
  return False


def _progress_lines(caplog):
  return [r.getMessage() for r in caplog.records if ' images/s, ETA ' in r.getMessage()]


def test_resumed_epoch_runs_the_rest_and_measures_each_progress_window(loop, caplog):
  run, step = loop.make(12)
  partial = {'loss': [13.0 + 14 + 15, 3.0 * BATCH], 'nonfinite': [0.0, 3.0]}  # steps 13-15 of epoch 2
  caplog.set_level(logging.INFO)
  trained = train._train_epoch(run, FakeState(15), 2, partial, [], _never)
  assert loop.streams == [(2, 12, 3)] and step.steps == list(range(16, 25))
  assert trained.state.step == 24 and trained.steps_run == 9
  assert float(trained.metrics['loss'][0]) == sum(range(13, 25))
  expected = []
  for start, end in ((15, 17), (17, 22), (22, 24)):  # progress every 5 steps of the epoch, and at its end
    rate = (end - start) * BATCH / sum(range(start + 1, end + 1))  # step s takes s seconds
    i = end - 12
    eta = time.strftime('%H:%M:%S', time.gmtime((12 - i) * BATCH / rate))  # the last epoch
    expected.append(f'epoch 2/2 step {i}/12: {rate:.1f} images/s, ETA {eta}')
  assert _progress_lines(caplog) == expected


def test_eta_counts_the_epochs_still_to_run():
  config = ml_collections.ConfigDict({'num_epochs': 5, 'batch_size': 32})
  # 3 epochs of 100 steps after this one, 60 steps left in it: 360 steps of 32 images at 16/s.
  assert train.progress_line(2, 40, 100, config, 16.0).endswith(
      f'ETA {time.strftime("%H:%M:%S", time.gmtime(360 * 32 / 16))}')


def test_checkpoints_every_n_steps_but_not_at_the_epoch_end(loop):
  run, _ = loop.make(10, checkpoint_every_steps=4)
  state = FakeState(0)
  for epoch in (1, 2):
    state = train._train_epoch(run, state, epoch, None, [{'epoch': 0}], _never).state
  assert [s for s, _ in loop.saved] == [4, 8, 12, 16]  # 20 is the epoch end's to save
  for step, meta in loop.saved:
    first = 10 * ((step - 1) // 10) + 1
    assert meta['epoch'] == (step - 1) // 10 and meta['history'] == [{'epoch': 0}]
    assert meta['partial_train_metrics']['loss'] == [sum(range(first, step + 1)), (step - first + 1) * BATCH]
    assert meta['class_names'] == ['a', 'b'] and meta['stored_image_size'] == 64


def test_sigterm_saves_at_the_next_step_and_stops(loop):
  run, step = loop.make(10)
  asked = []
  preempted = lambda s: asked.append(s) or s >= 7
  with pytest.raises(train.Preempted) as stop:
    train._train_epoch(run, FakeState(0), 1, None, [], preempted)
  assert stop.value.step == 7 and step.steps == list(range(1, 8)) and asked == list(range(1, 8))
  assert [(s, meta['epoch'], meta['partial_train_metrics']['loss'][0]) for s, meta in loop.saved] == [(7, 0, 28)]
  # The epoch's last step is never asked: its end saves it, then the loop asks.
  asked.clear()
  train._train_epoch(run, FakeState(10), 2, None, [], lambda s: asked.append(s) or False)
  assert asked == list(range(11, 20))


@pytest.mark.parametrize('latest, saved', [(None, 'no checkpoint was saved yet'),
                                           (5, 'nothing after the last good checkpoint was saved: step 5 in ')])
def test_nonfinite_step_stops_at_the_next_progress_line_naming_its_window(loop, latest, saved):
  run, step = loop.make(20, bad={7}, latest=latest)
  with pytest.raises(FloatingPointError, match=rf'in 1 step\(s\) between steps 6 and 10; {saved}'):
    train._train_epoch(run, FakeState(0), 1, None, [], _never)
  assert step.steps[-1] == 10 and not loop.saved


def test_skipping_goes_on_until_a_whole_window_is_nonfinite(loop):
  # Scattered non-finite steps (30 of 60) never fill a window, checkpoints at progress lines included.
  run, _ = loop.make(60, bad=range(2, 61, 2), skip_nonfinite_steps=True, checkpoint_every_steps=5)
  assert train._train_epoch(run, FakeState(0), 1, None, [], _never).state.step == 60
  assert [s for s, _ in loop.saved] == list(range(5, 60, 5))
  # From step 26 on every step is non-finite: the first full window once 20 are counted ends at 45.
  run, step = loop.make(60, bad=range(26, 61), skip_nonfinite_steps=True)
  with pytest.raises(FloatingPointError, match=r'Every step from 41 to 45 .*\(20 this epoch\)'):
    train._train_epoch(run, FakeState(0), 1, None, [], _never)
  # An epoch whose every step was non-finite stops at its end, however short.
  run, step = loop.make(8, bad=range(1, 9), skip_nonfinite_steps=True)
  with pytest.raises(FloatingPointError, match=r'Every step from 6 to 8 .*\(8 this epoch\)'):
    train._train_epoch(run, FakeState(0), 1, None, [], _never)


# --- The end of an epoch, on a real (tiny) state --------------------------------------------

CLASSES = ('melanoma', 'nevus', 'keratosis')
EPOCH_STEPS = 10


@pytest.fixture(scope='module')
def epoch_state(tiny_config):
  """A fresh state of the tiny model with 3 outputs, replicated as the loop holds it, at step 20."""
  state = train.build_state(tiny_config, len(CLASSES), EPOCH_STEPS)
  state = state.replace(step=jnp.asarray(2 * EPOCH_STEPS, state.step.dtype))
  return jax.device_put(state, NamedSharding(Mesh(np.array(jax.local_devices()), ('batch',)), P()))


def _predictions(n=60, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, len(CLASSES)))
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  labels = np.arange(n) % len(CLASSES)
  return clinical_report.Predictions(probs.astype(np.float32), labels.astype(np.int32),
                                -np.log(probs[np.arange(n), labels]).astype(np.float32))


def _end_epoch(tiny_config, tmp_path, monkeypatch, state, val):
  monkeypatch.setattr(clinical_report, 'gather_predictions', lambda *args: val)
  data = types.SimpleNamespace(val='val split', class_names=CLASSES, stored_image_size=48)
  run = train.Run(tiny_config, data, tmp_path, checkpointing.manager(tmp_path),
                  EPOCH_STEPS, None, tf.summary.create_file_writer(str(tmp_path / 'tensorboard')))
  train_metrics = {'loss': (np.float32(12.5), np.float32(50)), 'accuracy': (np.float32(30), np.float32(50)),
                   'confusion': (np.array([[10, 5, 0], [5, 10, 0], [0, 10, 10]], np.float32), np.float32(50)),
                   'nonfinite': (np.float32(0), np.float32(EPOCH_STEPS))}
  trained = train.TrainedEpoch(state, train_metrics, 7, time.perf_counter())
  return run, train._end_epoch(run, 2, trained, [])


def test_end_of_epoch_row_checkpoint_and_files(tiny_config, epoch_state, tmp_path, monkeypatch):
  val = _predictions()
  run, (_, history) = _end_epoch(tiny_config, tmp_path, monkeypatch, epoch_state, val)
  [row] = history
  predicted = np.argmax(val.probs, axis=1)
  assert row['epoch'] == 2 and row['step'] == 20 and row['lr'] == pytest.approx(tiny_config.learning_rate)
  assert row['train_loss'] == 0.25 and row['train_accuracy'] == 0.6
  assert row['train_balanced_accuracy'] == pytest.approx(np.mean([10 / 15, 10 / 15, 10 / 20]))
  assert row['val_loss'] == pytest.approx(np.mean(val.losses), rel=1e-6)
  assert row['val_accuracy'] == pytest.approx(sk.accuracy_score(val.labels, predicted))
  assert row['val_balanced_accuracy'] == pytest.approx(sk.balanced_accuracy_score(val.labels, predicted))
  assert row['val_macro_f1'] == pytest.approx(sk.f1_score(val.labels, predicted, average='macro'))
  assert row['val_macro_roc_auc'] == pytest.approx(
      sk.roc_auc_score(val.labels, val.probs, multi_class='ovr', average='macro'))
  assert row['val_melanoma_roc_auc'] == pytest.approx(sk.roc_auc_score(val.labels == 0, val.probs[:, 0]))
  assert row['images_per_sec'] == pytest.approx(7 * tiny_config.batch_size / row['train_seconds'])
  assert 0 < row['train_seconds'] <= row['epoch_seconds']
  # One commit: the checkpoint at the epoch's step holds the history with this row.
  assert list(run.manager.all_steps()) == [20]
  meta = checkpointing.read_meta(run.manager, 20)
  assert meta == json.loads(json.dumps({'class_names': list(CLASSES), 'stored_image_size': 48, 'epoch': 2,
                                        'val_loss': row['val_loss'], 'history': [row]}))
  lines = (tmp_path / 'history.jsonl').read_text().splitlines()
  assert [json.loads(line) for line in lines] == json.loads(json.dumps(history))
  assert (tmp_path / 'curves.png').exists() and list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  run.manager.close()


def test_diverged_epoch_is_not_saved(tiny_config, epoch_state, tmp_path, monkeypatch):
  val = dataclasses.replace(_predictions(), losses=np.full(60, np.nan, np.float32))
  with pytest.raises(FloatingPointError, match='validation loss after epoch 2 is nan: .* not saved '
                     r'\(last checkpoint: step None\)'):
    _end_epoch(tiny_config, tmp_path, monkeypatch, epoch_state, val)
  assert not (tmp_path / 'history.jsonl').exists()
  assert not [p for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]


# --- The one preemption exit ----------------------------------------------------------------


@pytest.mark.parametrize('sigterm_in', ['epoch 2 steps', 'epoch 2 end', None])
def test_preemption_leaves_through_one_exit(monkeypatch, tmp_path, caplog, sigterm_in):
  """SIGTERM in an epoch's steps or at its end stops the run after that save, without the
  final evaluation; either way the manager is closed once and the call returns None."""
  closed, ran, final = [], [], []
  manager = types.SimpleNamespace(close=lambda: closed.append(True))
  run = types.SimpleNamespace(manager=manager, epoch_steps=EPOCH_STEPS)
  config = ml_collections.ConfigDict({'num_epochs': 3})
  monkeypatch.setattr(checkpointing, 'check_workdir', lambda *args: None)
  monkeypatch.setattr(input_pipeline, 'load_data', lambda config: 'data')
  monkeypatch.setattr(train, '_start', lambda *args: (run, FakeState(0), {}, []))

  def train_epoch(run, state, epoch, partial, history, preempted):
    ran.append(f'epoch {epoch} steps')
    if sigterm_in == f'epoch {epoch} steps':
      raise train.Preempted(state.step + 3)
    return train.TrainedEpoch(FakeState(state.step + EPOCH_STEPS), {}, EPOCH_STEPS, 0.0)

  def end_epoch(run, epoch, trained, history):
    ran.append(f'epoch {epoch} end')
    if sigterm_in == f'epoch {epoch} end':
      os.kill(os.getpid(), signal.SIGTERM)
    return trained.state, history

  monkeypatch.setattr(train, '_train_epoch', train_epoch)
  monkeypatch.setattr(train, '_end_epoch', end_epoch)
  monkeypatch.setattr(train, '_final_evaluation', lambda *args: final.append(True) or {'done': True})
  caplog.set_level(logging.INFO)
  result = train._train_and_evaluate(config, tmp_path, False)
  assert closed == [True]
  if sigterm_in is None:
    assert result == {'done': True} and final and len(ran) == 6
    return
  assert result is None and not final
  assert ran[-1] == sigterm_in and len(ran) == (3 if sigterm_in.endswith('steps') else 4)
  saved = 13 if sigterm_in.endswith('steps') else 20
  assert f'Preempted: saved step {saved}; rerun the same command to resume.' in caplog.text
