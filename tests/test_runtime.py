"""Process tuning: the flags it adds, what it leaves alone, and the re-execution."""

import os
import subprocess
import sys

import pytest

from melanoma_jax import runtime

_SHOW = ('import os, sys; from melanoma_jax import runtime; runtime.configure(reexec=True, workload={!r}); '
         'print(os.getpid(), sys.argv[1:], os.environ.get("GLIBC_TUNABLES"), os.environ["XLA_FLAGS"])')


def test_flags_only_for_measured_jaxlib_releases():
  assert runtime.cpu_xla_flags('0.10.2') == ('--xla_cpu_experimental_ynn_fusion_type=reduce',)
  # Processes that never train send nothing to YNNPACK (an empty list of fusion types).
  assert runtime.cpu_xla_flags('0.10.2', 'forward') == ('--xla_cpu_experimental_ynn_fusion_type=',)
  assert runtime.cpu_xla_flags('0.4.38', 'forward') == ()
  assert runtime.cpu_xla_flags('0.4.38') == ()
  assert runtime.cpu_xla_flags('1.0.0') == ()


def test_a_jaxlib_without_measured_flags_is_named_in_a_warning(monkeypatch, caplog):
  assert runtime.slow_path_warning('0.10.2') is None and runtime.slow_path_warning(None) is None
  for version in ('0.11.2', '0.4.38', 'unknown'):
    warning = runtime.slow_path_warning(version)
    assert f'jaxlib {version}:' in warning and 'measured on jaxlib 0.10 only' in warning
    assert 'training on a CPU is slower' in warning and 'conv_impl=auto' in warning
  monkeypatch.setattr(runtime, '_jaxlib_version', lambda: '0.11.2')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  runtime.configure()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'
  assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
      runtime.slow_path_warning('0.11.2')]


def test_configure_sets_the_flags_of_the_workload(monkeypatch):
  monkeypatch.setattr(runtime, '_jaxlib_version', lambda: '0.10.2')
  for workload, flag in (('train', 'reduce'), ('forward', '')):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
    runtime.configure(workload=workload)
    assert os.environ['XLA_FLAGS'].split() == [
        '--xla_force_host_platform_device_count=2', f'--xla_cpu_experimental_ynn_fusion_type={flag}']
    assert runtime.cpu_flags_active(workload) and not runtime.cpu_flags_active(
        {'train': 'forward', 'forward': 'train'}[workload])


def test_user_flags_win_and_others_are_kept():
  current = '--xla_force_host_platform_device_count=4 --xla_cpu_experimental_ynn_fusion_type=dot'
  merged = runtime.with_xla_flags(current, ('--xla_cpu_experimental_ynn_fusion_type=', '--xla_other=1'))
  assert merged.split() == [*current.split(), '--xla_other=1']
  assert runtime.with_xla_flags('', ('--a=',)) == '--a='


def _run(tunables=None, workload='train'):
  """(pid, output) of a child that configures itself and prints what it ends up with."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  proc = subprocess.Popen([sys.executable, '-c', _SHOW.format(workload), 'arg one', '--two'], env=env,
                          stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate()
  assert proc.returncode == 0
  pid, printed = out.split(' ', 1)
  return int(pid) == proc.pid, printed


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux-only')
def test_reexecutes_in_place_with_huge_pages_and_the_same_arguments():
  same_pid, out = _run()
  assert same_pid
  assert out.startswith("['arg one', '--two'] glibc.malloc.hugetlb=1 --xla_force_host_platform_device_count=2")


# In a thread, as XLA allocates a program's temporaries: a block over a
# thread arena's 64 MiB, written, freed, allocated again and written again;
# prints the page faults of the second writing.
_REFAULTS = '''
import ctypes, resource, sys, threading
from melanoma_jax import runtime
runtime.configure(reexec=True, workload=sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20
def write_twice():
  for attempt in range(2):
    block = libc.malloc(size)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
    libc.free(ctypes.c_void_p(block))
  print(faults)
thread = threading.Thread(target=write_twice)
thread.start()
thread.join()
'''


def _refaults(workload: str) -> int:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', _REFAULTS, workload], env=env, check=True, text=True,
                       stdout=subprocess.PIPE).stdout
  return int(out.split()[-1])


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux-only')
def test_forward_only_processes_reuse_the_pages_their_threads_free():
  # Even at 2 MiB per huge page, faulting the block in again takes 128 faults.
  assert _refaults('forward') < 16
  assert _refaults('train') >= 128


@pytest.mark.skipif(sys.platform != 'linux', reason='glibc tunables are Linux-only')
def test_users_own_malloc_tunables_are_left_alone():
  _, out = _run('glibc.malloc.arena_max=2')
  assert out.startswith("['arg one', '--two'] glibc.malloc.arena_max=2 ")


@pytest.mark.parametrize('collecting', [True, False])
def test_the_garbage_collector_is_kept_off_the_libraries_objects_and_the_callers_setting_kept(collecting):
  # The check registered before configure runs after configure's handler (atexit is last in, first out).
  code = ('import atexit, gc\n'
          f'if not {collecting}: gc.disable()\n'
          'atexit.register(lambda: print("at exit", id(cycle) in {id(x) for x in gc.get_objects()}))\n'
          'from melanoma_jax import runtime; runtime.configure()\n'
          'import tensorflow as tf\n'
          'tracked = {id(x) for x in gc.get_objects()}\n'
          'print(gc.isenabled(), id(tf.constant) in tracked, id(tf.data.Dataset) in tracked)\n'
          'cycle = [object()]; cycle.append(cycle)\n'
          'print(id(cycle) in {id(x) for x in gc.get_objects()})\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  # TensorFlow's objects are out of the collector's reach (frozen); what is made later is not, until the exit.
  assert result.stdout.splitlines() == [f'{collecting} False False', 'True', 'at exit False']


def test_tensorflow_loads_without_its_banners_or_keras_and_still_shows_its_warnings():
  # A cache read only in part makes tf.data log a C++ warning. Keras loads when asked for.
  code = ('from melanoma_jax import runtime; runtime.configure(); import sys, tensorflow as tf; '
          'list(tf.data.Dataset.range(3).cache().take(1)); print("keras" in sys.modules); '
          'print(tf.keras.optimizers.Adam(0.1).learning_rate.numpy())')
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
  assert result.stdout.split() == ['False', '0.1']
  err = result.stderr
  assert 'did not fully read the dataset being cached' in err
  for banner in runtime.START_UP_BANNERS:
    assert banner not in err
