"""How fast is dataset preparation, against a bare PIL loop on the same files?

Generates ISIC-sized JPEGs (600x450, the archive's layout) in a temporary
folder and prints images/s of, in the same run:

- a bare loop: PIL decode, RGB, LANCZOS resize to the stored size, nothing kept;
- `image_folder` preparation as it was: one thread, TensorFlow's PNG
  encoder, no JPEG draft;
- `image_folder` preparation as it is: `PREPARE_THREADS` threads, our PNG
  encoder (`preparation.encode_png`), JPEGs drafted (`preprocessing.DRAFT_MIN_FRACTION`);

and how much the stored pixels differ between the two (PNG is lossless: only
`Image.draft`, the JPEG DCT-domain downscaling of `decode_image`, changes
them); then what keeping an image in the preparation cache (`preparation_cache`,
which makes a killed preparation resumable) costs, against decoding it. Then
it measures that downscaling on large originals (as SIIM-ISIC 2020's): speed
with and without it, and the pixel difference. Each figure is the best of `--rounds`, as machines
shared with other work are noisy. Run from the repository root:

  python -m benchmarks.prepare_speed
"""

import pathlib
import tempfile
import time
from collections.abc import Callable

from absl import flags
import numpy as np
from PIL import Image
import tensorflow as tf  # noqa: F401  Imported before timing: TFDS imports it lazily.
import tensorflow_datasets as tfds

from benchmarks.image_trees import write_fixture_tree
from melanoma_jax import cli, preprocessing
from melanoma_jax.datasets import preparation, preparation_cache

FLAGS = flags.FLAGS
flags.DEFINE_integer('images_per_class', 40, 'Generated Train images per class (9 classes).')
flags.DEFINE_integer('stored_size', preparation.DEFAULT_IMAGE_SIZE, 'Stored image size.')
flags.DEFINE_integer('rounds', 2, 'Repetitions of each measurement; the best is reported.')
flags.DEFINE_integer('large_images', 6, 'Large JPEGs for the draft measurement.')
flags.DEFINE_integer('large_width', 3000, 'Width of those (height: 2/3 of it).')


def bare_loop(files: list[pathlib.Path], size: int) -> float:
  """Seconds for PIL to decode and resize every file."""
  start = time.perf_counter()
  for path in files:
    with Image.open(path) as image:
      image.convert('RGB').resize((size, size), Image.Resampling.LANCZOS)
  return time.perf_counter() - start


def tensorflow_png(pixels: np.ndarray) -> bytes:
  """How TFDS encoded images before: `tf.io.encode_png` (libpng, level 6)."""
  return tf.io.encode_png(pixels).numpy()


def prepare(tree: str, data_dir: str, size: int, threads: int, draft: float,
            encode: Callable[[np.ndarray], bytes]) -> tuple[float, tfds.core.DatasetBuilder]:
  """Seconds to prepare `tree` with the given settings (scan included)."""
  preparation.PREPARE_THREADS, preprocessing.DRAFT_MIN_FRACTION = threads, draft
  preparation.encode_png = encode
  start = time.perf_counter()
  config = preparation.FolderConfig(name=f'{size}px_benchmark', image_size=size)
  builder = tfds.builder('image_folder', manual_dir=tree, data_dir=data_dir, config=config)
  builder.download_and_prepare()
  return time.perf_counter() - start, builder


def pixels(builder: tfds.core.DatasetBuilder) -> dict[str, np.ndarray]:
  return {ex['file_name']: ex['image'] for ex in tfds.as_numpy(builder.as_dataset('train'))}


def decode_without_draft(path: pathlib.Path, size: int) -> np.ndarray:
  with Image.open(path) as image:
    image.load()
    return preprocessing.square_rgb(image, size).pixels


