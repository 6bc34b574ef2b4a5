"""Streamed images (read from the prepared files by index) give what images held in memory give."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from melanoma_jax import errors, input_pipeline
from test_resilience import TIMEOUT, _assert_same_final_params, _launch, _run_until
from test_train import _config


@pytest.fixture(scope='module')
def both(tiny_config):
  """(in memory, streamed) data of the tiny dataset."""
  return (input_pipeline.load_data(_config(tiny_config, streaming=False)),
          input_pipeline.load_data(_config(tiny_config, streaming=True)))


def test_streamed_splits_hold_the_same_examples_without_their_pixels(both):
  held, streamed = both
  for split in ('train', 'val', 'test'):
    a, b = getattr(held, split), getattr(streamed, split)
    assert isinstance(a.images, np.ndarray) and not isinstance(b.images, np.ndarray)
    np.testing.assert_array_equal(a.file_names, b.file_names)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.images, np.asarray(b.images))  # decoded on demand
  np.testing.assert_array_equal(held.train.images[7], streamed.train.images[7])


def test_streamed_batches_equal_in_memory_batches(both, tiny_config):
  held, streamed = both
  config = _config(tiny_config, streaming=True)
  for epoch, skip in ((1, 0), (2, 3)):  # augmented, resumed mid-epoch
    pairs = zip(input_pipeline.train_batches(held.train, config, 9, epoch, 8, skip),
                input_pipeline.train_batches(streamed.train, config, 9, epoch, 8, skip), strict=True)
    for a, b in pairs:
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(input_pipeline.eval_batches(held.test, 16), input_pipeline.eval_batches(streamed.test, 16),
                  strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_auto_streams_only_datasets_too_large_for_memory(tiny_config, monkeypatch):
  config = _config(tiny_config)
  assert config.streaming is None
  assert not input_pipeline.streaming(config, 1000)
  monkeypatch.setattr(input_pipeline, 'STREAM_ABOVE_BYTES', 999 * 32 * 32 * 3)
  assert input_pipeline.streaming(config, 1000)


def test_damaged_shard_is_a_clear_error(both, tiny_config, tmp_path):  # pylint: disable=unused-argument
  data_dir = tmp_path / 'tfds'
  shutil.copytree(tiny_config.data_dir, data_dir)  # prepared by `both`
  shard = next(data_dir.rglob('*-train.tfrecord-*'))
  shard.write_bytes(shard.read_bytes()[:-5000])
  with pytest.raises(errors.DataError, match='rerun with --mode=prepare'):
    input_pipeline.load_data(_config(tiny_config, streaming=True, data_dir=str(data_dir)))


def test_streamed_run_killed_and_resumed_equals_the_in_memory_run(finished_run, tiny_config, tmp_path):
  reference, _ = finished_run  # in memory, uninterrupted
  extra = ('--config.num_epochs=3', '--config.checkpoint_every_steps=4', '--config.streaming=True')
  proc = _launch(tiny_config, tmp_path, *extra)
  _run_until(proc, 'epoch 2/3 step 15/23')
  proc.send_signal(signal.SIGKILL)
  proc.stderr.read()
  assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
  resumed = _launch(tiny_config, tmp_path, *extra)
  log = resumed.stderr.read()
  assert resumed.wait(timeout=TIMEOUT) == 0, log[-3000:]
  assert 'Images streamed from the prepared files' in log
  _assert_same_final_params(tmp_path, reference)


def test_benchmark_scale_mode_runs_at_toy_size(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline', '--scale=27', '--stored_size=64',
       '--image_size=32', '--batch_size=8', '--windows=1', '--stream_window=2', '--step_window=1',
       '--scale_train_steps=2', f'--scale_dir={tmp_path}'], capture_output=True, text=True,
      env=os.environ.copy(), timeout=600, cwd=pathlib.Path(__file__).resolve().parent.parent, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'27 images at 64 px: .* stream [\d.]+ images/s, peak RSS [\d.]+ GiB', result.stdout)
  assert re.search(r'27 images at 64 px: training run \(launch.py, .* stopped after 2 steps\) [\d.]+ images/s, '
                   r'peak RSS [\d.]+ GiB', result.stdout)
  assert re.search(r'seed CNN train step: [\d.]+ images/s', result.stdout)
  assert re.search(r'training run peak RSS 27 vs 27 images: .* ratio 1.000', result.stdout)
  assert not list(tmp_path.iterdir())  # the generated tree and prepared data are deleted
