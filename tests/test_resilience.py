"""Never lose a run: SIGTERM, SIGKILL, corrupt checkpoints, a workdir of another run."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from melanoma_jax import errors, reporting, train
from test_train import _config, _final_params

TIMEOUT = 240


def _launch(config, workdir, *extra):
  """Starts launch.py on `config`'s tiny dataset with the same 4 fake devices as the tests."""
  args = [sys.executable, 'launch.py', '--config=configs/balanced.py:synthetic',
          f'--config.dataset={config.dataset}', f'--config.data_dir={config.data_dir}',
          f'--config.image_size={config.image_size}', f'--config.batch_size={config.batch_size}',
          f'--config.log_every_steps={config.log_every_steps}', f'--workdir={workdir}', *extra]
  return subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _run_until(proc, marker):
  """Reads the run's log until `marker` appears; the run keeps going."""
  for line in proc.stderr:
    if marker in line:
      return
  raise AssertionError(f'run ended before {marker!r}; exit code {proc.wait()}')


def _assert_same_final_params(workdir, reference):
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), _final_params(workdir),
                       _final_params(reference))
  # XLA:CPU is deterministic and the resumed run replays the same data: bitwise equal.
  assert max(jax.tree.leaves(diffs)) == 0


@pytest.mark.parametrize('sig,extra', [
    (signal.SIGTERM, ()),
    (signal.SIGKILL, ('--config.checkpoint_every_steps=4',)),
])
def test_interrupted_run_resumes_to_the_uninterrupted_result(finished_run, tiny_config, tmp_path, sig, extra):
  reference, _ = finished_run
  proc = _launch(tiny_config, tmp_path, '--config.num_epochs=3', *extra)
  _run_until(proc, 'epoch 2/3 step 15/23')
  proc.send_signal(sig)
  proc.stderr.read()
  code = proc.wait(timeout=TIMEOUT)
  if sig == signal.SIGTERM:
    assert code == 0
    saved = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
    assert max(saved) > 23 and max(saved) % 23, 'SIGTERM saves mid-epoch, at a step boundary'
  else:
    assert code == -signal.SIGKILL
  resumed = _launch(tiny_config, tmp_path, '--config.num_epochs=3', *extra)
  resumed.stderr.read()
  assert resumed.wait(timeout=TIMEOUT) == 0
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1, 2, 3]
  _assert_same_final_params(tmp_path, reference)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path):
  train.train_and_evaluate(_config(tiny_config, num_epochs=2), str(tmp_path))
  latest = tmp_path / 'checkpoints' / '46'
  for f in (latest / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])  # truncate the array data
  train.train_and_evaluate(_config(tiny_config, num_epochs=2), str(tmp_path))
  assert (tmp_path / 'corrupt_checkpoints' / '46').is_dir()
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1, 2]
  assert (tmp_path / 'checkpoints' / '46').is_dir()  # epoch 2 redone and saved again


def test_workdir_of_another_run_is_refused_unless_starting_over(tiny_config, tmp_path):
  train.train_and_evaluate(_config(tiny_config, num_epochs=1), str(tmp_path))
  other = _config(tiny_config, num_epochs=1, image_size=36)
  with pytest.raises(errors.ConfigError, match=r'image_size: 32 -> 36.*--start_over'):
    train.train_and_evaluate(other, str(tmp_path))
  train.train_and_evaluate(other, str(tmp_path), start_over=True)
  moved = list((tmp_path / 'previous_runs').iterdir())
  assert len(moved) == 1 and (moved[0] / 'checkpoints').is_dir()
  assert [row['epoch'] for row in reporting.read_history(tmp_path)] == [1]
