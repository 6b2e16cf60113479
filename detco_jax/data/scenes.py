"""The scene generator of `detco_shapes`: synthetic multi-object scenes.

Each image shows 1 to 4 objects of different shape classes (`CLASS_NAMES`)
with random colour, size, position and rotation, over a random textured
background (gradient, stripes or smooth value noise) with pixel noise: one
large main object near the centre, drawn first, and up to 3 smaller
distractors, which may occlude it. Colours are drawn independently of the
shape, so colour does not predict the class; the main object's shape is the
image's `label`.

`generate_example` returns one example as numpy arrays, with the features of
the TFDS dataset (listed in `builtin`, which stores image and mask as PNG).

The objects of one image all have different classes, so `mask` is also an
instance map: the pixels of class c are exactly the visible pixels of the one
object of class c, and its box is the bounding box of `mask == c + 1`. Every
object keeps at least `_MIN_VISIBLE_FRACTION` of its pixels visible.

Determinism: example `index` of `split` is generated from
`np.random.default_rng([_GENERATOR_SEED, split_id, index])` alone, so it does
not depend on the split sizes, and two machines generate the same dataset: the
per-pixel work uses only arithmetic, comparisons and `%`, no libm functions
whose last bit may differ between platforms. Scenes are drawn in normalised
coordinates, so an example at another image size is usually the same scene
(not always: placement checks count pixels).

Images and masks are rasterised without anti-aliasing, so `mask` is exactly
the set of pixels painted with each object's colour (before pixel noise).
"""

import colorsys
import functools
from typing import Any, Callable

import numpy as np

CLASS_NAMES = (
    "circle", "square", "triangle", "plus", "ring",
    "star", "hexagon", "bar", "diamond", "crescent",
)
NUM_CLASSES = len(CLASS_NAMES)
MAX_OBJECTS = 4
SPLITS = ("train", "test")
_SPLIT_IDS = {"train": 0, "test": 1}

# Part of every example's seed: change it together with
# `builtin.DetcoShapes.VERSION` whenever the generator's output changes.
_GENERATOR_SEED = 2

# Object size: the radius, as a fraction of the image side, of the disc with the
# same area as the object (areas are equalised across shapes, so that no shape
# is bulkier than another). The first object of a scene is the main one: large
# and near the centre, so that crops keep it. The others are distractors too
# small to outsize it even when it is partly occluded (0.4 x 0.2^2 > 0.12^2),
# so `label`, the largest visible object, is always the main object's class.
_MAIN_RADIUS_RANGE = (0.2, 0.3)
_MAIN_CENTRE_RANGE = (0.3, 0.7)
_DISTRACTOR_RADIUS_RANGE = (0.06, 0.12)
_DISTRACTOR_CENTRE_RANGE = (0.1, 0.9)
# A placement is redrawn if it would leave an earlier object with less than this
# fraction of its pixels visible: occlusion, but every object stays legible.
_MIN_VISIBLE_FRACTION = 0.4
_PLACEMENT_TRIES = 10
# Object colours are redrawn (a few times) when closer than this, in RGB L2
# distance, to the mean colour under the object, so objects are seen.
_MIN_CONTRAST = 80.0
_COLOUR_TRIES = 8
# The smallest image side the generator (and so the dataset) accepts.
MIN_IMAGE_SIZE = 16
# Every unit shape lies within this radius (the square's corners, at 1.13).
_EXTENT = 1.2

_Shape = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------
# Shapes, in object coordinates (u, v): rotated and divided by the radius.


def _half_planes(points: list[tuple[float, float]]) -> np.ndarray:
  """Half-planes of a convex polygon, computed once at import.

  Args:
    points: the vertices in order around the polygon, either direction.

  Returns:
    float64 [n, 3] rows (a, b, c): a point is inside iff a*u + b*v + c >= 0
    for every row.
  """
  verts = np.asarray(points, np.float64)
  nxt = np.roll(verts, -1, axis=0)
  ex, ey = (nxt - verts).T
  planes = np.stack([-ey, ex, ey * verts[:, 0] - ex * verts[:, 1]], axis=1)
  # Orient every plane so that the polygon's centroid is inside.
  centre = verts.mean(axis=0)
  side = planes[:, 0] * centre[0] + planes[:, 1] * centre[1] + planes[:, 2]
  return planes * np.sign(side)[:, None]


