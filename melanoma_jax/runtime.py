"""Process settings that make XLA:CPU train fast; they must precede JAX's start.

Measured on a 2-core AVX-512 VM, seed model at 180x180, batch 32, bare train
step (`benchmarks/train_throughput.py`; README, Speed):

* XLA (jaxlib 0.10) by default turns every large sum (BatchNorm statistics,
  bias gradients) into a tree of reduce-windows that run slowly on CPU, and
  sends matrix multiplications to YNNPACK, slower here than XLA's own Eigen
  path. `--xla_cpu_experimental_ynn_fusion_type=reduce` sends the sums to
  YNNPACK instead and keeps matmuls and convolutions on Eigen. It is
  experimental, so it is set only for the jaxlib releases it was measured on
  (an unknown flag aborts XLA), and it changes which lowering is fastest
  (`models.seed_cnn_lowering.resolve`). Another jaxlib runs without it, and
  `configure` logs a warning that says so (`slow_path_warning`);
  pyproject.toml allows only the releases measured here or on accelerators.
* A process that only runs models forward (`inference`, `evaluate`) sends
  nothing to YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=`, empty):
  with reductions allowed there, XLA hands a whole forward pass (the seed
  model's convolutions, poolings and matmuls) to one YNNPACK graph that runs
  slower than Eigen's convolutions; training has no such graph and keeps the
  flag above (README, Speed: both measured for every model).
* glibc returns every freed block over 32 MiB to the kernel, so each
  training step faults its GBs of temporaries in again, 4 KiB at a time
  unless they are backed by transparent huge pages (README, Speed: the page
  faults and system time with and without them). glibc reads its settings
  only at process start, so entry points re-execute themselves with them once.
* A process that only runs models forward instead keeps what it frees
  (`glibc.malloc.mmap_max=0`, a trim threshold it never reaches) and
  allocates from one arena (`glibc.malloc.arena_max=1`): XLA's threads
  allocate a program's temporaries, and a thread's own arena serves a block
  over 64 MiB with a fresh mapping whatever `mmap_max` says. Every batch then
  reuses the last one's pages instead of faulting and zeroing them again,
  and the heap's few growths fault in small pages: huge ones stalled those
  batches compacting memory. Training does not: beside tf.data's threads the
  one arena slowed the loop, and the kept memory would take the seed model's
  loop over 3 GiB (README, Speed).

Nothing is overridden that the user set: an existing GLIBC_TUNABLES or an
XLA flag of the same name wins.

Python's cyclic garbage collector is kept off the libraries' objects, which
live as long as the process: it would walk TensorFlow's hundreds of
thousands of objects several times while they load, at every full
collection after, and once more as the process exits. They are frozen
(`gc.freeze`) once TensorFlow has loaded, and everything is frozen at exit
(atexit handlers still run; our files are closed when written).

The console is for the user's progress and results: TensorFlow's native
libraries print start-up banners (oneDNN, CPU features, absl's pre-init
notice) that no log level reaches, so `configure` imports TensorFlow with
those lines dropped and everything else it prints kept (and without the
Keras it loads for SavedModels, until something asks for Keras), and sets
TF_CPP_MIN_LOG_LEVEL=1 (unless set) so its later INFO lines stay quiet while
warnings and errors show.
"""

import atexit
import gc
import importlib.metadata
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

# workload -> GLIBC_TUNABLES (see the module docstring).
GLIBC_TUNABLES = {
    'train': 'glibc.malloc.hugetlb=1',
    'forward': f'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2**36}:glibc.malloc.arena_max=1',
}
# jaxlib (major, minor) -> {workload: XLA:CPU flags measured to speed it up}.
# 'train': processes that train (launch.py); 'forward': processes that only
# run models forward (inference, evaluate).
_CPU_XLA_FLAGS = {
    (0, 10): {'train': ('--xla_cpu_experimental_ynn_fusion_type=reduce',),
              'forward': ('--xla_cpu_experimental_ynn_fusion_type=',)},
}


def cpu_xla_flags(jaxlib_version: str, workload: str = 'train') -> tuple[str, ...]:
  """The XLA:CPU flags for this jaxlib and workload; none for releases they were not measured on."""
  major_minor = tuple(int(part) for part in jaxlib_version.split('.')[:2])
  return _CPU_XLA_FLAGS.get(major_minor, {}).get(workload, ())


def _jaxlib_version() -> str | None:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None


def _measured_flags(workload: str = 'train') -> tuple[str, ...]:
  try:
    return cpu_xla_flags(_jaxlib_version() or '', workload)
  except ValueError:
    return ()


def slow_path_warning(jaxlib_version: str | None) -> str | None:
  """What runs slower on CPU with this jaxlib, for the log; None for a release the flags were measured on."""
  try:
    if jaxlib_version is None or cpu_xla_flags(jaxlib_version):
      return None
  except ValueError:
    pass
  measured = ', '.join(f'{major}.{minor}' for major, minor in _CPU_XLA_FLAGS)
  return (f'jaxlib {jaxlib_version}: melanoma_jax\'s XLA:CPU flags were measured on jaxlib {measured} '
          'only, so they are off and training on a CPU is slower (large sums such as BatchNorm '
          'statistics run as XLA\'s default reduce-window trees, and the seed model\'s '
          'conv_impl=auto takes the "mixed" lowering where oneDNN is not installed). GPU and TPU '
          f'runs are unaffected; for the measured CPU speed, install jax and jaxlib {measured}.')


