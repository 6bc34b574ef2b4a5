"""Data: load a TFDS dataset, split it, and feed per-host device batches.

Train/validation is split on whole groups (lesion or patient; each image is
its own group when nothing better is known), stratified by class, before any
augmentation, so no image or copy of one lands on both sides; with
`config.num_folds` the validation split is fold `config.fold` of a grouped,
stratified k-fold partition of Train. Test is only
for the final evaluation.

A split's small columns (labels, file names, groups, metadata) are held in
memory. Its images are either held too, as uint8 arrays at the training
resolution (the ISIC archive at 180x180 is ~220 MB), or streamed: read by
index from the prepared files, decoded and resized on the fly
(`data_sources`), so host memory does not grow with the dataset
(`config.streaming`; None streams datasets whose images would take more
than STREAM_ABOVE_BYTES). The training stream is a tf.data pipeline over
indices into the split, seeded per epoch and independent of where the
images live, so epoch `e` yields the same batches whether or not the run
was resumed, and whether or not it streams.
"""

import dataclasses
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from melanoma_jax import data_sources, datasets, errors, preprocessing
from melanoma_jax import metadata as metadata_lib
from melanoma_jax.errors import DataError
from melanoma_jax.datasets import groups_csv, preparation
from melanoma_jax.datasets import tables, vocabulary

# Test is carved from train with this seed, not config.seed, so every run
# (any seed, any fold) is tested on the same images.
TEST_CARVE_SEED = 0
# config.streaming=None streams when all splits' images at the training
# size would take more host memory than this: the ISIC archive and the full
# synthetic dataset stream at 180 px; tiny datasets are held in memory, where
# the stream skips decoding each image once per epoch.
STREAM_ABOVE_BYTES = 128 << 20
# Examples read with one Python call by the streams.
READ_CHUNK = 32

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Examples:
  """One split: images [N, H, W, 3] uint8 and integer labels [N].

  `images` is an array in memory, or `data_sources.StoredImages` (read from
  the prepared files on demand; indexing it reads and decodes).

  `extras` holds further per-example arrays [N]: the metadata features of
  builders that have them (`datasets.METADATA_FEATURES`) and, for combined
  datasets, `source` (index into `Data.sources`).
  """
  images: np.ndarray
  labels: np.ndarray
  file_names: np.ndarray
  group_ids: np.ndarray
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray) -> 'Examples':
    images = (self.images.take(indices) if isinstance(self.images, data_sources.StoredImages)
              else self.images[indices])
    return Examples(images, self.labels[indices],
                    self.file_names[indices], self.group_ids[indices],
                    {k: v[indices] for k, v in self.extras.items()})


@dataclasses.dataclass(frozen=True)
class Data:
  """The three splits the training loop uses, and the label names.

  `stored_image_size` is the side of the dataset's stored squares, which the
  splits were resized from (`preprocessing`): prediction on files needs it.
  """
  train: Examples
  val: Examples
  test: Examples
  class_names: tuple[str, ...]
  stored_image_size: int | None = None
  sources: tuple[str, ...] = ()  # The datasets combined, when config.dataset names several.