def cache_costs(files: list[pathlib.Path], size: int, folder: str) -> dict[str, float]:
  """Milliseconds per image, one thread: decode + resize + PNG-encode, then keeping the
  result in a `preparation_cache` (a miss: written) and taking it back (a hit: read)."""
  start = time.perf_counter()
  results = [preparation._decode_and_encode(path, size) for path in files]  # pylint: disable=protected-access
  timings = {'decode and encode': time.perf_counter() - start}
  cache = preparation_cache.PreparationCache(folder, size)
  for name in ('cache write', 'cache read'):
    start = time.perf_counter()
    for path, result in zip(files, results):
      cache.get(path, lambda result=result: result)
    timings[name] = time.perf_counter() - start
  return {name: 1000 * seconds / len(files) for name, seconds in timings.items()}


def main(argv):
  del argv
  size = FLAGS.stored_size
  with tempfile.TemporaryDirectory() as tmp:
    tree = f'{tmp}/tree'
    write_fixture_tree(tree, FLAGS.images_per_class)
    files = sorted(pathlib.Path(tree).rglob('*.jpg'))
    n = len(files)
    print(f'{n} JPEGs of 600x450 -> {size}x{size}, {preparation.PREPARE_THREADS} threads')
    threads, draft = preparation.PREPARE_THREADS, preprocessing.DRAFT_MIN_FRACTION
    encode = preparation.encode_png
    bare, before, after = [], [], []
    for r in range(FLAGS.rounds):
      bare.append(bare_loop(files, size))
      seconds, old = prepare(tree, f'{tmp}/before{r}', size, threads=1, draft=1.0,
                             encode=tensorflow_png)
      before.append(seconds)
      seconds, new = prepare(tree, f'{tmp}/after{r}', size, threads=threads, draft=draft,
                             encode=encode)
      after.append(seconds)
    old_pixels, new_pixels = pixels(old), pixels(new)
    assert old_pixels.keys() == new_pixels.keys()
    diff = np.abs(np.stack([old_pixels[k].astype(int) - new_pixels[k] for k in old_pixels]))
    rate = lambda seconds: n / min(seconds)
    print(f'bare PIL decode+resize loop:                      {rate(bare):7.1f} images/s')
    print(f'preparation before (1 thread, TF PNG, no draft):   {rate(before):7.1f} images/s')
    print(f'preparation now ({threads} threads, our PNG, draft):    {rate(after):7.1f} images/s')
    print(f'now / before: {rate(after) / rate(before):.2f}x; now / bare loop: '
          f'{rate(after) / rate(bare):.2f}x; stored pixels now vs before: difference mean '
          f'{diff.mean():.2f}, 99th percentile {np.percentile(diff, 99):.0f}, max {diff.max()}')
    costs = [cache_costs(files, size, f'{tmp}/cache{r}') for r in range(FLAGS.rounds)]
    print('per image, one thread (ms): ' + ', '.join(
        f'{name} {min(c[name] for c in costs):.2f}' for name in costs[0]))

    width, height = FLAGS.large_width, FLAGS.large_width * 2 // 3
    rng = np.random.default_rng(1)
    large = []
    for i in range(FLAGS.large_images):
      coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
      smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.int16)
      noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
      large.append(pathlib.Path(tmp) / f'large_{i}.jpg')
      Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(large[-1], quality=90)
    timings = {'draft': [], 'full': []}
    for _ in range(FLAGS.rounds):
      for name, decode in (('draft', lambda p: preprocessing.decode_image(p, size).pixels),
                           ('full', lambda p: decode_without_draft(p, size))):
        start = time.perf_counter()
        outputs = [decode(p) for p in large]
        timings[name].append(time.perf_counter() - start)
        if name == 'draft':
          drafted = outputs
    diff = np.abs(np.stack(drafted).astype(int) - np.stack(outputs).astype(int))
    print(f'{len(large)} JPEGs of {width}x{height} -> {size}: with draft '
          f'{len(large) / min(timings["draft"]):.1f} images/s, without '
          f'{len(large) / min(timings["full"]):.1f}; pixel difference mean {diff.mean():.2f}, '
          f'99th percentile {np.percentile(diff, 99):.0f}, max {diff.max()} (of 255)')


if __name__ == '__main__':
  cli.run(main)