def cpu_flags_active(workload: str = 'train') -> bool:
  """Whether XLA_FLAGS holds this jaxlib's measured flags for `workload` (they change the fastest lowering)."""
  flags = _measured_flags(workload)
  return bool(flags) and set(flags) <= set(os.environ.get('XLA_FLAGS', '').split())


def with_xla_flags(current: str, flags: Sequence[str]) -> str:
  """`current` XLA_FLAGS plus each of `flags` whose name it does not set already."""
  names = {flag.split('=')[0] for flag in current.split()}
  return ' '.join([*current.split(), *(f for f in flags if f.split('=')[0] not in names)])


# Logged by TensorFlow while stderr is captured, so that absl's one-time notice
# comes with it (below) rather than before the first warning a run shows.
_FIRST_LOG_LINE = 'melanoma_jax: TensorFlow C++ logging started'
# The module `import tensorflow` loads Keras for (tensorflow/__init__.py, b/196254385).
_KERAS_AT_TF_IMPORT = 'keras.src.optimizers'
# Informational lines TensorFlow's native libraries print while loading.
START_UP_BANNERS = (
    'All log messages before absl::InitializeLog() is called are written to STDERR',
    _FIRST_LOG_LINE,
    'oneDNN custom operations are on',
    'This TensorFlow binary is optimized to use available CPU instructions',
    'To enable the following instructions:',
)


def without_banners(text: str) -> str:
  """`text` without the lines that hold a start-up banner."""
  return ''.join(line for line in text.splitlines(keepends=True)
                 if not any(banner in line for banner in START_UP_BANNERS))


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with stderr captured, then shows what it printed but the banners.

  What is loaded by then is frozen (`gc.freeze`): the garbage collector walks it no more.
  """
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  collecting = gc.isenabled()
  gc.disable()
  # TensorFlow imports Keras while loading, only to register Keras' optimizers
  # for loading SavedModels (none here), in a try that lets it fail: Keras and
  # what it pulls in (scikit-learn) slowed every start. Keras still loads when
  # used (`tf.keras`, `import keras`).
  skip_keras = 'keras' not in sys.modules
  if skip_keras:
    sys.modules[_KERAS_AT_TF_IMPORT] = None  # import raises ImportError
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top
      # absl prints its notice with TensorFlow's first C++ log line, which some
      # CPUs get while loading (a banner above) and others only at a run's first
      # warning; an error-level line (shown at every TF_CPP_MIN_LOG_LEVEL but 3)
      # brings it here.
      tensorflow.raw_ops.PrintV2(input=_FIRST_LOG_LINE, output_stream='log(error)', end='')
    finally:
      gc.freeze()
      if collecting:
        gc.enable()
      if skip_keras:
        del sys.modules[_KERAS_AT_TF_IMPORT]
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      sys.stderr.write(without_banners(captured.read().decode(errors='replace')))
      sys.stderr.flush()


def configure(reexec: bool = False, workload: str = 'train', tensorflow: bool = True) -> None:
  """Applies the settings; call first thing in an entry point, before JAX or TensorFlow load.

  `workload` is 'train', or 'forward' for a process that never trains.

  With `reexec`, a Linux process without a GLIBC_TUNABLES of its own is
  replaced by the same command with the workload's; the PID stays the same, so
  signals still reach it. Without, only the XLA flags are set. A jaxlib
  they were not measured on gets a warning instead. Then TensorFlow is
  imported without its start-up banners; with `tensorflow=False`, the caller
  does that later (`import_tensorflow_quietly`), before JAX or TensorFlow load.
  """
  os.environ['XLA_FLAGS'] = with_xla_flags(os.environ.get('XLA_FLAGS', ''), _measured_flags(workload))
  atexit.register(gc.freeze)  # The interpreter's collections at exit then walk nothing.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  if reexec and sys.platform == 'linux' and 'GLIBC_TUNABLES' not in os.environ:
    os.environ['GLIBC_TUNABLES'] = GLIBC_TUNABLES[workload]
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  warning = slow_path_warning(_jaxlib_version())
  if warning:
    logging.getLogger(__name__).warning(warning)
  if tensorflow:
    import_tensorflow_quietly()


def show_info_only_from(*paths: str) -> Callable[[logging.LogRecord], bool]:
  """A log filter: INFO and below only from files under `paths`; warnings from anywhere.

  For the absl handler of launch.py, whose INFO level is for our progress,
  not for the libraries' own (TFDS reading files, JAX probing for TPUs,
  orbax's every checkpoint I/O step).
  """
  prefixes = tuple(os.path.realpath(path) for path in paths)
  return lambda record: (record.levelno >= logging.WARNING
                         or os.path.realpath(record.pathname).startswith(prefixes))