def _regular(n: int, radius: float = 1.0,
             phase: float = 0.0) -> list[tuple[float, float]]:
  """The vertices of a regular n-gon (computed once, at import)."""
  angles = phase + 2 * np.pi * np.arange(n) / n
  return list(zip(radius * np.cos(angles), radius * np.sin(angles)))


def _inside_count(u: np.ndarray, v: np.ndarray,
                  planes: np.ndarray) -> np.ndarray:
  """How many of the half-planes contain each point."""
  count = np.zeros(np.broadcast_shapes(u.shape, v.shape), np.int8)
  for a, b, c in planes:
    count += a * u + b * v + c >= 0
  return count


def _convex(u: np.ndarray, v: np.ndarray, planes: np.ndarray) -> np.ndarray:
  return _inside_count(u, v, planes) == len(planes)


_TRIANGLE = _half_planes(_regular(3, phase=np.pi / 2))
_HEXAGON = _half_planes(_regular(6))
_DIAMOND = _half_planes([(1.0, 0.0), (0.0, 0.55), (-1.0, 0.0), (0.0, -0.55)])
# The 5 lines of a regular pentagram, each through two alternate points. The
# inner pentagon is inside all 5 half-planes, the points inside exactly 4 and
# everything else inside at most 3.
_STAR_POINTS = _regular(5, phase=np.pi / 2)
_STAR = np.stack([
    # The first plane of the triangle (p_i, p_i+2, centre): the line through
    # p_i and p_i+2, facing the centre.
    _half_planes([_STAR_POINTS[i], _STAR_POINTS[(i + 2) % 5], (0.0, 0.0)])[0]
    for i in range(5)
])


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return _inside_count(u, v, _STAR) >= 4


def _plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  a, b = np.abs(u), np.abs(v)
  return ((a <= 1) & (b <= 0.3)) | ((a <= 0.3) & (b <= 1))


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  r2 = u * u + v * v
  return (r2 <= 1) & (r2 >= 0.55**2)


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return (u * u + v * v <= 1) & ((u - 0.45) ** 2 + v * v > 0.8**2)


# In `CLASS_NAMES` order.
_SHAPES: tuple[_Shape, ...] = (
    lambda u, v: u * u + v * v <= 1,                       # circle
    lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),  # square
    lambda u, v: _convex(u, v, _TRIANGLE),                 # triangle
    _plus,
    _ring,
    _star,
    lambda u, v: _convex(u, v, _HEXAGON),                  # hexagon
    lambda u, v: (np.abs(u) <= 1) & (np.abs(v) <= 0.35),   # bar
    lambda u, v: _convex(u, v, _DIAMOND),                  # diamond
    _crescent,
)
assert len(_SHAPES) == NUM_CLASSES


@functools.cache
def _shape_scales() -> np.ndarray:
  """Per-class factors that give each unit shape the area of the unit disc.

  Returns:
    float64 [NUM_CLASSES]; areas are measured on a fine grid once.
  """
  n, extent = 512, 1.25
  c = (np.arange(n) + 0.5) / n * 2 * extent - extent
  u, v = c[None, :], c[:, None]
  areas = np.array([s(u, v).sum() for s in _SHAPES]) * (2 * extent / n) ** 2
  return np.sqrt(np.pi / areas)


# ---------------------------------------------------------------------------
# Scene generation (numpy, vectorised over pixels).


