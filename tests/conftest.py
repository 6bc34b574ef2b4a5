"""Test setup: four fake CPU devices, shared trained runs, and how xdist splits the suite.

The XLA flags are launch.py's too (`runtime.configure`), so runs in the test
process and runs of launch.py compute the same bits.

Runs that several test files read are session fixtures here, trained once per
xdist worker; `pytest_xdist_make_scheduler` sends the files that read one
(`SHARED_RUN_FILES`) to the same worker, so each is trained once per session.
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
  # Every program, however quick to compile: a run compiles dozens of small ones, each again in every process.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
runtime.configure()

import pytest  # noqa: E402  (after the environment is set)

# Files whose tests take longest, started first so that the two workers finish together.
SLOWEST_FIRST = ('test_readme_commands.py', 'test_resilience.py', 'test_fault_injection.py', 'test_finetune.py',
                 'test_steps.py', 'test_cross_validation.py', 'test_multihost.py', 'test_ood.py')
# Files that read one trained session run (below): each group runs on one xdist worker.
SHARED_RUN_FILES = {'test_train.py': 'test_resilience.py', 'test_streaming.py': 'test_resilience.py',
                    'test_inference.py': 'test_fault_injection.py'}


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


def _group(path: str) -> str:
  name = path.split('::', 1)[0].rsplit('/', 1)[-1]
  return SHARED_RUN_FILES.get(name, name)


def pytest_collection_modifyitems(items):
  """The slowest files first (xdist hands out files in this order); order within a file kept."""
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # A stable sort.


def pytest_xdist_make_scheduler(config, log):
  """--dist loadfile, with the files of `SHARED_RUN_FILES` joined to their group.

  (xdist's own `--dist loadgroup` reads marks through `item._nodeid`, which
  pytest 9 no longer has: its groups silently become single tests.)
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class LoadGroupOfFile(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _group(nodeid)

  return LoadGroupOfFile(config, log)
