"""Bare train-step throughput and model FLOPs utilisation of every zoo model on a GPU or TPU.

  python benchmarks/accelerator_throughput.py --peak_tflops=989   # H100/H200 dense bf16

For each model and compute dtype (float32, bfloat16): our jitted
`steps.train_step` on one fixed device batch, images/sec (median of timed
windows after a compiling step) and MFU = XLA's FLOP count of the lowered
step x steps/sec / `--peak_tflops` (the chip's dense bf16 peak; float32
runs are measured against the same peak, so the two dtypes compare). Needs
JAX with the accelerator, flax, optax and ml_collections; no TensorFlow.
"""

import os
import statistics
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from melanoma_jax import cli, runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

# model name -> image size, as the README's speed table reports them.
MODELS = {'seed_cnn': 180, 'resnet50': 224, 'efficientnet_b0': 224, 'vit_s16': 224}

FLAGS = flags.FLAGS
flags.DEFINE_list('models', list(MODELS), 'Comma-separated names in MODELS.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Comma-separated compute dtypes.')
flags.DEFINE_integer('batch_size', 32, 'Images per step.', lower_bound=1)
flags.DEFINE_integer('num_classes', 9, 'Classes of the head.', lower_bound=1)
flags.DEFINE_integer('windows', 5, 'Timed windows per model and dtype.', lower_bound=1)
flags.DEFINE_integer('steps_per_window', 20, 'Steps per timed window.', lower_bound=1)
flags.DEFINE_float('peak_tflops', None, "The accelerator's dense bf16 peak in TFLOP/s.", lower_bound=0,
                   required=True)


def measure(name: str, image_size: int, dtype: str, args: flags.FlagValues) -> dict[str, float]:
  """images/s, TFLOP per step and MFU of one model's bare train step."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from melanoma_jax import models, optim, steps  # pylint: disable=g-import-not-at-top

  model_config = ml_collections.ConfigDict({'name': name, 'dtype': dtype, 'dropout_rate': 0.1,
                                            'conv_impl': 'auto', 'bn_momentum': None})
  model = models.build(model_config, args.num_classes)
  tx = optim.PlateauOptimizer(optax.adam(1e-3), optim.keras_plateau(1e-3, 0.5, 3, 1e-4, 0, 1e-5), 1e-3)
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.integers(0, 256, (args.batch_size, image_size, image_size, 3), dtype=np.uint8),
      'label': rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)})
  state = steps.create_train_state(jax.random.key(0), model, tx, (image_size, image_size, 3))
  lowered = jax.jit(steps.train_step, donate_argnums=0).lower(state, batch)
  # Counted before compilation: a GPU executable's convolutions are library
  # calls that the compiled cost analysis does not count.
  tflop_per_step = float(lowered.cost_analysis()['flops']) / 1e12
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.steps_per_window):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    rates.append(args.steps_per_window / (time.perf_counter() - start))
  steps_per_s = statistics.median(rates)
  return {'images_per_s': steps_per_s * args.batch_size, 'tflop_per_step': tflop_per_step,
          'mfu': tflop_per_step * steps_per_s / args.peak_tflops, 'compile_s': compile_s}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = FLAGS
  # The console is for the results: libraries' INFO lines stay out, as in launch.py.
  logging.get_absl_handler().addFilter(runtime.show_info_only_from(os.path.dirname(runtime.__file__)))
  import jax  # pylint: disable=g-import-not-at-top
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
        f'batch {args.batch_size}, MFU against {args.peak_tflops:g} TFLOP/s', flush=True)
  print(f'{"model":<16} {"px":>4} {"dtype":<9} {"images/s":>9} {"TFLOP/step":>10} {"MFU":>6} '
        f'{"compile s":>9}', flush=True)
  for name in args.models:
    for dtype in args.dtypes:
      r = measure(name, MODELS[name], dtype, args)
      print(f'{name:<16} {MODELS[name]:>4} {dtype:<9} {r["images_per_s"]:>9.0f} '
            f'{r["tflop_per_step"]:>10.3f} {r["mfu"]:>6.1%} {r["compile_s"]:>9.1f}', flush=True)


if __name__ == '__main__':
  cli.run(main)
