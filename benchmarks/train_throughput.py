"""Training throughput of models: ours against Keras, in one invocation.

  python benchmarks/train_throughput.py                 # seed_cnn, 180x180, batch 32
  python benchmarks/train_throughput.py --image_size=64 --windows=3   # quick
  python benchmarks/train_throughput.py --model=resnet50               # 224x224
  python benchmarks/train_throughput.py --model=all     # seed_cnn, resnet50, efficientnet_b0, vit_s16

Models run one after the other (each at its own size unless --image_size is
given: the seed model at 180, the backbones at 224); a table at the end gives
each model's images/sec and its ratio to Keras.

Contenders:
  step   our jitted `steps.train_step` on one fixed device batch;
  keras  the same model in Keras/TensorFlow (`train_on_batch` on the same batch):
         the seed model's layer table, or the `keras.applications` model of
         the same architecture (`weights=None`); skipped for models Keras
         lacks (ResNet-18/34, ViT);
  loop   our full training loop, as users run it (`launch.py` on the synthetic
         dataset, in a child process): its epochs run once, between the first
         and second half of the step/keras windows. Its images/sec are its
         training throughput per epoch from its own history (validation
         excluded), median after the compiling first epoch.
step and keras each run in a process of their own (so neither framework's
threads or heap slow the other) and alternate in timed windows, so machine
load hits both alike. Each window starts with `--warm_steps` untimed steps
for every contender (their rate is printed apart): the first step after the
other process's window pays for the memory that process churned, which a
training run alone never meets. Printed: images/sec (median over windows
after a warm-up step), time to first step (process start to one step done)
and each contender's peak resident memory.
Like launch.py, the benchmark first applies `melanoma_jax.runtime` (XLA:CPU
flags, huge pages) for step and loop (`--untuned` skips it for step); Keras
runs as TensorFlow users run it, without huge pages (it does not gain from
them here).
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import keras_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from melanoma_jax import cli, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
ALL_MODELS = ('seed_cnn', 'resnet50', 'efficientnet_b0', 'vit_s16')
_IMAGE_SIZES = {'seed_cnn': 180}  # others: 224, the backbones' pretraining size
flags.DEFINE_string('model', 'seed_cnn', 'Names in melanoma_jax.models.MODELS, comma-separated, '
                    f'or all ({",".join(ALL_MODELS)}).')
flags.DEFINE_integer('image_size', 0, "Image side in pixels; 0: each model's own (seed_cnn 180, "
                     'the others 224).', lower_bound=0)
flags.DEFINE_integer('batch_size', 32, 'Images per step.', lower_bound=1)
flags.DEFINE_integer('num_classes', 9, 'Classes of the head.', lower_bound=1)
flags.DEFINE_integer('windows', 5, 'Timed windows per contender.', lower_bound=1)
flags.DEFINE_integer('steps_per_window', 3, 'Steps per timed window.', lower_bound=1)
flags.DEFINE_string('conv_impl', 'auto', "seed_cnn only: its conv_impl, e.g. 'native'.")
flags.DEFINE_integer('warm_steps', 1, "Untimed steps at the start of each contender's window (shown "
                     'apart): the first step after the other contender ran pays for the memory that process '
                     'just churned (in ours, the kernel compacting memory for huge pages), which a run alone '
                     'does not meet.', lower_bound=0)
flags.DEFINE_float('settle_s', 2.0, "Idle seconds before each window, so the previous contender's "
                   'threads wind down.', lower_bound=0)
flags.DEFINE_integer('loop_epochs', 3, 'Epochs of the training loop; 0 skips it.', lower_bound=0)
flags.DEFINE_string('loop_models', 'seed_cnn', "Comma-separated models whose loop is timed (at 224 px "
                    "a backbone's loop takes most of an hour).")
flags.DEFINE_bool('no_keras', False, 'Skip the Keras contender.')
flags.DEFINE_bool('untuned', False, 'Skip melanoma_jax.runtime (XLA:CPU flags, huge pages) for step, '
                  'as launch.py applies it.')
flags.DEFINE_enum('worker', None, ['step', 'keras'], 'Internal: this process is that contender '
                  '(the benchmark starts them itself).')


def _peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jax_step(args, images, labels) -> Callable[[], None]:
  """Our bare train step; each call runs one step and waits for it."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from melanoma_jax import models, optim, steps  # pylint: disable=g-import-not-at-top

  model_config = default.get_config('synthetic').model  # as the loop's
  model_config.name, model_config.conv_impl = args.model, args.conv_impl
  model = models.build(model_config, args.num_classes)
  tx = optim.PlateauOptimizer(optax.adam(1e-3), optim.keras_plateau(1e-3, 0.5, 3, 1e-4, 0, 1e-5),
                              1e-3)
  state = steps.create_train_state(jax.random.key(0), model, tx, images.shape[1:])
  batch = jax.device_put({'image': images, 'label': labels})
  train_step = jax.jit(steps.train_step, donate_argnums=0)

  def run():
    nonlocal state
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)

  return run


