"""Images left in the prepared TFDS files, read by index on demand.

Streaming keeps only the small per-example columns (labels, file names,
groups, metadata) in host memory; an image is read from its TFRecord shard
when the stream needs it, then decoded and resized to the training size.
TFDS writes uncompressed TFRecord shards, whose records are framed as
[uint64 length][uint32 CRC][data][uint32 CRC]: one pass over the frame
headers (seeking over the data) gives every record's offset, so any record
is one positioned read away. Datasets already prepared need no
re-preparation and no other file format.
"""

import dataclasses
import functools
import os
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from melanoma_jax import preprocessing
from melanoma_jax.errors import DataError

_HEADER_BYTES = 12  # uint64 length + its uint32 masked CRC
_FOOTER_BYTES = 4  # uint32 masked CRC of the data
_IMAGE_FEATURE = {'image': tf.io.FixedLenFeature([], tf.string)}


def _is_local(path: str) -> bool:
  return '://' not in path


# What to do about prepared files that are damaged.
_REPREPARE = 'delete the dataset folder and rerun with --mode=prepare.'

# tf.data's autotuning off: an autotuned iterator, once done, waits for its
# tuning thread's next wake-up (up to a minute) before it is freed, which
# stalled the end of every training epoch. Parallel maps then use as many
# threads as the CPU has.
_OPTIONS = tf.data.Options()
_OPTIONS.autotune.enabled = False


def as_numpy(ds: tf.data.Dataset) -> Iterator:
  """`ds`'s elements as NumPy (`tfds.as_numpy`), with tf.data's autotuning off."""
  return iter(tfds.as_numpy(ds.with_options(_OPTIONS)))


class RecordFiles:
  """Random access to the serialized examples of one prepared TFDS split, in `as_dataset` order."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
      raise DataError(
          f'{builder.info.full_name} in {builder.data_dir} is stored as {builder.info.file_format}; '
          'streaming reads TFRecord shards. Delete that folder and rerun with --mode=prepare '
          'to prepare it again, or set --config.streaming=False.')
    self.name = f'{builder.info.full_name}:{split}'
    instructions = builder.info.splits[split].file_instructions
    self._paths = [os.fspath(i.filename) for i in instructions]
    self._ranges = [(i.skip, i.take) for i in instructions]
    files, offsets, lengths = [], [], []
    for file, instruction in enumerate(instructions):
      starts, sizes = _scan_frames(self._paths[file])
      if len(starts) != instruction.examples_in_shard:
        raise DataError(f'{self._paths[file]} holds {len(starts)} records where the dataset info '
                        f'says {instruction.examples_in_shard}: the prepared files are damaged; {_REPREPARE}')
      take = slice(instruction.skip, instruction.skip + instruction.take)
      files.append(np.full(len(starts[take]), file, np.int32))
      offsets.append(starts[take])
      lengths.append(sizes[take])
    self._file = np.concatenate(files) if files else np.zeros(0, np.int32)
    self._offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    self._length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()
    weakref.finalize(self, _close_all, self._fds)

  def __len__(self) -> int:
    return len(self._offset)

  def _fd(self, file: int) -> int:
    with self._lock:
      if file not in self._fds:
        self._fds[file] = os.open(self._paths[file], os.O_RDONLY)
      return self._fds[file]

  def columns(self, features: tfds.features.FeaturesDict) -> Iterator[dict[str, np.ndarray]]:
    """Every example's features but the image, in order, 1024 examples at a time.

    Records are read one by one, in one thread: a pipeline reading ahead in
    parallel (as `as_dataset` does) would hold many images at once, more of
    them the larger the dataset.
    """
    def parse(serialized):
      example = features.deserialize_example(serialized, decoders={'image': tfds.decode.SkipDecoding()})
      return {k: v for k, v in example.items() if k != 'image'}

    shards = [tf.data.TFRecordDataset(path).skip(skip).take(take)
              for path, (skip, take) in zip(self._paths, self._ranges)]
    if not shards:
      return iter(())
    ds = functools.reduce(lambda a, b: a.concatenate(b), shards)
    return as_numpy(ds.map(parse).batch(1024))

  def read(self, records: np.ndarray) -> list[bytes]:
    """The serialized examples at positions `records` of the split."""
    out = []
    for record in np.asarray(records, np.int64).reshape(-1):
      file, offset, length = self._file[record], self._offset[record], self._length[record]
      start = int(offset) + _HEADER_BYTES
      if _is_local(self._paths[file]):
        data = os.pread(self._fd(file), int(length), start)
      else:
        with tf.io.gfile.GFile(self._paths[file], 'rb') as f:
          f.seek(start)
          data = f.read(int(length))
      if len(data) != length:
        raise DataError(f'{self._paths[file]} ends inside record {record}: the prepared files are '
                        f'damaged; {_REPREPARE}')
      out.append(data)
    return out


def _close_all(fds: dict[int, int]) -> None:
  for fd in fds.values():
    os.close(fd)


def _scan_frames(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(offset, data length) of every record of a TFRecord file, reading only the frame headers."""
  starts, sizes = [], []
  with epath.Path(path).open('rb') as f:
    position = 0
    while True:
      header = f.read(_HEADER_BYTES)
      if not header:
        break
      if len(header) < _HEADER_BYTES:
        raise DataError(f'{path} is truncated: {_REPREPARE}')
      (length,) = struct.unpack('<Q', header[:8])
      starts.append(position)
      sizes.append(length)
      position += _HEADER_BYTES + length + _FOOTER_BYTES
      f.seek(position)
    if f.seek(0, os.SEEK_END) != position:
      raise DataError(f'{path} is truncated: {_REPREPARE}')
  return np.array(starts, np.int64), np.array(sizes, np.int64)