def prepared_builder(config: ml_collections.ConfigDict,
                     dataset: str | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `dataset` (default `config.dataset`), prepared once on first use."""
  dataset = dataset or config.dataset
  builder_class = datasets.BUILDERS.get(dataset.split('/')[0].split(':')[0])
  if builder_class is None:
    raise DataError(f'Unknown dataset {dataset!r} (config.dataset); the datasets are '
                    f'{sorted(datasets.BUILDERS)}, each optionally with /<config>.')
  # image_folder discovers its class names from the tree when constructed;
  # once prepared it needs no tree (evaluating a run after the tree moved).
  kwargs = {'manual_dir': config.manual_dir} if getattr(builder_class, 'TREE_AT_CONSTRUCTION', False) else {}
  tree_missing = bool(kwargs) and bool(config.manual_dir) and not epath.Path(config.manual_dir).exists()
  preprocessed = _preprocessed_config(dataset, builder_class, config)
  try:
    try:
      builder = tfds.builder(dataset, data_dir=config.data_dir, **preprocessed,
                             **({} if tree_missing else kwargs))
    except errors.DatasetLayoutError:
      if not tree_missing:
        raise
      # Says what is missing.
      builder = tfds.builder(dataset, data_dir=config.data_dir, **preprocessed, **kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'Unknown dataset {dataset!r} (config.dataset). {e}') from e
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir))
  return builder


def _preprocessed_config(dataset: str, builder_class: type,
                         config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'config': the builder config of config.preprocess}, {} for the defaults.

  The options change the stored pixels, so they name the prepared dataset
  (`preprocessing.Preprocess.config_name`, e.g. '256px_border_sog6'): other
  options never reuse data prepared with these.
  """
  try:
    options = preprocessing.Preprocess.from_config(config)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if not options.tag:
    return {}
  name, _, named_config = dataset.partition('/')
  if not issubclass(builder_class, preparation.FolderBuilder):
    of_files = sorted(n for n, c in datasets.BUILDERS.items() if issubclass(c, preparation.FolderBuilder))
    raise DataError(f'config.preprocess ({options.tag}) applies to the datasets prepared from image '
                    f'files ({", ".join(of_files)}); {name} is not one: leave config.preprocess at '
                    'its defaults.')
  if named_config:
    raise DataError(f'config.dataset={dataset!r} names a builder config, and config.preprocess '
                    f'({options.tag}) chooses one too: write config.dataset={name!r}.')
  return {'config': builder_class.get_builder_config(options.config_name(preparation.DEFAULT_IMAGE_SIZE))}


def _read_split(builder: tfds.core.DatasetBuilder, split: str, image_size: int,
                stream: bool = False) -> Examples:
  """All examples of `split`, resized to image_size, in the builder's order.

  Streamed (`stream`), the images stay in the prepared files and only the
  other columns are kept.
  """

  def resize(example):
    return {**example, 'image': preprocessing.resize(example['image'], image_size)}

  if split not in builder.info.splits:
    raise DataError(
        f'{builder.info.full_name} in {builder.data_dir} has no {split!r} split (it has '
        f'{sorted(builder.info.splits)}): training needs train and test splits, i.e. Train/ and '
        'Test/ folders. Add the missing folder, delete the prepared dataset directory, and rerun.')
  if stream:
    stored = data_sources.RecordFiles(builder, split)
    columns, pixels = stored.columns(builder.info.features), None
  else:
    ds = builder.as_dataset(split=split, shuffle_files=False)
    columns = data_sources.as_numpy(ds.map(resize, num_parallel_calls=tf.data.AUTOTUNE).batch(256))
    # Images go straight into one array, so reading never holds them twice.
    pixels = np.empty((builder.info.splits[split].num_examples, image_size, image_size, 3), np.uint8)
  parts, filled = [], 0
  for part in columns:
    if pixels is not None:
      image = part.pop('image')
      pixels[filled:filled + len(image)] = image
      filled += len(image)
    parts.append(part)
  if not parts:
    raise DataError(f'Split {split!r} of {builder.info.full_name} is empty.')
  cat = lambda key: np.concatenate([p[key] for p in parts])
  # TFDS Text is UTF-8 bytes; numpy's astype(str) would decode ASCII only.
  text = lambda key: np.array([value.decode('utf-8') for value in cat(key)], dtype=str)
  file_names = text('file_name')
  # An image with no known lesion or patient is a group of its own.
  group_ids = np.where(cat('group_id') == b'', file_names, text('group_id'))
  extras = {k: cat(k).astype(np.float32) if k == 'age' else np.array([v.decode() for v in cat(k)])
            for k in datasets.METADATA_FEATURES if k in parts[0]}
  if stream:
    images = data_sources.StoredImages.of_split(stored, image_size)
    if len(images) != len(file_names):
      raise DataError(f'{images.files[0].name}: {len(images)} records but {len(file_names)} examples; '
                      'delete the prepared dataset folder and rerun with --mode=prepare.')
  else:
    images = pixels[:filled]
  return Examples(images, cat('label').astype(np.int32), file_names, group_ids, extras)


def split_by_group(labels: np.ndarray, group_ids: np.ndarray, val_fraction: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, val) indices: stratified by class, whole groups per side.

  A group's class is the label of its first image. Every class with at
  least two groups puts at least one group in validation.
  """
  groups, first, inverse = np.unique(group_ids, return_index=True, return_inverse=True)
  group_labels = labels[first]
  rng = np.random.default_rng(seed)
  val_groups = []
  for label in np.unique(group_labels):
    members = np.flatnonzero(group_labels == label)
    n_val = int(round(len(members) * val_fraction))
    if len(members) >= 2:
      n_val = min(max(n_val, 1), len(members) - 1)
    val_groups.append(rng.permutation(members)[:n_val])
  is_val = np.zeros(len(groups), bool)
  is_val[np.concatenate(val_groups)] = True
  return np.flatnonzero(~is_val[inverse]), np.flatnonzero(is_val[inverse])


def assign_folds(labels: np.ndarray, group_ids: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
  """The cross-validation fold [N] of every example: whole groups per fold, stratified by class.

  A group's class is the label of its first image (as in `split_by_group`).
  Class by class, groups in a seeded random order (largest first) go to the
  fold holding fewest images of that class so far (then fewest images), so
  per-class counts differ between folds by at most the largest group.
  """
  groups, first, inverse, sizes = np.unique(group_ids, return_index=True, return_inverse=True,
                                            return_counts=True)
  if not 2 <= num_folds <= len(groups):
    raise ValueError(f'num_folds={num_folds} must be in [2, {len(groups)}] (the number of lesion '
                     'or patient groups).')
  group_labels = labels[first]
  classes = np.unique(group_labels)
  rng = np.random.default_rng(seed)
  class_counts = np.zeros((len(classes), num_folds), np.int64)
  totals = np.zeros(num_folds, np.int64)
  group_fold = np.empty(len(groups), np.int64)
  for c, label in enumerate(classes):
    members = rng.permutation(np.flatnonzero(group_labels == label))
    for g in members[np.argsort(-sizes[members], kind='stable')]:
      fold = np.lexsort((np.arange(num_folds), totals, class_counts[c]))[0]
      group_fold[g] = fold
      class_counts[c, fold] += sizes[g]
      totals[fold] += sizes[g]
  return group_fold[inverse.reshape(-1)]


def carve_test(examples: Examples, test_fraction: float) -> tuple[Examples, Examples]:
  """(train, test) of a dataset published without test labels: whole groups, stratified."""
  if not 0 < test_fraction < 1:
    raise DataError(f'config.test_fraction={test_fraction} must be in (0, 1): this dataset has no '
                    'test split, so Test is carved from train.')
  train_idx, test_idx = split_by_group(examples.labels, examples.group_ids, test_fraction,
                                       TEST_CARVE_SEED)
  logging.info('No test split: Test is %d images carved from train by group (test_fraction=%s).',
               len(test_idx), test_fraction)
  return examples.take(train_idx), examples.take(test_idx)


def _single_splits(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, stream: bool
                   ) -> tuple[Examples, Examples, tuple[str, ...], int]:
  """(train, test, class names, stored image size) of one dataset; Test carved if unpublished."""
  class_names = tuple(builder.info.features['label'].names)
  train_full = _read_split(builder, 'train', config.image_size, stream)
  if 'test' not in builder.info.splits and getattr(builder, 'TEST_FROM_TRAIN', False):
    train_full, test = carve_test(train_full, config.test_fraction)
  else:
    test = _read_split(builder, 'test', config.image_size, stream)
  return train_full, test, class_names, builder.info.features['image'].shape[0]


def combined_sources(dataset: str) -> tuple[str, ...]:
  """The datasets `config.dataset` names: 'isic2019+isic2020' -> ('isic2019', 'isic2020')."""
  names = tuple(name.strip() for name in dataset.split('+'))
  if not all(names) or len(set(names)) != len(names):
    raise DataError(f'config.dataset={dataset!r}: name each dataset once, joined by "+", '
                    "e.g. 'isic2019+isic2020'.")
  return names


def _concat(parts: list[Examples]) -> Examples:
  """One split of several sources; metadata features any source lacks are unknown there."""
  keys = set().union(*(p.extras for p in parts))
  extras = {}
  for key in keys:
    columns = [p.extras.get(key, np.full(len(p), tables.MISSING_METADATA.get(key, '')))
               for p in parts]
    extras[key] = np.concatenate(columns)
    if key == 'age':
      extras[key] = extras[key].astype(np.float32)
  cat = lambda attribute: np.concatenate([getattr(p, attribute) for p in parts])
  images = (data_sources.StoredImages.concat([p.images for p in parts])
            if isinstance(parts[0].images, data_sources.StoredImages) else cat('images'))
  return Examples(images, cat('labels'), cat('file_names'), cat('group_ids'), extras)


def _combined_splits(config: ml_collections.ConfigDict, sources: tuple[str, ...],
                     builders: list[tfds.core.DatasetBuilder], stream: bool
                     ) -> tuple[Examples, Examples, tuple[str, ...], int]:
  """(train, test, class names, stored size) of several datasets in the common class vocabulary.

  Labels map to `vocabulary.COMMON_CLASSES`; the classes are the union of
  the sources'. An image id already taken from an earlier source is dropped
  (ISIC 2019 contains HAM10000), so no image can be on both sides of a split.
  Each example's source index is in `extras['source']`.
  """
  loaded = [_single_splits(config, builder, stream) for builder in builders]
  try:
    common = {name: [vocabulary.to_common(name, c) for c in classes]
              for name, (_, _, classes, _) in zip(sources, loaded)}
  except ValueError as e:
    raise DataError(str(e)) from None
  names = vocabulary.common_classes({c for classes in common.values() for c in classes})
  seen, trains, tests = set(), [], []
  stored_sizes = {name: size for name, (*_, size) in zip(sources, loaded)}
  if len(set(stored_sizes.values())) > 1:
    raise DataError(f'Datasets combined in config.dataset are stored at different sizes '
                    f'{stored_sizes}; prepare them at one size, as prediction decodes at one.')
  for index, (name, (train, test, _, _)) in enumerate(zip(sources, loaded)):
    to_union = np.array([names.index(c) for c in common[name]], np.int32)
    for split, out in ((train, trains), (test, tests)):
      keys = [tables.image_key(f) for f in split.file_names]
      keep = np.array([k not in seen for k in keys], bool)
      seen.update(keys)
      if not keep.all():
        logging.info('%s: %d images already in an earlier dataset left out.', name, (~keep).sum())
      split = split.take(np.flatnonzero(keep))
      out.append(dataclasses.replace(split, labels=to_union[split.labels], extras={
          **split.extras, 'source': np.full(len(split), index, np.int32)}))
  logging.info('Combined %s: %d classes %s.', '+'.join(sources), len(names), names)
  return _concat(trains), _concat(tests), names, loaded[0][3]


def source_weights(config: ml_collections.ConfigDict) -> np.ndarray:
  """Normalised sampling weights per source from 'name:weight,...' (config.source_weights)."""
  sources = combined_sources(config.dataset)
  weights = {}
  for item in config.source_weights.split(','):
    name, _, value = item.partition(':')
    try:
      weights[name.strip()] = float(value)
    except ValueError:
      raise DataError(f'config.source_weights={config.source_weights!r}: write name:weight pairs, '
                      f"e.g. '{sources[0]}:1,{sources[-1]}:0.5'.") from None
  if set(weights) != set(sources) or min(weights.values()) < 0 or not sum(weights.values()):
    raise DataError(f'config.source_weights={config.source_weights!r} must give a weight >= 0 to '
                    f'each of {list(sources)} (config.dataset), some above 0.')
  total = sum(weights.values())
  return np.array([weights[name] / total for name in sources])


def _source_index_stream(train: Examples, config: ml_collections.ConfigDict,
                         seed: int) -> tf.data.Dataset:
  """Endless indices drawing each source with its weight; classes balanced within a source if asked."""
  weights = source_weights(config)
  streams, kept = [], []
  for index, weight in enumerate(weights):
    members = np.flatnonzero(train.extras['source'] == index)
    if not weight:
      continue
    if not len(members):
      raise DataError(f'config.source_weights gives {combined_sources(config.dataset)[index]} a '
                      'weight, but none of its images is in the training split.')
    present, local = np.unique(train.labels[members], return_inverse=True)
    stream = _index_stream(local, config.balance_classes, len(present), seed + 7919 * (index + 1))
    streams.append(stream.map(lambda i, m=tf.constant(members, tf.int64): tf.gather(m, i)))
    kept.append(float(weight))
  return tf.data.Dataset.sample_from_datasets(streams, weights=kept, seed=seed)


def streaming(config: ml_collections.ConfigDict, num_examples: int) -> bool:
  """Whether to stream images (config.streaming: True, False, or None: by size) for a dataset this big."""
  choice = config.get('streaming')
  if choice is None:
    return num_examples * config.image_size ** 2 * 3 > STREAM_ABOVE_BYTES
  if not isinstance(choice, bool):
    raise DataError(f'config.streaming={choice!r} must be True, False or None (by dataset size).')
  return choice


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Reads Train and Test, maps labels to the task, splits off validation."""
  sources = combined_sources(config.dataset)
  builders = [prepared_builder(config, name) for name in sources]
  stream = streaming(config, sum(s.num_examples for b in builders for s in b.info.splits.values()))
  logging.info('Images %s.', 'streamed from the prepared files' if stream else 'held in memory')
  if len(sources) > 1:
    train_full, test, class_names, stored_size = _combined_splits(config, sources, builders, stream)
  else:
    train_full, test, class_names, stored_size = _single_splits(config, builders[0], stream)
  if config.task == 'melanoma_vs_rest':
    if datasets.MELANOMA not in class_names:
      raise DataError(f'task=melanoma_vs_rest needs a {datasets.MELANOMA!r} class; '
                      f'{config.dataset} has {class_names}.')
    melanoma = class_names.index(datasets.MELANOMA)
    binary = lambda ex: dataclasses.replace(ex, labels=(ex.labels == melanoma).astype(np.int32))
    train_full, test = binary(train_full), binary(test)
    class_names = ('other', datasets.MELANOMA)
  elif config.task != 'multiclass':
    raise DataError(f"config.task must be 'multiclass' or 'melanoma_vs_rest', got {config.task!r}.")
  if config.groups_csv:
    groups = groups_csv.match_groups(train_full.file_names, groups_csv.read_groups_csv(
        config.groups_csv), f'Groups CSV {config.groups_csv}')
    if not groups:
      raise DataError(f'No training image is named in {config.groups_csv} (config.groups_csv); '
                      f'its image column must hold file names such as {train_full.file_names[0]!r}.')
    logging.info('Groups CSV: %d of %d training images matched; the rest are their own group.',
                 len(groups), len(train_full))
    train_full = dataclasses.replace(train_full, group_ids=np.array(
        [groups.get(name, name) for name in train_full.file_names]))
  if config.get('num_folds'):
    try:
      folds = assign_folds(train_full.labels, train_full.group_ids, config.num_folds, config.seed)
    except ValueError as e:
      raise DataError(f'config.{e}') from None
    train_idx, val_idx = np.flatnonzero(folds != config.fold), np.flatnonzero(folds == config.fold)
  else:
    train_idx, val_idx = split_by_group(train_full.labels, train_full.group_ids,
                                        config.val_fraction, config.seed)
  return Data(train_full.take(train_idx), train_full.take(val_idx), test, class_names,
              stored_image_size=stored_size, sources=sources if len(sources) > 1 else ())


def host_shard(examples: Examples) -> Examples:
  """This process's disjoint share of a split."""
  return examples.take(np.arange(jax.process_index(), len(examples), jax.process_count()))


def _augment(image: tf.Tensor, seed: tf.Tensor, augment: ml_collections.ConfigDict) -> tf.Tensor:
  """Random geometry and colour, a pure function of (image, seed).

  Lesions have no canonical orientation, so flips on both axes and rotation
  over the full circle (by default); zoom, and jitter of brightness,
  contrast, saturation and hue for differences between dermoscopes.
  """
  seeds = tf.random.experimental.stateless_split(seed, 8)
  if augment.flips:
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
    image = tf.image.stateless_random_flip_up_down(image, seeds[1])
  max_angle = augment.rotation_degrees * math.pi / 180.0
  angle = tf.random.stateless_uniform([], seeds[2], -max_angle, max_angle)
  scale = tf.random.stateless_uniform([], seeds[3], 1.0 - augment.zoom, 1.0 + augment.zoom)
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = (size[0] - 1) / 2, (size[1] - 1) / 2
  # Output pixel p samples input pixel centre + R(angle) (p - centre) / scale.
  a0, a1 = tf.cos(angle) / scale, -tf.sin(angle) / scale
  b0, b1 = tf.sin(angle) / scale, tf.cos(angle) / scale
  transform = tf.stack([a0, a1, cx - a0 * cx - a1 * cy,
                        b0, b1, cy - b0 * cx - b1 * cy, 0.0, 0.0])
  image = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None] / 255.0, transforms=transform[None],
      output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation='BILINEAR', fill_mode='REFLECT')[0]
  if augment.brightness:
    image = tf.image.stateless_random_brightness(image, augment.brightness, seeds[4])
  if augment.contrast:
    image = tf.image.stateless_random_contrast(image, 1 - augment.contrast, 1 + augment.contrast, seeds[5])
  if augment.saturation:
    image = tf.image.stateless_random_saturation(
        image, 1 - augment.saturation, 1 + augment.saturation, seeds[6])
  if augment.hue:
    image = tf.image.stateless_random_hue(image, augment.hue, seeds[7])
  return tf.cast(tf.clip_by_value(tf.round(image * 255.0), 0, 255), tf.uint8)


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
  """An epoch is as many examples as the train split holds, rounded up to whole batches."""
  return max(1, math.ceil(num_train_examples / global_batch_size))