def _keras_step(args, images, labels) -> Callable[[], None]:
  """The Keras counterpart of the model, same batch and optimizer."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  model = keras_models.MODELS[args.model](keras, images.shape[1:], args.num_classes)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=['accuracy'],
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x, y = tf.constant(images, tf.float32), tf.constant(labels)
  return lambda: model.train_on_batch(x, y)


def _run_loop(args) -> dict[str, float]:
  """Our training loop as users run it: launch.py on the synthetic dataset, in its own process.

  Its images/sec are the median of its per-epoch training throughput (after
  the first epoch, which compiles), from the run's history; its peak memory
  is its own.
  """
  from melanoma_jax import reporting  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as workdir, open(os.path.join(workdir, 'log'), 'w+') as log:
    command = [sys.executable, 'launch.py', '--config=configs/default.py:synthetic',
               f'--config.model.name={args.model}', f'--config.image_size={args.image_size}',
               f'--config.batch_size={args.batch_size}',
               f'--config.num_epochs={args.loop_epochs}', f'--config.model.conv_impl={args.conv_impl}',
               f'--workdir={os.path.join(workdir, "run")}']
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    total_s = time.perf_counter() - start
    if status:
      log.seek(0)
      raise RuntimeError(f'{" ".join(command)} failed:\n{log.read()[-2000:]}')
    history = reporting.read_history(os.path.join(workdir, 'run'))
  later = [row['images_per_sec'] for row in history[1:]] or [history[0]['images_per_sec']]
  return {'images_per_sec': statistics.median(later), 'total_s': total_s,
          'first_epoch_s': history[0]['epoch_seconds'], 'peak_rss_gib': usage.ru_maxrss / 2**20}


_BUILDERS = {'step': _jax_step, 'keras': _keras_step}


def _serve(args) -> None:
  """A contender's process: builds it, runs one step, then runs the steps asked on stdin.

  Replies one JSON line per request: seconds taken and peak RSS so far.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8)
  labels = rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)
  step = _BUILDERS[args.worker](args, images, labels)
  for request in itertools.chain(['1'], sys.stdin):
    start = time.perf_counter()
    for _ in range(int(request)):
      step()
    print(json.dumps({'seconds': time.perf_counter() - start, 'peak_rss_gib': _peak_rss_gib()}), flush=True)


