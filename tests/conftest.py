"""Test setup: four fake CPU devices, so multi-device code runs everywhere.

The XLA flags are launch.py's too (`runtime.configure`), so runs in the test
process and runs of launch.py compute the same bits.
"""

import os

from melanoma_jax import runtime

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
runtime.configure()

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope='session')
def tiny_config(tmp_path_factory):
  """A balanced-recipe config on the tiny synthetic dataset, prepared once."""
  from configs import balanced  # pylint: disable=g-import-not-at-top
  config = balanced.get_config('synthetic')
  config.dataset = 'synthetic_lesions/tiny'
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.image_size = 32
  config.batch_size = 8
  config.num_epochs = 2
  config.log_every_steps = 5
  return config