def _index_stream(labels: np.ndarray, balance: bool, num_classes: int, seed: int) -> tf.data.Dataset:
  """Endless shuffled indices; balanced: every class equally likely per example."""
  if not balance:
    return tf.data.Dataset.range(len(labels)).shuffle(len(labels), seed=seed).repeat()
  per_class = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) == 0:
      raise DataError(f'Class {c} has no training examples on this host; cannot balance classes.')
    per_class.append(tf.data.Dataset.from_tensor_slices(members.astype(np.int64))
                     .shuffle(len(members), seed=seed + c).repeat())
  return tf.data.Dataset.sample_from_datasets(
      per_class, weights=[1.0 / num_classes] * num_classes, seed=seed)


def expected_draws_per_class(labels: np.ndarray, num_classes: int, balance: bool,
                             num_draws: int) -> np.ndarray:
  """How many examples of each class `num_draws` draws of the training stream hold, in expectation.

  Balanced, every class is equally likely per draw; otherwise each class
  comes up as often as it is stored.
  """
  if balance:
    return np.full(num_classes, num_draws / num_classes)
  return np.bincount(labels, minlength=num_classes) * num_draws / len(labels)


def train_batches(train: Examples, config: ml_collections.ConfigDict, num_classes: int,
                  epoch: int, num_steps: int, skip_steps: int = 0) -> Iterator[Batch]:
  """One epoch of this host's training batches (`train_dataset`'s, as NumPy)."""
  return data_sources.as_numpy(train_dataset(train, config, num_classes, epoch, num_steps, skip_steps))