class _Contender:
  """A contender in its own process, so neither framework's threads or heap slow the other."""

  def __init__(self, name: str, argv: list[str]):
    start = time.perf_counter()
    # Keras runs as TensorFlow users run it: without our process settings.
    env = {k: v for k, v in os.environ.items() if name == 'step' or k != 'GLIBC_TUNABLES'}
    self.process = subprocess.Popen([sys.executable, __file__, *argv, f'--worker={name}'], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.rates: list[float] = []
    self.warm_rates: list[float] = []
    self.peak_rss_gib = self._reply()['peak_rss_gib']
    self.first_step_s = time.perf_counter() - start

  def _reply(self) -> dict[str, float]:
    for line in self.process.stdout:
      if line.startswith('{'):  # anything else is a library talking
        return json.loads(line)
    raise RuntimeError(f'{self.process.args} exited with {self.process.wait()}')

  def _run(self, steps: int, batch_size: int) -> float:
    """Images/sec of `steps` steps run now."""
    self.process.stdin.write(f'{steps}\n')
    self.process.stdin.flush()
    reply = self._reply()
    self.peak_rss_gib = reply['peak_rss_gib']
    return steps * batch_size / reply['seconds']

  def time_window(self, steps: int, batch_size: int, warm_steps: int = 0) -> None:
    if warm_steps:
      self.warm_rates.append(self._run(warm_steps, batch_size))
    self.rates.append(self._run(steps, batch_size))


def _worker_argv(args) -> list[str]:
  return [f'--{name}={getattr(args, name)}'
          for name in ('model', 'image_size', 'batch_size', 'num_classes', 'conv_impl')]


def _bench(args) -> dict[str, float]:
  """One model's contenders, timed in alternating windows; returns their images/sec."""
  import jax  # pylint: disable=g-import-not-at-top

  from melanoma_jax.models import seed_cnn_lowering as lowering_lib  # pylint: disable=g-import-not-at-top

  lowering = (f'conv_impl={args.conv_impl} ({lowering_lib.resolve(args.conv_impl)}); '
              if args.model == 'seed_cnn' else '')
  print(f'\n{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), '
        f'{os.cpu_count()} CPUs; {args.model} {args.image_size}x{args.image_size}, batch {args.batch_size}, '
        f'{lowering}XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r} GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES")!r}',
        flush=True)
  contenders = {}
  with_keras = not args.no_keras and args.model in keras_models.MODELS
  if not args.no_keras and not with_keras:
    print(f'keras: skipped (keras.applications has no {args.model})', flush=True)
  for name in ('step', 'keras') if with_keras else ('step',):
    contenders[name] = _Contender(name, _worker_argv(args))
    print(f'{name}: time to first step {contenders[name].first_step_s:.1f} s (process start, '
          f'build, compile, one step), peak RSS {contenders[name].peak_rss_gib:.2f} GiB', flush=True)

  loop = None
  for window in range(args.windows):
    if window == args.windows // 2 and args.loop_epochs and args.model in args.loop_models.split(','):
      try:
        loop = _run_loop(args)
        print(f'loop: {args.loop_epochs} epochs in {loop["total_s"]:.1f} s including dataset '
              f'preparation (first epoch {loop["first_epoch_s"]:.1f} s), peak RSS '
              f'{loop["peak_rss_gib"]:.2f} GiB', flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f'loop: skipped ({type(e).__name__}: {str(e)[:200]})', flush=True)
    for contender in contenders.values():
      time.sleep(args.settle_s)
      contender.time_window(args.steps_per_window, args.batch_size, args.warm_steps)
  for contender in contenders.values():
    contender.process.stdin.close()
    contender.process.wait()

  medians = {name: statistics.median(c.rates) for name, c in contenders.items()}
  if loop:
    medians['loop'] = loop['images_per_sec']
  for name, rate in medians.items():
    contender = contenders.get(name)
    warm = (f'untimed first steps {statistics.median(contender.warm_rates):.1f}, '
            if contender and contender.warm_rates else '')
    detail = (f'windows {min(contender.rates):.1f}-{max(contender.rates):.1f}, {warm}'
              f'peak RSS {contender.peak_rss_gib:.2f} GiB' if contender else
              f'peak RSS {loop["peak_rss_gib"]:.2f} GiB')
    print(f'{name:6s} {rate:8.1f} images/s ({detail})')
  for ours in ('step', 'loop'):
    if ours in medians and 'keras' in medians:
      print(f'{ours}/keras {medians[ours] / medians["keras"]:.2f}')
  if 'loop' in medians:
    print(f'loop/step {medians["loop"] / medians["step"]:.2f}')
  return medians


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = FLAGS
  # The console is for the results: libraries' INFO lines stay out, as in launch.py.
  logging.get_absl_handler().addFilter(runtime.show_info_only_from(os.path.dirname(runtime.__file__)))
  if args.worker:
    _serve(args)
    return
  if not args.untuned:
    runtime.configure(reexec=True)
  names = ALL_MODELS if args.model == 'all' else tuple(args.model.split(','))
  settings = {name: getattr(args, name) for name in (
      'batch_size', 'num_classes', 'windows', 'steps_per_window', 'warm_steps', 'conv_impl', 'settle_s',
      'loop_epochs', 'loop_models', 'no_keras')}
  results = {}
  for name in names:
    size = args.image_size or _IMAGE_SIZES.get(name, 224)
    results[name, size] = _bench(argparse.Namespace(model=name, image_size=size, **settings))

  ratio = lambda ours, medians: (f'{medians[ours] / medians["keras"]:.2f}'
                                 if ours in medians and 'keras' in medians else '-')
  rate = lambda name, medians: f'{medians[name]:.1f}' if name in medians else '-'
  print(f'\n{"model":16s} {"px":>4s} {"step":>7s} {"keras":>7s} {"step/keras":>10s} {"loop":>7s} '
        f'{"loop/keras":>10s}  (images/s, batch {args.batch_size})')
  for (name, size), medians in results.items():
    print(f'{name:16s} {size:4d} {rate("step", medians):>7s} {rate("keras", medians):>7s} '
          f'{ratio("step", medians):>10s} {rate("loop", medians):>7s} {ratio("loop", medians):>10s}')


if __name__ == '__main__':
  cli.run(main)
