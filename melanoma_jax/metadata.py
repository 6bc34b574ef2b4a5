"""Patient metadata (age, sex, anatomical site) as a model input.

The 2019 ISIC winner fed metadata through a small dense branch joined to the
image features, with dropout so the model cannot lean on it alone. Here:

- `encode` turns the builders' `age`, `sex`, `site` features (vocabulary of
  `datasets.vocabulary`, missing values allowed) into a fixed float vector
  with explicit "unknown" indicators, so a missing value is an input the
  model learns about, not a zero that looks like a value;
- `MetadataModel` wraps any image model whose classifier is a Dense named
  `head` (every model of this project): it takes the features that head
  would get, joins the metadata branch, and classifies with its own `head`.
  In training, each example's whole metadata is replaced by "all unknown"
  with probability `feature_dropout`, so the model also works without it;
- `read_csv` reads the same fields from a CSV for prediction.
"""

from collections.abc import Mapping
from typing import Any

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from melanoma_jax import errors, models
from melanoma_jax.datasets import groups_csv
from melanoma_jax.datasets import tables
from melanoma_jax.datasets import vocabulary

# age / 100, age unknown; female, male, sex unknown; each site, site unknown.
NUM_FEATURES = 2 + len(vocabulary.SEXES) + 1 + len(vocabulary.SITES) + 1
BACKBONE = 'image_model'  # The image model's variables inside a `MetadataModel`'s.
_AGE_SCALE = 100.0


def encode(age: np.ndarray, sex: np.ndarray, site: np.ndarray) -> np.ndarray:
  """float32 [N, NUM_FEATURES] from per-example age (-1: unknown), sex and site ('' unknown)."""
  age = np.asarray(age, np.float32)
  known_age = age >= 0
  columns = [np.where(known_age, age / _AGE_SCALE, 0.0), ~known_age]
  columns += [np.asarray(sex) == s for s in vocabulary.SEXES]
  columns.append(~np.isin(sex, vocabulary.SEXES))
  columns += [np.asarray(site) == s for s in vocabulary.SITES]
  columns.append(~np.isin(site, vocabulary.SITES))
  return np.stack(columns, axis=-1).astype(np.float32)


def unknown(n: int) -> np.ndarray:
  """The encoding of n examples whose metadata is all unknown."""
  return encode(np.full(n, vocabulary.MISSING_AGE), np.full(n, ''), np.full(n, ''))


def from_extras(extras: Mapping[str, np.ndarray], n: int) -> np.ndarray:
  """Encoded metadata of a split's `Examples.extras`; all unknown if the dataset has none."""
  if 'age' not in extras:
    return unknown(n)
  return encode(extras['age'], extras['sex'], extras['site'])


class MetadataModel(nn.Module):
  """An image model with a metadata branch joined before a new classifier `head`.

  Attributes:
    backbone: the image model; its own `head` is never run (nor initialised).
    num_classes: head units.
    hidden: units of the metadata branch.
    feature_dropout: training-time probability of hiding an example's metadata.
    axis_name: the device axis BatchNorm averages over (passed to the backbone).
    dtype: compute dtype.
  """
  backbone: nn.Module
  num_classes: int
  hidden: int = 32
  feature_dropout: float = 0.3
  axis_name: str | None = None
  dtype: Any = jnp.float32

  uses_metadata = True  # steps pass batch['metadata'] to models that say so.

  @property
  def preprocessing(self) -> str | None:
    return getattr(self.backbone, 'preprocessing', None)

  def _image_features(self, images: jax.Array, train: bool) -> jax.Array:
    """What the backbone's `head` gets, captured instead of calling it."""
    captured = []

    def before_head(next_fun, args, kwargs, context):
      module = context.module
      if (module.name == 'head' and context.method_name == '__call__'
          and module.parent is not None and module.parent.name == BACKBONE):
        captured.append(args[0])
        return jnp.zeros((*args[0].shape[:-1], 1), args[0].dtype)
      return next_fun(*args, **kwargs)

    backbone = self.backbone.clone(axis_name=self.axis_name, name=BACKBONE, parent=self)
    with nn.intercept_methods(before_head):
      backbone(images, train=train)
    if len(captured) != 1:
      raise ValueError(f'{type(self.backbone).__name__} called a Dense named head {len(captured)} '
                       'times; the metadata branch needs it called once, as the classifier.')
    return captured[0]

  @nn.compact
  def __call__(self, images: jax.Array, metadata: jax.Array | None = None, *,
               train: bool) -> jax.Array:
    features = self._image_features(images, train)
    if metadata is None:
      metadata = jnp.asarray(unknown(images.shape[0]))
    metadata = jnp.asarray(metadata, jnp.float32)
    if train and self.feature_dropout:
      hide = jax.random.bernoulli(self.make_rng('dropout'), self.feature_dropout,
                                  (metadata.shape[0], 1))
      metadata = jnp.where(hide, jnp.asarray(unknown(1)), metadata)
    branch = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='metadata_dense')(metadata))
    joined = jnp.concatenate([features, branch.astype(features.dtype)], axis=-1)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(joined)
    return jnp.asarray(logits, jnp.float32)


