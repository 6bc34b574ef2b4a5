"""Synthetic dermoscopy-like lesions in the 9 ISIC classes, built offline.

The images are procedurally generated for demos and tests; they are not medical
data and nothing learnt from them says anything about real skin lesions. They
exist so the whole framework (input pipeline, class balancing, training,
evaluation) can run end to end without the ISIC archive, on the archive's class
imbalance.

Each class has a profile of shape, colour and dermoscopic-structure parameters.
Every image blends its class profile with that of a look-alike class (seborrheic
keratosis with pigmented benign keratosis, dermatofibroma with nevus, actinic
keratosis with squamous or basal cell carcinoma, ...) by a random weight of up
to `difficulty`, so classes overlap and an unbalanced classifier gives the
ambiguous cases to the majority class.
"""

from collections.abc import Iterator
import dataclasses
import functools
import math

import numpy as np
import PIL.Image
from scipy import ndimage
import tensorflow_datasets as tfds

from melanoma_jax.datasets.features import ISIC_CLASSES
from melanoma_jax.datasets.features import ISIC_TRAIN_COUNTS
from melanoma_jax.datasets.features import LocalDatasetInfo
from melanoma_jax.datasets.features import lesion_features

# The one knob for how hard the task is: the largest weight with which an image
# takes on its look-alike class's profile (0 keeps the classes apart, 0.5 makes
# the hardest images halfway between two classes). At 0.25 a small CNN at 64px
# reaches about 0.85 balanced accuracy when trained on balanced data.
DEFAULT_DIFFICULTY = 0.25

# Smallest resolution images are rendered at; smaller images are rendered at a
# multiple of their size and averaged down, so fine structures do not alias.
_MIN_RENDER_SIZE = 64

_Rgb = tuple[float, float, float]

# Pigment, darkest first, and the blue-grey of deep pigment.
_BLACK = (0.14, 0.10, 0.09)
_DARK_BROWN = (0.33, 0.20, 0.14)
_MID_BROWN = (0.52, 0.33, 0.22)
_LIGHT_BROWN = (0.70, 0.50, 0.36)
_BLUE_GREY = (0.42, 0.47, 0.58)
# Extra colours of multicoloured (melanoma-like) lesions.
_ATYPICAL_PALETTE = np.array(
    [_BLACK, _BLUE_GREY, _LIGHT_BROWN, _DARK_BROWN, (0.62, 0.28, 0.24)], np.float32)
# Colours of particular structures.
_VEIL = (0.60, 0.66, 0.76)
_SCAR_WHITE = (0.93, 0.88, 0.85)
_KERATIN = (0.93, 0.88, 0.74)
_CRUST = (0.42, 0.20, 0.13)
_VESSEL_RED = (0.72, 0.10, 0.16)
_LACUNA_PURPLE = (0.38, 0.08, 0.18)
_PINK = (0.90, 0.58, 0.56)

# Skin tones (RGB in [0, 1]) and how often each is drawn; mostly fair, as in ISIC.
_SKIN_TONES = np.array([
    (0.94, 0.79, 0.73), (0.91, 0.73, 0.65), (0.86, 0.67, 0.57),
    (0.79, 0.59, 0.47), (0.67, 0.48, 0.37), (0.53, 0.37, 0.28),
], np.float32)
_SKIN_TONE_WEIGHTS = np.array([0.3, 0.3, 0.2, 0.12, 0.06, 0.02])
# Hair drawn over some images (see `_add_nuisances`).
_HAIR = (0.12, 0.08, 0.07)