def train_dataset(train: Examples, config: ml_collections.ConfigDict, num_classes: int,
                  epoch: int, num_steps: int, skip_steps: int = 0) -> tf.data.Dataset:
  """One epoch of this host's training batches, [local_devices, per_device, ...].

  Every host draws the same global stream of example indices, seeded by
  (seed, epoch), and reads and augments only its own slice of each global
  batch. So the global batches, and the training run, are the same whatever
  the number of hosts and devices, an epoch's stream is reproducible, and a
  run resumed mid-epoch skips its first `skip_steps` batches without
  preprocessing them. Images are read by index (`data_sources.with_images`)
  whether they are in memory or streamed, so both give the same batches.
  """
  devices = jax.local_device_count()
  hosts, host = jax.process_count(), jax.process_index()
  local_batch = config.batch_size // hosts
  seed = config.seed * 1_000_003 + epoch
  labels = tf.constant(train.labels)
  encoded_metadata = (tf.constant(metadata_lib.from_extras(train.extras, len(train)))
                      if config.model.get('metadata') else None)

  def mine(position, index):
    del index
    return (position % config.batch_size) // local_batch == host

  def example(features):
    position, index, image = features['position'], features['index'], features['image']
    if config.augment.enabled:
      image = _augment(image, tf.stack([tf.constant(seed, tf.int64), position]), config.augment)
    features = {'image': image, 'label': tf.gather(labels, index)}
    if encoded_metadata is not None:
      features['metadata'] = tf.gather(encoded_metadata, index)
    return features

  if 'source' in train.extras and config.get('source_weights'):
    ds = _source_index_stream(train, config, seed)
  else:
    ds = _index_stream(train.labels, config.balance_classes, num_classes, seed)
  ds = ds.take(num_steps * config.batch_size).enumerate().skip(skip_steps * config.batch_size)
  if hosts > 1:
    ds = ds.filter(mine)
  ds = ds.map(lambda position, index: {'position': position, 'index': index})
  ds = data_sources.with_images(ds, train.images, READ_CHUNK)
  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda b: tf.nest.map_structure(
      lambda x: tf.reshape(x, (devices, local_batch // devices, *x.shape[1:])), b))
  return ds.prefetch(2)


class BatchesAhead:
  """A training epoch's batches, its pipeline built and its first batch drawn on a thread.

  tf.data traces its functions when the pipeline is built and fills its
  buffers on the first batch. Started ahead (while the step compiles, or
  while the epoch before validates), that wait leaves the training loop's
  critical path; the batches are those `train_batches` gives.
  """

  def __init__(self, make: Callable[[], tf.data.Dataset]):
    self._built = threading.Event()
    self._spec = self._batches = self._error = None
    self._thread = threading.Thread(target=self._draw, args=(make,), name='batches-ahead', daemon=True)
    self._thread.start()

  def _draw(self, make: Callable[[], tf.data.Dataset]) -> None:
    try:
      dataset = make()
      self._spec = dataset.element_spec
      self._built.set()
      batches = data_sources.as_numpy(dataset)
      self._batches = itertools.chain([next(batches)], batches)
    except BaseException as e:  # raised again in the thread that asks
      self._error = e
    finally:
      self._built.set()

  def element_spec(self) -> dict[str, tf.TensorSpec]:
    """The batches' shapes and dtypes, once the pipeline is built (before its first batch)."""
    self._built.wait()
    if self._spec is None:
      raise self._error
    return self._spec

  def batches(self) -> Iterator[Batch]:
    """The epoch's batches, once the first is ready."""
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._batches


def eval_batches(examples: Examples, global_batch_size: int) -> Iterator[Batch]:
  """This host's batches of a split, each example exactly once.

  The last batch is padded and `mask` is 0 on padding; every host runs the
  same number of batches (that of the largest host share), as collective
  evaluation steps require.
  """
  devices = jax.local_device_count()
  local_batch = global_batch_size // jax.process_count()
  largest_share = math.ceil(len(examples) / jax.process_count())
  num_batches = max(1, math.ceil(largest_share / local_batch))
  mine = host_shard(examples)
  padded = num_batches * local_batch
  pad = lambda x: np.concatenate([x, np.zeros((padded - len(x), *x.shape[1:]), x.dtype)])
  arrays = {'label': pad(mine.labels), 'mask': pad(np.ones(len(mine), np.int32))}
  if 'age' in mine.extras:  # Models that take metadata use it; others ignore it.
    arrays['metadata'] = pad(metadata_lib.from_extras(mine.extras, len(mine)))
  images = _image_batches(mine.images, local_batch)
  for b in range(num_batches):
    image = next(images, np.zeros((0, *mine.images.shape[1:]), np.uint8))
    batch = {'image': np.concatenate([image, np.zeros((local_batch - len(image), *image.shape[1:]), np.uint8)])}
    batch.update((k, v[b * local_batch:(b + 1) * local_batch]) for k, v in arrays.items())
    yield {k: v.reshape(devices, local_batch // devices, *v.shape[1:]) for k, v in batch.items()}


def _image_batches(images: 'np.ndarray | data_sources.StoredImages', batch: int) -> Iterator[np.ndarray]:
  """A split's images in order, `batch` at a time (the last one shorter); stored ones decoded in parallel."""
  if not isinstance(images, data_sources.StoredImages):
    yield from (images[start:start + batch] for start in range(0, len(images), batch))
    return
  indices = tf.data.Dataset.range(len(images)).map(lambda i: {'index': i})
  ds = data_sources.with_images(indices, images, READ_CHUNK).map(lambda ex: ex['image'])
  yield from data_sources.as_numpy(ds.batch(batch).prefetch(2))
