"""Test setup: four fake CPU devices, shared trained runs, and how xdist splits the suite.

The XLA flags are launch.py's too (`runtime.configure`), so runs in the test
process and runs of launch.py compute the same bits.

Runs that several test files read are session fixtures here, trained once per
xdist worker; `pytest_collection_modifyitems` sends every file that uses one to
the same worker (`--dist loadgroup`), so each is trained once per session.
Compiled XLA programs are cached on disk for the session (one directory for
all workers and the processes the tests start): a launch.py subprocess or a
README command reuses what an earlier one compiled. A cached program is the
same executable, so runs stay bitwise reproducible.
"""

import atexit
import os
import shutil
import tempfile

from melanoma_jax import runtime

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
if 'PYTEST_XDIST_WORKER' not in os.environ and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # The controller (or a run without xdist) makes the directory; workers and subprocesses inherit it.
  _cache = tempfile.mkdtemp(prefix='melanoma_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
runtime.configure()

import pytest  # noqa: E402  (after the environment is set)

# Files whose tests take longest, started first so that the two workers finish together.
SLOWEST_FIRST = ('test_readme_commands.py', 'test_fault_injection.py', 'test_resilience.py', 'test_ood.py',
                 'test_cross_validation.py', 'test_multihost.py')
# Session fixtures that train: every file using one runs on one worker.
SHARED_RUNS = ('finished_run', 'one_epoch_run')


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


def _trained(config, num_epochs, workdir):
  from melanoma_jax import train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.num_epochs = num_epochs
  return workdir, train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope='session')
def finished_run(tiny_config, tmp_path_factory):
  """(workdir, result) of an uninterrupted 3-epoch run of `tiny_config`: copy it before changing it."""
  return _trained(tiny_config, 3, tmp_path_factory.mktemp('finished_run'))


@pytest.fixture(scope='session')
def one_epoch_run(tiny_config, tmp_path_factory):
  """(workdir, result) of an uninterrupted 1-epoch run of `tiny_config`: copy it before changing it."""
  return _trained(tiny_config, 1, tmp_path_factory.mktemp('one_epoch_run'))


@pytest.hookimpl(tryfirst=True)  # Before xdist reads the xdist_group marks.
def pytest_collection_modifyitems(items):
  """One xdist group per file, files sharing a trained run joined; slowest groups first."""
  files = {}  # file name -> the shared runs its tests use
  for item in items:
    files.setdefault(item.path.name, set()).update(set(SHARED_RUNS) & set(getattr(item, 'fixturenames', ())))
  parent = {name: name for name in files}

  def root(name):
    while parent[name] != name:
      name = parent[name]
    return name

  for run in SHARED_RUNS:
    users = sorted(name for name, runs in files.items() if run in runs)
    for name in users[1:]:
      parent[root(name)] = root(users[0])
  group = {name: root(name) for name in files}
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  first = {}
  for name in files:
    first[group[name]] = min(first.get(group[name], len(rank)), rank.get(name, len(rank)))
  for item in items:
    item.add_marker(pytest.mark.xdist_group(group[item.path.name]))
  items.sort(key=lambda item: first[group[item.path.name]])  # Stable: order within a group kept.