@dataclasses.dataclass(frozen=True)
class _Profile:
  """What a class looks like: shape, colours, and structure probabilities.

  Structure fields are the probability that an image shows the structure, so
  blending two profiles blends how often each cue appears.
  """
  size: float  # Mean lesion radius; the image spans [-1, 1].
  elongation: float  # Largest aspect ratio minus one.
  asymmetry: float  # Amplitude of the low border harmonics.
  irregularity: float  # Amplitude of the high border harmonics.
  softness: float  # Border width, relative to the radius.
  opacity: float  # How fully the lesion covers the skin.
  color: _Rgb
  center_color: _Rgb
  center: float  # Strength of the central colour.
  mottle: float  # Amplitude of the body's texture.
  multicolor: float  # Expected share of 3 extra atypical colour patches.
  halo: float  # Pink erythema around the lesion.
  network: float  # Pigment network (reticular lines).
  network_width: float  # 0.3 delicate ... 0.7 thick.
  network_atypia: float  # 0 regular ... 1 patchy, thick and warped.
  dots: float  # Dark dots and globules.
  dots_peripheral: float  # 0 spread evenly ... 1 at the rim.
  streaks: float  # Radial streaks at the rim.
  veil: float  # Blue-white veil.
  regression: float  # White scar-like areas with grey peppering.
  central_scar: float  # Central white patch (dermatofibroma).
  ridges: float  # Cerebriform fissures and ridges.
  fingerprint: float  # Parallel fingerprint-like lines.
  milia: float  # White milia-like cysts.
  comedos: float  # Dark comedo-like openings.
  lacunae: float  # Red-purple lacunae with pale septa.
  arborizing: float  # Branching red vessels.
  dotted_vessels: float  # Dotted / glomerular red vessels.
  nests: float  # Blue-grey ovoid nests.
  keratin: float  # White-yellow scale or keratin mass.
  crust: float  # Haemorrhagic crust or ulceration.
  follicles: float  # White follicular openings (strawberry pattern).

  def blend(self, other: '_Profile', weight: float) -> '_Profile':
    """The profile `weight` of the way towards `other`."""
    values = {}
    for field in dataclasses.fields(self):
      a = np.asarray(getattr(self, field.name), np.float32)
      b = np.asarray(getattr(other, field.name), np.float32)
      values[field.name] = (1 - weight) * a + weight * b
    return _Profile(**values)


# The classes' profiles, a column a class (in ISIC_CLASSES order) and a row a
# `_Profile` field: AK actinic keratosis, BCC basal cell carcinoma, DF
# dermatofibroma, MEL melanoma, NV nevus, BKL pigmented benign keratosis, SK
# seborrheic keratosis, SCC squamous cell carcinoma, VASC vascular lesion.
_PROFILE_TABLE = {
    #                   AK     BCC    DF     MEL    NV     BKL    SK     SCC    VASC
    'size':            (0.55,  0.50,  0.40,  0.62,  0.50,  0.55,  0.55,  0.50,  0.38),
    'elongation':      (0.40,  0.35,  0.30,  0.35,  0.25,  0.40,  0.35,  0.30,  0.30),
    'asymmetry':       (0.10,  0.08,  0.05,  0.16,  0.04,  0.10,  0.08,  0.10,  0.06),
    'irregularity':    (0.10,  0.06,  0.03,  0.09,  0.025, 0.10,  0.06,  0.07,  0.05),
    'softness':        (0.20,  0.05,  0.14,  0.06,  0.10,  0.04,  0.025, 0.07,  0.04),
    'opacity':         (0.50,  0.70,  0.70,  0.95,  0.90,  0.70,  0.90,  0.85,  0.95),
    'center':          (0.10,  0.10,  0.00,  0.30,  0.50,  0.15,  0.20,  0.60,  0.35),
    'mottle':          (0.15,  0.10,  0.08,  0.15,  0.08,  0.15,  0.20,  0.15,  0.20),
    'multicolor':      (0.00,  0.00,  0.00,  0.85,  0.03,  0.05,  0.05,  0.00,  0.00),
    'halo':            (0.50,  0.10,  0.40,  0.05,  0.00,  0.00,  0.00,  0.30,  0.10),
    'network':         (0.85,  0.00,  0.85,  0.55,  0.65,  0.20,  0.05,  0.05,  0.00),
    'network_width':   (0.60,  0.40,  0.30,  0.60,  0.35,  0.45,  0.40,  0.50,  0.40),
    'network_atypia':  (0.30,  0.00,  0.10,  0.80,  0.10,  0.30,  0.00,  0.30,  0.00),
    'dots':            (0.05,  0.00,  0.05,  0.60,  0.40,  0.10,  0.05,  0.00,  0.00),
    'dots_peripheral': (0.00,  0.00,  0.00,  0.60,  0.30,  0.20,  0.00,  0.00,  0.00),
    'streaks':         (0.00,  0.00,  0.00,  0.45,  0.02,  0.00,  0.00,  0.00,  0.00),
    'veil':            (0.00,  0.00,  0.00,  0.50,  0.02,  0.00,  0.00,  0.00,  0.05),
    'regression':      (0.00,  0.20,  0.00,  0.40,  0.02,  0.05,  0.03,  0.00,  0.03),
    'central_scar':    (0.00,  0.00,  0.90,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00),
    'ridges':          (0.00,  0.00,  0.00,  0.03,  0.03,  0.15,  0.80,  0.00,  0.00),
    'fingerprint':     (0.00,  0.00,  0.00,  0.00,  0.00,  0.75,  0.10,  0.00,  0.00),
    'milia':           (0.00,  0.00,  0.00,  0.00,  0.02,  0.10,  0.85,  0.00,  0.00),
    'comedos':         (0.00,  0.00,  0.00,  0.03,  0.00,  0.10,  0.75,  0.00,  0.00),
    'lacunae':         (0.00,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00,  0.95),
    'arborizing':      (0.00,  0.90,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00),
    'dotted_vessels':  (0.20,  0.05,  0.00,  0.10,  0.00,  0.00,  0.00,  0.80,  0.00),
    'nests':           (0.00,  0.60,  0.00,  0.05,  0.00,  0.00,  0.00,  0.00,  0.00),
    'keratin':         (0.30,  0.03,  0.00,  0.00,  0.00,  0.00,  0.10,  0.90,  0.00),
    'crust':           (0.05,  0.25,  0.00,  0.00,  0.00,  0.00,  0.00,  0.50,  0.03),
    'follicles':       (0.90,  0.00,  0.00,  0.00,  0.00,  0.00,  0.00,  0.10,  0.00),
}
# Their body and centre colours.
_COLORS = {
    'actinic keratosis': ((0.86, 0.50, 0.48), (0.80, 0.40, 0.40)),
    'basal cell carcinoma': ((0.90, 0.70, 0.68), (0.85, 0.58, 0.58)),
    'dermatofibroma': ((0.68, 0.47, 0.38), _LIGHT_BROWN),
    'melanoma': ((0.42, 0.26, 0.18), _BLACK),
    'nevus': (_MID_BROWN, _DARK_BROWN),
    'pigmented benign keratosis': (_LIGHT_BROWN, _MID_BROWN),
    'seborrheic keratosis': ((0.50, 0.34, 0.24), _DARK_BROWN),
    'squamous cell carcinoma': ((0.84, 0.46, 0.44), _KERATIN),
    'vascular lesion': ((0.72, 0.18, 0.24), _LACUNA_PURPLE),
}
_PROFILES = {
    name: _Profile(color=_COLORS[name][0], center_color=_COLORS[name][1],
                   **{field: row[column] for field, row in _PROFILE_TABLE.items()})
    for column, name in enumerate(ISIC_CLASSES)}

