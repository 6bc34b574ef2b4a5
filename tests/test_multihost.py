"""Two real processes on loopback play two hosts (CPU, gloo collectives, 2 devices each)."""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from melanoma_jax import reporting, train
from test_train import _config

TIMEOUT = 150  # seconds for one two-process run; a hang fails the test
BATCH = 96
STEPS = 2  # per epoch: 182 tiny training images / 96, rounded up


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_hosts(config, workdir, num_epochs, *extra):
  # Few steps (batch 96: 2 per epoch), no dropout, and SGD: Adam's first
  # steps are ~lr * sign(gradient), which turns round-off in near-zero
  # gradients (another reduction order across processes) into lr-sized
  # differences, hiding whether the runs compute the same thing.
  """Runs launch.py as processes 0 and 1; returns each one's parameter digest."""
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/balanced.py:synthetic',
       f'--config.dataset={config.dataset}', f'--config.data_dir={config.data_dir}',
       f'--config.image_size={config.image_size}', f'--config.batch_size={BATCH}',
       f'--config.num_epochs={num_epochs}', f'--workdir={workdir}', '--config.model.dropout_rate=0',
       '--config.optimizer=sgd', '--config.learning_rate=0.001', '--config.momentum=0',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}', *extra],
      stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT)[1])
  finally:
    for proc in procs:
      proc.kill()
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  return [re.search(r'Final parameters sha256 (\w+)', log).group(1) for log in logs]


@pytest.fixture(scope='module')
def single_process_run(tiny_config, tmp_path_factory):
  """One process with 4 devices, 2 epochs, the same global batch."""
  workdir = tmp_path_factory.mktemp('single')
  config = _config(tiny_config, num_epochs=2, batch_size=BATCH)
  config.model.dropout_rate = 0.0
  config.optimizer, config.learning_rate, config.momentum = 'sgd', 0.001, 0.0
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _params(workdir, step):
  state, _, _ = train.restore_for_inference(str(workdir), step=step)
  return state.params


def _assert_close(workdir, reference, step):
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), _params(workdir, step),
                       _params(reference, step))
  # Gloo across processes sums in another order than one process: float round-off
  # only (measured 3e-8 to 2e-5). One epoch moves the parameters by ~1e-3, so a real
  # fault (other data, summed instead of averaged gradients) shows as >= 1e-3.
  assert max(jax.tree.leaves(diffs)) < 1e-4


def test_two_hosts_train_like_one_host_with_the_same_devices(tiny_config, tmp_path, single_process_run):
  digests = _two_hosts(tiny_config, tmp_path, num_epochs=1)
  assert digests[0] == digests[1], 'both hosts hold identical parameters'
  _assert_close(tmp_path, single_process_run, step=STEPS)
  # Only process 0 wrote the history; both took part in the checkpoint.
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1]
  # Resuming the two-host run continues from the shared checkpoint.
  digests = _two_hosts(tiny_config, tmp_path, num_epochs=2)
  assert digests[0] == digests[1]
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1, 2]
  _assert_close(tmp_path, single_process_run, step=2 * STEPS)


def test_two_hosts_streaming_train_like_one_host_in_memory(tiny_config, tmp_path, single_process_run):
  # Each host reads its slice of every global batch from the prepared files.
  digests = _two_hosts(tiny_config, tmp_path, 1, '--config.streaming=True')
  assert digests[0] == digests[1]
  _assert_close(tmp_path, single_process_run, step=STEPS)