@functools.cache
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Normalised pixel-centre coordinates, [S, 1] rows and [1, S] columns."""
  c = (np.arange(size, dtype=np.float64) + 0.5) / size
  return c[:, None], c[None, :]


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
  # A normalised Gaussian pair is a uniform direction without calling cos/sin.
  d = rng.normal(size=2)
  return d / max(float(np.sqrt(d @ d)), 1e-12)


def _random_colour(rng: np.random.Generator, sat: tuple[float, float],
                   val: tuple[float, float]) -> np.ndarray:
  """An RGB colour in [0, 255] with uniform hue."""
  h, s, v = rng.uniform(), rng.uniform(*sat), rng.uniform(*val)
  return 255.0 * np.array(colorsys.hsv_to_rgb(h, s, v))


def _value_noise(rng: np.random.Generator, yy: np.ndarray,
                 xx: np.ndarray) -> np.ndarray:
  """Smooth noise in [0, 1]: a random lattice, bilinearly interpolated."""
  cells = int(rng.integers(2, 8))
  lattice = rng.uniform(size=(cells + 1, cells + 1))

  def weights(t):
    t = t.ravel() * cells
    i = np.minimum(np.floor(t).astype(int), cells - 1)
    return i, (t - i)

  iy, wy = weights(yy)
  ix, wx = weights(xx)
  rows = lattice[iy] * (1 - wy[:, None]) + lattice[iy + 1] * wy[:, None]
  return rows[:, ix] * (1 - wx) + rows[:, ix + 1] * wx


def _background(rng: np.random.Generator, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
  """A float32 [S, S, 3] background mixing two random colours by a pattern."""
  c0 = _random_colour(rng, (0.0, 0.8), (0.15, 0.95))
  c1 = _random_colour(rng, (0.0, 0.8), (0.15, 0.95))
  kind = rng.integers(3)
  if kind == 0:  # Linear gradient in a random direction.
    d = _unit_vector(rng)
    t = ((yy - 0.5) * d[0] + (xx - 0.5) * d[1]) / np.sqrt(2) + 0.5
  elif kind == 1:  # Stripes: a triangle wave of random frequency, sharpened.
    d = _unit_vector(rng)
    freq, phase, sharp = rng.uniform(2, 10), rng.uniform(), rng.uniform(1, 4)
    t = np.abs(((yy * d[0] + xx * d[1]) * freq + phase) % 1.0 * 2 - 1)
    t = np.clip((t - 0.5) * sharp + 0.5, 0, 1)
  else:
    t = _value_noise(rng, yy, xx)
  # float32 from here on: the image is rounded to uint8 anyway.
  t = np.broadcast_to(t, (yy.shape[0], xx.shape[1]))[..., None]
  t = t.astype(np.float32)
  return c0.astype(np.float32) * (1 - t) + c1.astype(np.float32) * t


def _sample_object(
    rng: np.random.Generator, class_id: int, main: bool, yy: np.ndarray,
    xx: np.ndarray
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
  """Draws a placement of one object and rasterises it.

  Only a window around the object is rasterised: it is all an object can
  cover, and small arrays keep generation fast.

  Args:
    rng: the example's generator.
    class_id: index into `CLASS_NAMES`.
    main: the scene's main object (large, central) or a distractor.
    yy: [S, 1] pixel-centre rows, normalised.
    xx: [1, S] pixel-centre columns, normalised.

  Returns:
    The window (row and column slices of the image), the object's bool mask
    in the window, and a float shading ramp in [-1, 1] in the window (the
    projection on a random direction, in object radii).
  """
  centres = _MAIN_CENTRE_RANGE if main else _DISTRACTOR_CENTRE_RANGE
  radii = _MAIN_RADIUS_RANGE if main else _DISTRACTOR_RADIUS_RANGE
  cy, cx = rng.uniform(*centres, size=2)
  radius = rng.uniform(*radii) * _shape_scales()[class_id]
  cos, sin = _unit_vector(rng)
  shade_dir = _unit_vector(rng)
  size, extent = yy.shape[0], _EXTENT * radius
  window = tuple(
      slice(max(0, int(np.floor((c - extent) * size))),
            min(size, int(np.ceil((c + extent) * size))))
      for c in (cy, cx))
  dy = (yy[window[0]] - cy) / radius
  dx = (xx[:, window[1]] - cx) / radius
  u, v = dx * cos + dy * sin, dy * cos - dx * sin
  ramp = np.clip(dy * shade_dir[0] + dx * shade_dir[1], -1, 1)
  return window, _SHAPES[class_id](u, v), ramp


def _object_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
  """A random colour that stands out from `under` (its mean, [3])."""
  for _ in range(_COLOUR_TRIES):
    colour = _random_colour(rng, (0.3, 1.0), (0.3, 1.0))
    if np.sqrt(np.sum((colour - under) ** 2)) >= _MIN_CONTRAST:
      break
  return colour


def _place_objects(rng: np.random.Generator, classes: np.ndarray,
                   image: np.ndarray, yy: np.ndarray,
                   xx: np.ndarray) -> tuple[np.ndarray, list[int]]:
  """Paints the objects onto `image` in order, back to front.

  Args:
    rng: the example's generator.
    classes: the class ids to draw, all different.
    image: float [S, S, 3], painted in place.
    yy: [S, 1] pixel-centre rows.
    xx: [1, S] pixel-centre columns.

  Returns:
    An int [S, S] instance map (-1 background, else the position in the
    returned class list) and the classes actually placed.
  """
  instances = np.full(image.shape[:2], -1, np.int32)
  placed, full_areas, visible = [], [], np.zeros(0, np.int64)
  for class_id in classes:
    # The first object can only fail by missing every pixel centre (tiny
    # images): try it longer, so that every image has an object.
    for _ in range(_PLACEMENT_TRIES * (1 if placed else 10)):
      window, inside, ramp = _sample_object(rng, int(class_id), not placed,
                                            yy, xx)
      area = int(inside.sum())
      if area == 0:
        continue
      # Pixels each earlier object would lose under this one.
      lost = np.bincount(instances[window][inside] + 1,
                         minlength=len(placed) + 1)[1:]
      if np.all(visible - lost >= _MIN_VISIBLE_FRACTION * np.asarray(
          full_areas)):
        break
    else:
      continue  # No legible placement found: leave this class out.
    # Views into `image` and `instances`: painting them paints the scene.
    image_window, instance_window = image[window], instances[window]
    colour = _object_colour(rng, image_window[inside].mean(axis=0))
    shade = rng.uniform(-0.25, 0.25)
    image_window[inside] = colour * (1 + shade * ramp[inside][:, None])
    instance_window[inside] = len(placed)
    visible = np.append(visible - lost, area)
    placed.append(int(class_id))
    full_areas.append(area)
  return instances, placed


def _bounding_box(region: np.ndarray) -> np.ndarray:
  """Normalised [ymin, xmin, ymax, xmax] of a non-empty bool [S, S] region."""
  rows = np.flatnonzero(region.any(axis=1))
  cols = np.flatnonzero(region.any(axis=0))
  h, w = region.shape
  return np.array([rows[0] / h, cols[0] / w, (rows[-1] + 1) / h,
                   (cols[-1] + 1) / w], np.float32)


def generate_example(split: str, index: int,
                     image_size: int = 64) -> dict[str, Any]:
  """Generates one example as numpy arrays, exactly as the builder stores it.

  Args:
    split: "train" or "test".
    index: the example's index in the split (any non-negative int).
    image_size: side S of the square image in pixels (at least 16).

  Returns:
    A dict with the dataset's features (see `builtin`): `image` uint8
    [S, S, 3], `mask` uint8 [S, S, 1], `label` int, `labels` float32
    [NUM_CLASSES], `boxes` float32 [n, 4], `box_labels` int64 [n], `index` int.
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f"Unknown split {split!r}; choose from {SPLITS}.")
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got "
                     f"{image_size}.")
  rng = np.random.default_rng([_GENERATOR_SEED, _SPLIT_IDS[split], index])
  yy, xx = _pixel_grid(image_size)

  image = _background(rng, yy, xx)
  num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  classes = rng.choice(NUM_CLASSES, size=num_objects, replace=False)
  instances, placed = _place_objects(rng, classes, image, yy, xx)
  if not placed:
    raise RuntimeError(f"No object could be drawn at {image_size} px.")
  # Uniform pixel noise (std up to ~7): a quarter of the cost of Gaussian.
  amplitude = rng.uniform(0.0, 24.0)
  image += (rng.random(image.shape, np.float32) - 0.5) * amplitude
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

  # Instance -> class + 1; instance -1 (background) looks up entry 0.
  lookup = np.array([0] + [c + 1 for c in placed], np.uint8)
  mask = lookup[instances + 1]
  counts = np.bincount(mask.ravel(), minlength=NUM_CLASSES + 1)[1:]
  boxes = [_bounding_box(instances == i) for i in range(len(placed))]
  return {
      "image": image,
      "mask": mask[..., None],
      "label": int(np.argmax(counts)),
      "labels": (counts > 0).astype(np.float32),
      "boxes": np.stack(boxes).reshape(-1, 4).astype(np.float32),
      "box_labels": np.asarray(placed, np.int64),
      "index": int(index),
  }