# The classes each class is made to resemble.
_LOOKALIKES = {
    'actinic keratosis': ('squamous cell carcinoma', 'basal cell carcinoma'),
    'basal cell carcinoma': ('actinic keratosis', 'squamous cell carcinoma'),
    'dermatofibroma': ('nevus',),
    'melanoma': ('nevus', 'pigmented benign keratosis'),
    'nevus': ('melanoma', 'dermatofibroma'),
    'pigmented benign keratosis': ('seborrheic keratosis', 'nevus'),
    'seborrheic keratosis': ('pigmented benign keratosis',),
    'squamous cell carcinoma': ('actinic keratosis', 'basal cell carcinoma'),
    'vascular lesion': ('basal cell carcinoma', 'melanoma'),
}


@functools.lru_cache(maxsize=64)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
  """Gaussian interpolation from `cells` knots to `n` pixels, unit variance out."""
  pixels = (np.arange(n) + 0.5) / n * 2 - 1
  knots = (np.arange(cells) + 0.5) / cells * 2 - 1
  a = np.exp(-0.5 * ((pixels[:, None] - knots[None, :]) / (1.2 / cells)) ** 2)
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  a = a.astype(np.float32)
  a.setflags(write=False)
  return a


def _noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
  """Smooth noise with about `cells` features across; the draws ignore `n`."""
  a = _interp_matrix(n, cells)
  # einsum rather than matmul: these products are too small to gain from BLAS
  # threads, which cost many times the work itself on a busy machine.
  rows = np.einsum('ik,kl->il', a, rng.standard_normal((cells, cells), dtype=np.float32))
  return np.einsum('il,jl->ij', rows, a)


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 0.5 + 0.5 * np.tanh(0.5 * z)


def _blend(img: np.ndarray, color, alpha: np.ndarray) -> None:
  """Paints `color` (RGB or an image) over `img` in place with opacity `alpha`."""
  img += (np.asarray(color, np.float32) - img) * np.clip(alpha, 0, 1)[..., None]


def _splat(n: int, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Bilinearly deposits weighted points given in [-1, 1] onto an n x n grid."""
  px = (points[:, 0] + 1) * (n / 2) - 0.5
  py = (points[:, 1] + 1) * (n / 2) - 0.5
  x0, y0 = np.floor(px), np.floor(py)
  fx, fy = px - x0, py - y0
  out = np.zeros(n * n, np.float64)
  for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                    (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
    xi, yi = x0.astype(int) + dx, y0.astype(int) + dy
    ok = (xi >= 0) & (xi < n) & (yi >= 0) & (yi < n)
    out += np.bincount((yi * n + xi)[ok], (weights * w)[ok], n * n)
  return out.reshape(n, n).astype(np.float32)


def _blobs(n: int, points: np.ndarray, radius: float) -> np.ndarray:
  """Round blobs of peak about 1 and radius (sigma) `radius` at `points`."""
  sigma = max(radius * n / 2, 0.6)  # Narrower blobs would vanish between pixels.
  field = ndimage.gaussian_filter(_splat(n, points, np.ones(len(points))), sigma, truncate=3.0)
  return np.clip(field * (2 * math.pi * sigma ** 2), 0, 1)


def _strokes(n: int, curves: list[np.ndarray], width: float) -> np.ndarray:
  """Antialiased lines along polylines (each [k, 2] in [-1, 1]) of sigma `width`."""
  sigma = max(width * n / 2, 0.6)
  dense = []
  for curve in curves:
    seg = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0, arc[-1], max(2, int(arc[-1] * n) + 1))  # ~2 points a pixel.
    dense.append(np.stack([np.interp(t, arc, curve[:, 0]), np.interp(t, arc, curve[:, 1])], 1))
  points = np.concatenate(dense)
  field = ndimage.gaussian_filter(_splat(n, points, np.ones(len(points))), sigma, truncate=3.0)
  return np.clip(field * (math.sqrt(2 * math.pi) * sigma / 2), 0, 1)


def _curve(rng: np.random.Generator, start, heading: float, length: float,
           wiggle: float) -> np.ndarray:
  """A smooth random-walk polyline of 24 points."""
  turns = heading + np.cumsum(rng.normal(rng.normal(0, 2 * wiggle), wiggle, 23)) / 4
  steps = np.stack([np.cos(turns), np.sin(turns)], 1) * (length / 23)
  return np.concatenate([np.asarray(start)[None], start + np.cumsum(steps, axis=0)])


def _lines(phase: np.ndarray, width: float) -> np.ndarray:
  """Thin lines where `phase` crosses an integer, `width` is their relative width."""
  return np.exp(-(np.sin(np.pi * phase) / width) ** 2)


def _points_in_disk(rng: np.random.Generator, k: int, center, radius: float,
                    peripheral: float = 0.0) -> np.ndarray:
  """`k` points in a disk, pushed towards the rim as `peripheral` goes to 1."""
  r = radius * rng.random(k) ** (0.5 * (1 - peripheral) + 0.1 * peripheral)
  a = rng.uniform(0, 2 * np.pi, k)
  return np.asarray(center) + np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _class_profile(rng: np.random.Generator, class_name: str, difficulty: float) -> _Profile:
  """The class profile blended a random amount towards one of its look-alikes."""
  lookalikes = _LOOKALIKES[class_name]
  other = lookalikes[rng.integers(len(lookalikes))]
  return _PROFILES[class_name].blend(_PROFILES[other], rng.uniform(0, difficulty))


def _skin(rng: np.random.Generator, n: int) -> np.ndarray:
  """Skin of a random tone with uneven shading, redness and fine furrows."""
  tone = _SKIN_TONES[rng.choice(len(_SKIN_TONES), p=_SKIN_TONE_WEIGHTS)]
  tone = tone * rng.normal(1, 0.04, 3).astype(np.float32)
  shade = 1 + 0.05 * _noise(rng, n, 3) + 0.025 * _noise(rng, n, 10)
  img = tone * shade[..., None]
  img[..., 0] += 0.03 * _noise(rng, n, 5)
  furrows = _lines(2.5 * _noise(rng, n, 4), 0.08) * rng.uniform(0, 0.06)
  pores = _blobs(n, rng.uniform(-1, 1, (rng.integers(100, 400), 2)), 0.007)
  grain = 0.02 * _noise(rng, n, 32)
  return img * (1 - furrows - pores * rng.uniform(0.03, 0.1) + grain)[..., None]


@dataclasses.dataclass(frozen=True)
class _Lesion:
  """Where the lesion lies: the maps and sizes its structures are drawn with."""
  center: np.ndarray  # [2], in image coordinates.
  radius: float
  angle: float  # Orientation of the lesion's long axis.
  u: np.ndarray  # [n, n] coordinates along the lesion's axes, made round.
  v: np.ndarray
  theta: np.ndarray  # [n, n] polar angle around the centre.
  rho: np.ndarray  # [n, n] distance from the centre relative to the border.
  mask: np.ndarray  # [n, n] soft lesion mask in [0, 1].


def _chance(rng: np.random.Generator, prob) -> bool:
  return rng.random() < prob


def _lesion_shape(rng: np.random.Generator, p: _Profile, n: int) -> _Lesion:
  """A rotated ellipse whose radius is modulated by random border harmonics."""
  grid = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
  center = rng.normal(0, 0.08, 2).astype(np.float32)
  radius = float(p.size) * rng.uniform(0.7, 1.3)
  aspect = 1 + rng.uniform(0, p.elongation)
  angle = rng.uniform(0, 2 * np.pi)
  dx, dy = grid[None, :] - center[0], grid[:, None] - center[1]
  u = (dx * np.cos(angle) + dy * np.sin(angle)) / math.sqrt(aspect)
  v = (-dx * np.sin(angle) + dy * np.cos(angle)) * math.sqrt(aspect)
  theta = np.arctan2(v, u)
  # Harmonics 1-2 make the lesion asymmetric, higher ones make its border irregular.
  k = np.arange(1, 13)
  amps = np.where(k <= 2, p.asymmetry, p.irregularity * 3 / k)
  amps = amps * rng.normal(0, 1, 12) * rng.uniform(0.3, 1.2)
  phases = rng.uniform(0, 2 * np.pi, 12)
  table_theta = np.linspace(-np.pi, np.pi, 257)
  table_r = 1 + (amps * np.cos(k * table_theta[:, None] + phases)).sum(1)
  border = np.interp(theta, table_theta, np.maximum(table_r, 0.4)).astype(np.float32)
  rho = np.hypot(u, v) / (radius * border)
  softness = max(float(p.softness) * rng.uniform(0.5, 1.5), 2.0 / (radius * n))
  return _Lesion(center=center, radius=radius, angle=angle, u=u, v=v, theta=theta, rho=rho,
                 mask=_sigmoid((1 - rho) / softness))


def _paint_body(rng: np.random.Generator, img: np.ndarray, p: _Profile,
                lesion: _Lesion) -> np.ndarray:
  """Paints the lesion's colours over the skin; returns its base colour."""
  n = len(img)
  inner = np.clip(1 - lesion.rho, 0, 1)
  if _chance(rng, p.halo):
    halo = _sigmoid((1.4 - lesion.rho) / 0.15) * (1 - lesion.mask)
    _blend(img, _PINK, halo * rng.uniform(0.3, 0.7))
  skin_brightness = float(img.mean()) / 0.75
  color = np.asarray(p.color, np.float32) * rng.normal(1, 0.06, 3).astype(np.float32)
  color *= 0.8 + 0.2 * skin_brightness
  body = np.broadcast_to(color, (n, n, 3)).copy()
  center_weight = float(p.center) * rng.uniform(0.5, 1.5)
  _blend(body, p.center_color, center_weight * np.clip(inner / 0.6, 0, 1))
  body *= (1 + float(p.mottle) * (_noise(rng, n, 6) + 0.5 * _noise(rng, n, 14)))[..., None]
  for _ in range(rng.binomial(3, p.multicolor)):
    patch = _sigmoid((_noise(rng, n, 4) - rng.uniform(0, 1)) / 0.3)
    patch_color = _ATYPICAL_PALETTE[rng.integers(len(_ATYPICAL_PALETTE))]
    _blend(body, patch_color, patch * rng.uniform(0.5, 0.9))
  _blend(img, body, lesion.mask * float(p.opacity) * rng.uniform(0.85, 1.0))
  return color


def _paint_structures(rng: np.random.Generator, img: np.ndarray, p: _Profile,
                      lesion: _Lesion, color: np.ndarray) -> None:
  """Paints the dermoscopic structures each drawn with its profile probability."""
  n = len(img)
  u, v, rho, mask = lesion.u, lesion.v, lesion.rho, lesion.mask
  center, radius = lesion.center, lesion.radius
  inner = np.clip(1 - rho, 0, 1)
  dark = color * 0.5
  scale = radius / 0.5  # Structures grow with the lesion.

  if _chance(rng, p.fingerprint):
    along = u * np.cos(lesion.angle) + v * np.sin(lesion.angle)
    phase = along / (0.07 * scale) + 1.5 * _noise(rng, n, 4)
    _blend(img, dark, _lines(phase, 0.45) * mask * rng.uniform(0.3, 0.55))
  if _chance(rng, p.ridges):
    phase = 2.0 * _noise(rng, n, 7) + 0.8 * _noise(rng, n, 14)
    _blend(img, dark * 0.7, _lines(phase, 0.4) * mask * rng.uniform(0.35, 0.7))
  if _chance(rng, p.network):
    atypia = float(p.network_atypia)
    period = 0.11 * scale * rng.uniform(0.8, 1.25)
    warp = 0.035 + 0.05 * atypia
    wu = (u + warp * _noise(rng, n, 9)) * (2 * np.pi / period)
    wv = (v + warp * _noise(rng, n, 9)) * (2 * np.pi / period)
    # Three plane waves at 120 degrees make a honeycomb; its troughs are the lines.
    cells = np.cos(wu) + np.cos(-0.5 * wu + 0.866 * wv) + np.cos(-0.5 * wu - 0.866 * wv)
    width = float(p.network_width) * (1 + atypia * 0.6 * _noise(rng, n, 5))
    net = _sigmoid((3 * width - 1.5 - cells) / 0.3)
    patchy = _sigmoid((_noise(rng, n, 3) + 1.5 - 2.5 * atypia) / 0.4)
    fade = np.clip(rho / 0.5, 0, 1) if _chance(rng, p.central_scar) else 1.0
    _blend(img, dark, net * mask * patchy * fade * rng.uniform(0.35, 0.65))
  if _chance(rng, p.lacunae):
    lobes = _noise(rng, n, 8)
    _blend(img, _LACUNA_PURPLE, _sigmoid(lobes * 2.5) * mask * rng.uniform(0.4, 0.8))
    septa = _lines(1.6 * lobes + 0.5 * _noise(rng, n, 12), 0.25)
    _blend(img, (0.85, 0.62, 0.64), septa * mask * rng.uniform(0.3, 0.6))
  if _chance(rng, p.nests):
    pts = _points_in_disk(rng, rng.integers(2, 7), center, radius * 0.75)
    _blend(img, _BLUE_GREY, _blobs(n, pts, 0.07 * scale) * mask * rng.uniform(0.6, 0.9))
  if _chance(rng, p.veil):
    region = _sigmoid((_noise(rng, n, 4) - rng.uniform(-0.5, 0.8)) / 0.25)
    _blend(img, _VEIL, region * mask * rng.uniform(0.45, 0.75))
  if _chance(rng, p.regression):
    region = _sigmoid((_noise(rng, n, 5) - rng.uniform(0, 1)) / 0.2) * mask
    _blend(img, _SCAR_WHITE, region * rng.uniform(0.5, 0.85))
    pepper = _blobs(n, _points_in_disk(rng, 60, center, radius), 0.008)
    _blend(img, _BLUE_GREY, pepper * region * 0.8)
  if _chance(rng, p.central_scar):
    spread = radius * 0.35 * rng.uniform(0.7, 1.3)
    blob = np.exp(-(np.hypot(u, v) / spread) ** 2 * (1 + 0.4 * _noise(rng, n, 6)))
    _blend(img, _SCAR_WHITE, blob * mask * rng.uniform(0.6, 0.95))
  if _chance(rng, p.keratin):
    region = _sigmoid((_noise(rng, n, 5) + 1.2 * inner - rng.uniform(0.3, 1.0)) / 0.2) * mask
    texture = np.asarray(_KERATIN, np.float32) * (1 + 0.12 * _noise(rng, n, 20))[..., None]
    _blend(img, texture, region * rng.uniform(0.6, 0.95))
  if _chance(rng, p.crust):
    region = _sigmoid((_noise(rng, n, 6) + inner - rng.uniform(0.6, 1.3)) / 0.15) * mask
    texture = np.asarray(_CRUST, np.float32) * (1 + 0.3 * _noise(rng, n, 24))[..., None]
    _blend(img, texture, region * rng.uniform(0.6, 0.95))
  if _chance(rng, p.dots):
    pts = _points_in_disk(rng, rng.integers(8, 40), center, radius * 0.95,
                          float(p.dots_peripheral))
    sizes = rng.choice([0.012, 0.025], 2) * scale
    half = len(pts) // 2
    dots = np.maximum(_blobs(n, pts[:half], sizes[0]), _blobs(n, pts[half:], sizes[1]))
    dot_color = _BLACK if _chance(rng, 0.5) else _DARK_BROWN
    _blend(img, dot_color, dots * mask * rng.uniform(0.6, 0.95))
  for prob, blob_color, count, size, alpha in (
      (p.comedos, _BLACK, (3, 15), 0.03, (0.6, 0.9)),
      (p.milia, (0.96, 0.94, 0.86), (3, 15), 0.025, (0.7, 0.95)),
      (p.follicles, (0.97, 0.92, 0.86), (10, 30), 0.022, (0.5, 0.85)),
      (p.dotted_vessels, _VESSEL_RED, (10, 40), 0.014, (0.6, 0.95))):
    if _chance(rng, prob):
      pts = _points_in_disk(rng, rng.integers(*count), center, radius * 0.85)
      _blend(img, blob_color, _blobs(n, pts, size * scale) * mask * rng.uniform(*alpha))
  if _chance(rng, p.arborizing):
    curves = []
    for _ in range(rng.integers(2, 5)):
      start = _points_in_disk(rng, 1, center, radius * 0.6)[0]
      trunk = _curve(rng, start, rng.uniform(0, 2 * np.pi), radius * rng.uniform(0.6, 1.2), 0.4)
      curves.append(trunk)
      for fork in trunk[rng.integers(3, 20, rng.integers(2, 5))]:
        length = radius * rng.uniform(0.2, 0.5)
        curves.append(_curve(rng, fork, rng.uniform(0, 2 * np.pi), length, 0.6))
    _blend(img, _VESSEL_RED, _strokes(n, curves, 0.008) * mask * rng.uniform(0.7, 0.95))
  if _chance(rng, p.streaks):
    count = rng.integers(12, 30)
    rays = _lines(lesion.theta * count / (2 * np.pi) + 0.3 * _noise(rng, n, 6), 0.3)
    rim = _sigmoid((rho - 0.75) / 0.06) * _sigmoid((1.2 - rho) / 0.06)
    facing = np.cos(lesion.theta - rng.uniform(-np.pi, np.pi))
    sector = _sigmoid((facing - rng.uniform(-0.8, 0.4)) / 0.15)
    _blend(img, _DARK_BROWN, rays * rim * sector * rng.uniform(0.5, 0.85))


def _add_nuisances(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
  """Hair, the dermoscope's light fall-off and field, white balance and noise."""
  n = len(img)
  if _chance(rng, 0.3):
    curves = [_curve(rng, rng.uniform(-1.5, 1.5, 2), rng.uniform(0, 2 * np.pi), 3.0, 0.15)
              for _ in range(rng.integers(1, 6))]
    _blend(img, _HAIR, _strokes(n, curves, 0.007) * rng.uniform(0.5, 0.9))
  grid = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
  r2 = grid[None, :] ** 2 + grid[:, None] ** 2
  img *= (1 - rng.uniform(0, 0.15) * r2)[..., None]
  if _chance(rng, 0.3):
    field = _sigmoid((rng.uniform(1.0, 1.35) - np.sqrt(r2)) / 0.03)
    _blend(img, (0.04, 0.03, 0.03), 1 - field)
  img *= rng.normal(1, 0.04, 3).astype(np.float32)
  img = np.clip(img, 0, 1) ** rng.uniform(0.9, 1.1)
  return img + rng.normal(0, 0.012, img.shape).astype(np.float32)


def _render(rng: np.random.Generator, class_name: str, n: int, difficulty: float) -> np.ndarray:
  """Renders one image as float32 RGB in [0, 1] at n x n pixels."""
  p = _class_profile(rng, class_name, difficulty)
  img = _skin(rng, n)
  lesion = _lesion_shape(rng, p, n)
  color = _paint_body(rng, img, p, lesion)
  _paint_structures(rng, img, p, lesion, color)
  return _add_nuisances(rng, img)


def render_lesion(rng: np.random.Generator, class_name: str, image_size: int,
                  difficulty: float = DEFAULT_DIFFICULTY) -> np.ndarray:
  """One synthetic dermoscopy-like image of `class_name`, uint8 [size, size, 3].

  A pure function of the generator's state, so each image is reproducible from
  its own seed whatever order images are made in.
  """
  if class_name not in _PROFILES:
    raise ValueError(f'Unknown class {class_name!r}; expected one of {ISIC_CLASSES}.')
  factor = max(1, math.ceil(_MIN_RENDER_SIZE / image_size))
  img = _render(rng, class_name, image_size * factor, difficulty)
  img = img.reshape(image_size, factor, image_size, factor, 3).mean(axis=(1, 3))
  return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass(eq=False)
class SyntheticLesionsConfig(tfds.core.BuilderConfig):
  """Size, class counts, seed and difficulty of a synthetic set.

  The train split has ceil(ISIC count * train_scale) images per class, the
  test split `test_per_class` images per class.
  """
  image_size: int = 128
  train_scale: float = 1.0
  test_per_class: int = 40
  seed: int = 0
  difficulty: float = DEFAULT_DIFFICULTY


class SyntheticLesions(tfds.core.GeneratorBasedBuilder):
  """Procedurally generated dermoscopy-like lesions; for demos and tests, not medicine."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticLesionsConfig(
          name='full',
          description='ISIC train counts (2239 images), 40 test images a class, 128px.'),
      SyntheticLesionsConfig(
          name='tiny', image_size=32, train_scale=0.1, test_per_class=4,
          description='ISIC train counts / 10 (still imbalanced), 4 test images a class, 32px.'),
      SyntheticLesionsConfig(
          name='small', image_size=32, train_scale=0.25, test_per_class=12,
          description='ISIC train counts / 4, 12 test images a class, 32px: enough validation and '
          'Test images to measure rates near 95% (out-of-distribution refusal).'),
  ]
  DEFAULT_CONFIG_NAME = 'full'

  def _info(self) -> tfds.core.DatasetInfo:
    return LocalDatasetInfo(
        builder=self,
        description=(
            'Synthetic dermoscopy-like images in the 9 ISIC classes, with class-dependent '
            'colour, shape and structures that overlap between look-alike classes. '
            'For demos and tests only; not medical data.'),
        features=lesion_features(ISIC_CLASSES, self.builder_config.image_size),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    # The epsilon keeps float error from rounding an exact product up.
    train_counts = {c: math.ceil(ISIC_TRAIN_COUNTS[c] * config.train_scale - 1e-9)
                    for c in ISIC_CLASSES}
    return {
        'train': self._generate_examples('train', train_counts),
        'test': self._generate_examples('test', {c: config.test_per_class for c in ISIC_CLASSES}),
    }

  def _generate_examples(self, split: str, counts: dict[str, int]) -> Iterator[tuple[str, dict]]:
    """Yields each image from its own seed, so no image depends on another."""
    config = self.builder_config
    split_id = ('train', 'test').index(split)
    for label, class_name in enumerate(ISIC_CLASSES):
      for index in range(counts[class_name]):
        rng = np.random.default_rng([config.seed, split_id, label, index])
        file_name = f'synthetic/{split}/{class_name}/{index:06d}.png'
        yield file_name, {
            # A PIL image is PNG-encoded by PIL, much faster than TFDS's TF graph.
            'image': PIL.Image.fromarray(
                render_lesion(rng, class_name, config.image_size, config.difficulty)),
            'label': class_name,
            'file_name': file_name,
            'group_id': file_name,
        }