def fit_pretrained(name: str, pretrained: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
  """`models.fit_pretrained` for a `MetadataModel`'s variables (`template`).

  The pretrained backbone (its BatchNorm statistics included) goes under
  `BACKBONE`, whose own head the wrapper never runs; the metadata branch and
  the new `head` keep `template`'s initialisation.
  """
  inner = {collection: tree[BACKBONE] for collection, tree in template.items() if BACKBONE in tree}
  fitted = models.fit_pretrained(name, pretrained, inner)
  return {collection: {**tree, BACKBONE: fitted[collection]} if collection in fitted else tree
          for collection, tree in template.items()}


# Column names accepted by `read_csv`, first match wins.
AGE_COLUMNS = ('age', 'age_approx')
SEX_COLUMNS = ('sex',)
SITE_COLUMNS = ('site', 'anatom_site_general', 'anatom_site_general_challenge', 'localization')


def read_csv(path: epath.PathLike) -> dict[str, np.ndarray]:
  """Encoded metadata by image key (`tables.image_key`) from a CSV of image, age, sex, site.

  Any of the builders' column names work (HAM10000's `image_id`, `age`,
  `localization`; ISIC's `image`/`image_name`, `age_approx`,
  `anatom_site_general[_challenge]`); a column may be absent (all unknown),
  a blank cell is unknown.

  Raises:
    errors.DatasetLayoutError: no image column, or a value outside the vocabulary.
  """
  path = epath.Path(path)
  if not path.is_file():
    raise errors.DatasetLayoutError(f'Metadata CSV {path} not found.')
  header = path.read_bytes().decode('utf-8-sig', errors='replace').splitlines()[:1]
  columns = [c.strip() for c in (header[0].split(',') if header else [])]
  image_column = next((c for c in groups_csv.IMAGE_COLUMNS if c in columns), None)
  if image_column is None:
    raise errors.DatasetLayoutError(
        f'Metadata CSV {path} needs an image column (one of {list(groups_csv.IMAGE_COLUMNS)}); '
        f'it has {columns}.')
  pick = lambda names: next((c for c in names if c in columns), None)
  age_column, sex_column, site_column = pick(AGE_COLUMNS), pick(SEX_COLUMNS), pick(SITE_COLUMNS)
  rows, skipped = tables.read_csv(path, (image_column,))
  if skipped:
    raise errors.DatasetLayoutError(f'Metadata CSV {path}: {skipped[0].file_name}: '
                                           f'{skipped[0].reason}.')
  encoded = {}
  for row in rows:
    value = lambda column: row.values[column] if column else ''
    source = 'ham10000' if site_column == 'localization' else 'isic'
    try:
      fields = tables.metadata(value(age_column), value(sex_column), value(site_column),
                               source=source)
    except tables.SkipRow as error:
      raise errors.DatasetLayoutError(
          f'Metadata CSV {path} line {row.line}: {error}.') from None
    encoded[tables.image_key(row.values[image_column])] = encode(
        [fields['age']], [fields['sex']], [fields['site']])[0]
  return encoded