def decode_serialized(serialized: tf.Tensor, image_size: int) -> tf.Tensor:
  """The uint8 [image_size, image_size, 3] image of one serialized example (a TF op).

  Stored images are lossless PNG squares, decoded and resized exactly as
  `input_pipeline` resizes them in memory, so both give the same pixels.
  """
  png = tf.io.parse_single_example(serialized, _IMAGE_FEATURE)['image']
  return preprocessing.resize(tf.io.decode_png(png, channels=3), image_size)


@dataclasses.dataclass(frozen=True, eq=False)
class StoredImages:
  """A split's images as a read-only, lazy uint8 array [N, image_size, image_size, 3].

  Example i is record `record[i]` of `files[file[i]]`. `take` and `concat`
  select without reading; indexing (`images[i]`, `images[idx]`) or
  `np.asarray` reads and decodes, for the few images a report or test needs.
  Streams read `serialized` and decode in parallel tf.data maps.
  """
  files: tuple[RecordFiles, ...]
  file: np.ndarray
  record: np.ndarray
  image_size: int

  dtype = np.dtype(np.uint8)
  ndim = 4

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.record), self.image_size, self.image_size, 3)

  def __len__(self) -> int:
    return len(self.record)

  @classmethod
  def of_split(cls, files: RecordFiles, image_size: int) -> 'StoredImages':
    return cls((files,), np.zeros(len(files), np.int32), np.arange(len(files), dtype=np.int64),
               image_size)

  def take(self, indices: np.ndarray) -> 'StoredImages':
    return dataclasses.replace(self, file=self.file[indices], record=self.record[indices])

  @classmethod
  def concat(cls, parts: Sequence['StoredImages']) -> 'StoredImages':
    files, file_index = [], []
    for part in parts:
      remap = np.array([next((i for i, f in enumerate(files) if f is own), None) for own in part.files],
                       dtype=object)
      for i, own in enumerate(part.files):
        if remap[i] is None:
          remap[i] = len(files)
          files.append(own)
      file_index.append(remap.astype(np.int32)[part.file])
    return cls(tuple(files), np.concatenate(file_index), np.concatenate([p.record for p in parts]),
               parts[0].image_size)

  def serialized(self, indices: np.ndarray) -> np.ndarray:
    """Serialized examples [len(indices)] (bytes objects) of examples `indices`."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty(len(indices), object)
    which = self.file[indices]
    for f in np.unique(which):
      at = np.flatnonzero(which == f)
      out[at] = self.files[f].read(self.record[indices[at]])
    return out

  def __getitem__(self, key) -> np.ndarray:
    indices = np.arange(len(self))[key]
    batch = np.stack([decode_serialized(s, self.image_size).numpy()
                      for s in self.serialized(np.atleast_1d(indices))]) if np.size(indices) else \
        np.zeros((0, *self.shape[1:]), np.uint8)
    return batch[0] if np.ndim(indices) == 0 else batch

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy
    array = self[:]
    return array if dtype is None else array.astype(dtype)

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]


def with_images(examples: tf.data.Dataset, images: 'np.ndarray | StoredImages',
                chunk: int) -> tf.data.Dataset:
  """`examples` (dicts with an int64 'index') with each one's uint8 'image' added, in order.

  Reads `chunk` examples at a time with one Python call (the images are
  never copied into the tf.data graph), then decodes and resizes stored
  images in parallel.
  """
  stored = isinstance(images, StoredImages)

  def read(batch):
    if stored:
      image = tf.numpy_function(images.serialized, [batch['index']], tf.string, stateful=False)
      image.set_shape([None])
    else:
      image = tf.numpy_function(lambda i: images[i], [batch['index']], tf.uint8, stateful=False)
      image.set_shape([None, *images.shape[1:]])
    return {**batch, 'image': image}

  ds = examples.batch(chunk).map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.unbatch()
  if stored:
    ds = ds.map(lambda ex: {**ex, 'image': decode_serialized(ex['image'], images.image_size)},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds
