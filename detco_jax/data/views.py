"""Per-example geometric views of DetCo, as tf.data graph code (docs/method.md).

From one decoded uint8 image [H, W, 3] this module makes

  * two global views (I_q, I_k): RandomResizedCrop with torchvision's sampling
    rule (10 tries of area x log-uniform aspect ratio, then a centre-crop
    fallback, so it always succeeds), resized to `global_size`, each with its
    own horizontal flip;
  * two jigsaw patch sets (P_q, P_k), PIRL style: a random crop covering at
    least `local_min_area` of the image, resized to `local_size`^2 and flipped
    (one flip per set, before cutting), cut into `grid` x `grid` cells of side
    `local_size // grid`, the cells shuffled by a random permutation, and a
    random `patch_size`^2 crop taken inside each cell (so patches never touch).
    The aspect ratio of the jigsaw crop is drawn like the global one, from
    `views.local_ratio` when the config has it, else `views.global_ratio`
    (PIRL uses torchvision's default (3/4, 4/3)).

and the two linear-probe views (RandomResizedCrop + flip for training; resize
the shorter side, then centre crop, for testing).

Speed: the image is decoded once upstream and all views are cut from the
decoded tensor. A global view is a slice + `tf.image.resize` (bilinear,
half-pixel centres) + flip. A jigsaw set is the jigsaw crop resized to
`local_size`^2 "align corners" (the crop's first and last pixel onto the
first and last output pixel, which keeps every sample inside the image),
rounded to uint8, flipped, and sliced into its 9 patches: one resize of the
crop costs less than resampling the 9 patches on their own with
`crop_and_resize` (its per-pixel cost is about 2.5x the resize's). Either
way a crop resized to its own size is an exact pixel copy. Resampling is
bilinear without antialiasing, as in big_vision and most TF pipelines
(torchvision's PIL resize antialiases; `views.antialias` turns it on for
the global views); the probe's test view antialiases, as torchvision's
does. Bilinear weights are non-negative and sum to one, so a resampled
pixel stays in [0, 255] and rounds to uint8 with a plain cast
(`_round_to_uint8`), which costs a third of a saturating one.

Randomness is stateless: every draw is a `tf.random.stateless_*` op of a
per-example seed (a [2] int64 tensor), so a view depends only on the image and
its seed, never on thread scheduling or on how many examples came before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Tuple

import tensorflow as tf

# torchvision's RandomResizedCrop tries this many (area, ratio) draws before
# falling back to a centre crop.
_CROP_ATTEMPTS = 10

# Sub-seed tags, folded into an example's seed: one independent stream each.
_GLOBAL_SEED = 0
_LOCAL_SEED = 1
_CROP_SEED = 2
_FLIP_SEED = 3
_PERM_SEED = 4
_OFFSET_SEED = 5
_POSITION_SEED = 6


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Geometry of the host-side views, validated (from `config.views`).

  Attributes:
    global_size: side of the two global views.
    global_area: RandomResizedCrop area range, fractions of the image area.
    global_ratio: RandomResizedCrop aspect-ratio range (width / height).
    local_min_area: the jigsaw crop covers at least this fraction of the image.
    local_ratio: aspect-ratio range of the jigsaw crop.
    local_size: the jigsaw crop is resized to `local_size`^2.
    grid: the jigsaw crop is cut into `grid` x `grid` cells.
    patch_size: side of the patch cropped inside each cell.
    flip_prob: probability of a horizontal flip (per global view and per
      jigsaw set).
    antialias: resize the global views with an antialiasing filter (PIL's
      and torchvision's way) instead of plain bilinear sampling, which
      aliases when a crop shrinks by more than 2x.
  """
  global_size: int = 224
  global_area: Tuple[float, float] = (0.2, 1.0)
  global_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  local_min_area: float = 0.6
  local_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
  local_size: int = 255
  grid: int = 3
  patch_size: int = 64
  flip_prob: float = 0.5
  antialias: bool = False

  def __post_init__(self):
    _check_range("views.global_area", self.global_area, upper=1.0)
    _check_range("views.global_ratio", self.global_ratio)
    _check_range("views.local_ratio", self.local_ratio)
    if not 0.0 < self.local_min_area <= 1.0:
      raise ValueError(f"views.local_min_area must be in (0, 1], got "
                       f"{self.local_min_area}.")
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f"views.flip_prob must be in [0, 1], got "
                       f"{self.flip_prob}.")
    for key in ("global_size", "local_size", "grid", "patch_size"):
      if getattr(self, key) < 1:
        raise ValueError(f"views.{key} must be >= 1, got "
                         f"{getattr(self, key)}.")
    if self.patch_size > self.cell_size:
      raise ValueError(
          f"views.patch_size ({self.patch_size}) must be <= views.local_size "
          f"// views.grid ({self.local_size} // {self.grid} = "
          f"{self.cell_size}) so that each patch fits in its grid cell: set "
          f"views.local_size >= {self.grid * self.patch_size} or "
          f"views.patch_size <= {self.cell_size}.")

  @classmethod
  def from_config(cls, views: Any) -> "ViewSpec":
    """Builds the spec from `config.views` (a ConfigDict or similar).

    Args:
      views: the `views` config section.

    Returns:
      The validated `ViewSpec`.

    Raises:
      ValueError: naming the offending `views.*` key and the fix.
    """
    get = views.get if hasattr(views, "get") else (
        lambda k, d=None: getattr(views, k, d))
    global_ratio = tuple(float(r) for r in get("global_ratio"))
    local_ratio = get("local_ratio", None)
    return cls(
        global_size=int(get("global_size")),
        global_area=tuple(float(a) for a in get("global_area")),
        global_ratio=global_ratio,
        local_min_area=float(get("local_min_area")),
        local_ratio=(tuple(float(r) for r in local_ratio)
                     if local_ratio is not None else global_ratio),
        local_size=int(get("local_size")),
        grid=int(get("grid")),
        patch_size=int(get("patch_size")),
        flip_prob=float(get("flip_prob")),
        antialias=bool(get("antialias", False)),
    )

  @property
  def cell_size(self) -> int:
    """Side of one jigsaw grid cell."""
    return self.local_size // self.grid

  @property
  def num_patches(self) -> int:
    """Patches per jigsaw set (grid^2)."""
    return self.grid * self.grid


def _check_range(name: str, value: Tuple[float, float],
                 upper: float = math.inf) -> None:
  lo, hi = value
  if not 0.0 < lo <= hi <= upper:
    raise ValueError(f"{name} must be a range (lo, hi) with 0 < lo <= hi"
                     f"{' <= %g' % upper if upper < math.inf else ''}, got "
                     f"{value}.")


# ----------------------------------------------------------------------------
# Random crop boxes.


def _sub_seed(seed: tf.Tensor, *tags: int) -> tf.Tensor:
  """Folds `tags` into `seed`: an independent stateless stream per tag path."""
  for tag in tags:
    seed = tf.random.experimental.stateless_fold_in(seed, tag)
  return seed


def sample_crops(seed: tf.Tensor, image_shape: tf.Tensor, num: int,
                 area: Tuple[float, float],
                 ratio: Tuple[float, float]) -> tf.Tensor:
  """Draws `num` RandomResizedCrop windows, torchvision's rule, vectorised.

  Each crop tries `_CROP_ATTEMPTS` (area, log-uniform ratio) pairs and keeps
  the first that fits in the image; if none fits it falls back to the largest
  centred crop whose ratio is clamped into `ratio`. So it always succeeds.

  Args:
    seed: [2] int stateless seed.
    image_shape: [>=2] int tensor, (height, width, ...) of the image.
    num: number of independent crops.
    area: (min, max) fraction of the image area.
    ratio: (min, max) aspect ratio, width / height.

  Returns:
    int32 [num, 4]: (top, left, height, width) in pixels.
  """
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  u = tf.random.stateless_uniform([num, _CROP_ATTEMPTS, 2], seed)
  target = height * width * (area[0] + (area[1] - area[0]) * u[..., 0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * u[..., 1])
  w = tf.round(tf.sqrt(target * aspect))
  h = tf.round(tf.sqrt(target / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  h = tf.gather(h, first, batch_dims=1)
  w = tf.gather(w, first, batch_dims=1)
  found = tf.reduce_any(fits, axis=1)

  # Fallback: the whole image, cut to the nearest allowed aspect ratio.
  in_ratio = width / height
  fb_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)
  h = tf.clip_by_value(tf.where(found, h, fb_h), 1.0, height)
  w = tf.clip_by_value(tf.where(found, w, fb_w), 1.0, width)

  pos = tf.random.stateless_uniform([num, 2], _sub_seed(seed, _POSITION_SEED))
  top = tf.where(found, tf.floor(pos[:, 0] * (height - h + 1)),
                 tf.floor((height - h) / 2))
  left = tf.where(found, tf.floor(pos[:, 1] * (width - w + 1)),
                  tf.floor((width - w) / 2))
  top = tf.minimum(top, height - h)
  left = tf.minimum(left, width - w)
  return tf.cast(tf.stack([top, left, h, w], axis=1), tf.int32)


def _flips(seed: tf.Tensor, num: int, prob: float) -> tf.Tensor:
  """bool [num]: independent horizontal flips with probability `prob`."""
  return tf.random.stateless_uniform([num], seed) < prob


def _pixel_boxes(y1: tf.Tensor, x1: tf.Tensor, y2: tf.Tensor, x2: tf.Tensor,
                 image_shape: tf.Tensor) -> tf.Tensor:
  """`crop_and_resize` boxes from the first and last sampled source pixels.

  Args:
    y1: first sampled row, float (any shape S).
    x1: first sampled column (S); x1 > x2 samples a mirrored crop.
    y2: last sampled row (S).
    x2: last sampled column (S).
    image_shape: (height, width, ...) of the image.

  Returns:
    float32 [S..., 4] boxes (y1, x1, y2, x2) normalised by (height - 1,
    width - 1).
  """
  # A 1-pixel side has a single sample position, 0; avoid dividing by zero.
  ny = tf.maximum(tf.cast(image_shape[0], tf.float32) - 1.0, 1.0)
  nx = tf.maximum(tf.cast(image_shape[1], tf.float32) - 1.0, 1.0)
  return tf.stack([y1 / ny, x1 / nx, y2 / ny, x2 / nx], axis=-1)


def _resample(image: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear crops of `image` at `boxes` [N, 4] to uint8 [N, size, size, C]."""
  crops = tf.image.crop_and_resize(
      image[None], boxes, tf.zeros([tf.shape(boxes)[0]], tf.int32),
      [size, size], method="bilinear")
  return _round_to_uint8(crops)


# ----------------------------------------------------------------------------
# DetCo views.


def crop_resize_flip(image: tf.Tensor, crop: tf.Tensor, flip: tf.Tensor,
                     size: int, antialias: bool = False) -> tf.Tensor:
  """One RandomResizedCrop view: slice, bilinear resize, optional flip.

  Args:
    image: uint8 [H, W, 3].
    crop: int32 [4] (top, left, height, width).
    flip: bool scalar, mirror horizontally.
    size: output side.
    antialias: filter before downsampling (`tf.image.resize`'s antialias).

  Returns:
    uint8 [size, size, 3].
  """
  window = image[crop[0]:crop[0] + crop[2], crop[1]:crop[1] + crop[3]]
  view = _round_to_uint8(tf.image.resize(
      window, [size, size], method="bilinear", antialias=antialias))
  return _flip(view, flip)


def _flip(image: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """`image` [H, W, C] mirrored horizontally where `flip` (bool scalar)."""
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Rounds float pixels to uint8, saturating at 0 and 255."""
  return tf.saturate_cast(x + 0.5, tf.uint8)


def _round_to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Rounds resampled pixels in [0, 255] to uint8, as `_to_uint8` does.

  For bilinear and triangle (antialiased bilinear) resampling of uint8
  pixels: their weights are non-negative and sum to one, so x lies in
  [0, 255] up to float error, x + 0.5 in [0, 256), and truncation equals
  `_to_uint8`'s rounding without its clipping pass.
  """
  return tf.cast(x + 0.5, tf.uint8)


def global_views(image: tf.Tensor, seed: tf.Tensor, spec: ViewSpec,
                 num: int = 2) -> tf.Tensor:
  """The global views: RandomResizedCrop + independent horizontal flips.

  Args:
    image: uint8 [H, W, 3].
    seed: [2] int stateless seed of this example's global views.
    spec: view geometry.
    num: number of views (2: I_q and I_k).

  Returns:
    uint8 [num, global_size, global_size, 3].
  """
  crops = sample_crops(_sub_seed(seed, _CROP_SEED), tf.shape(image), num,
                       spec.global_area, spec.global_ratio)
  flips = _flips(_sub_seed(seed, _FLIP_SEED), num, spec.flip_prob)
  return tf.stack([
      crop_resize_flip(image, crops[i], flips[i], spec.global_size,
                       spec.antialias)
      for i in range(num)
  ])


def boxes_in_crop(crops: tf.Tensor, flips: tf.Tensor, rows: tf.Tensor,
                  cols: tf.Tensor, patch: int, side: int,
                  image_shape: tf.Tensor) -> tf.Tensor:
  """Source-image boxes of square patches of a virtual resized crop.

  The crop `crops[i]` of the source image, resized (align corners) to
  `side`^2 and mirrored when `flips[i]`, is never materialised: each patch
  whose first pixel is (row, col) of that virtual image becomes the source
  box whose bilinear resample gives exactly the patch's pixels.

  Args:
    crops: float32 [S, 4] crops (top, left, height, width) in pixels.
    flips: bool [S], mirror the resized crop horizontally.
    rows: float32 [S, K], first row of each patch in the virtual image.
    cols: float32 [S, K], first column of each patch in the virtual
      (flipped) image.
    patch: patch side in pixels.
    side: side of the virtual resized crop.
    image_shape: (height, width, ...) of the image.

  Returns:
    float32 [S, K, 4] normalised boxes, for `crop_and_resize`.
  """
  flip = flips[:, None]
  # Undo the flip: column c of the flipped image is column side-1-c.
  first_col = tf.where(flip, side - 1 - cols, cols)
  last_col = tf.where(flip, first_col - (patch - 1), first_col + (patch - 1))
  # Resized pixel i samples source position top + i * (h - 1) / (side - 1).
  top, left = crops[:, 0:1], crops[:, 1:2]
  step_y = (crops[:, 2:3] - 1.0) / max(side - 1, 1)
  step_x = (crops[:, 3:4] - 1.0) / max(side - 1, 1)
  y1 = top + rows * step_y
  y2 = top + (rows + patch - 1) * step_y
  x1 = left + first_col * step_x
  x2 = left + last_col * step_x
  return _pixel_boxes(y1, x1, y2, x2, image_shape)


def local_crops(seed: tf.Tensor, image_shape: tf.Tensor, spec: ViewSpec,
                num_sets: int) -> tuple[tf.Tensor, tf.Tensor]:
  """The crops and flips that patch sets are cut from (jigsaw, pretexts).

  Args:
    seed: [2] int stateless seed of this example's patch sets.
    image_shape: (height, width, ...) of the image.
    spec: view geometry (`local_min_area`, `local_ratio`, `flip_prob`).
    num_sets: number of independent crops.

  Returns:
    (crops, flips): float32 [num_sets, 4] (top, left, height, width) and
    bool [num_sets].
  """
  crops = tf.cast(
      sample_crops(_sub_seed(seed, _CROP_SEED), image_shape, num_sets,
                   (spec.local_min_area, 1.0), spec.local_ratio), tf.float32)
  return crops, _flips(_sub_seed(seed, _FLIP_SEED), num_sets, spec.flip_prob)


def jigsaw_boxes(seed: tf.Tensor, image_shape: tf.Tensor, spec: ViewSpec,
                 num_sets: int = 2, perm: tf.Tensor | None = None
                 ) -> tf.Tensor:
  """Source-image boxes of the jigsaw patches, in shuffled (output) order.

  Patch k of a set shows grid cell `perm[k]` of the (flipped) jigsaw crop
  resized to `local_size`^2, at a random offset inside the cell. Its box maps
  the patch's pixels of that virtual resized image back to the source image,
  so one bilinear resample of the box gives exactly those pixels.

  Args:
    seed: [2] int stateless seed of this example's jigsaw sets.
    image_shape: (height, width, ...) of the image.
    spec: view geometry.
    num_sets: number of independent patch sets (2: P_q and P_k).
    perm: int32 [num_sets, grid^2], the cell each output patch shows; None:
      a random permutation per set (DetCo's).

  Returns:
    float32 [num_sets, grid^2, 4] normalised boxes.
  """
  crops, flips, rows, cols = _jigsaw_layout(seed, image_shape, spec,
                                            num_sets, perm)
  return boxes_in_crop(crops, flips, rows, cols, spec.patch_size,
                       spec.local_size, image_shape)


def _jigsaw_layout(seed: tf.Tensor, image_shape: tf.Tensor, spec: ViewSpec,
                   num_sets: int, perm: tf.Tensor | None
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """The jigsaw crops, their flips, and where each patch starts in them.

  Args:
    seed: [2] int stateless seed of this example's jigsaw sets.
    image_shape: (height, width, ...) of the image.
    spec: view geometry.
    num_sets: number of patch sets.
    perm: int32 [num_sets, grid^2] or None (random), see `jigsaw_boxes`.

  Returns:
    (crops float32 [S, 4] (top, left, height, width), flips bool [S],
    rows, cols float32 [S, grid^2]: the first pixel of each output patch
    in the resized, flipped crop).
  """
  crops, flips = local_crops(seed, image_shape, spec, num_sets)
  g, cell, patch = spec.grid, spec.cell_size, spec.patch_size
  if perm is None:
    # A different random permutation of the cells for each set.
    perm = tf.argsort(tf.random.stateless_uniform(
        [num_sets, g * g], _sub_seed(seed, _PERM_SEED)), axis=1)
  # Offsets of the patch inside its cell, uniform in [0, cell - patch].
  offsets = tf.floor((cell - patch + 1) * tf.random.stateless_uniform(
      [num_sets, g * g, 2], _sub_seed(seed, _OFFSET_SEED)))
  rows = tf.cast(perm // g * cell, tf.float32) + offsets[..., 0]
  cols = tf.cast(perm % g * cell, tf.float32) + offsets[..., 1]
  return crops, flips, rows, cols


def resample_patches(image: tf.Tensor, boxes: tf.Tensor,
                     size: int) -> tf.Tensor:
  """Bilinear RGB patches of `image` at `boxes`.

  Args:
    image: uint8 [H, W, 3].
    boxes: float32 [S, K, 4] normalised boxes (static S and K).
    size: patch side.

  Returns:
    uint8 [S, K, size, size, 3].
  """
  num_sets, k = boxes.shape[0], boxes.shape[1]
  patches = _resample(image, tf.reshape(boxes, [num_sets * k, 4]), size)
  return tf.reshape(patches, [num_sets, k, size, size, 3])


def jigsaw_views(image: tf.Tensor, seed: tf.Tensor, spec: ViewSpec,
                 num_sets: int = 2, perm: tf.Tensor | None = None
                 ) -> tf.Tensor:
  """The jigsaw patch sets.

  The pixels are those of `resample_patches(image, jigsaw_boxes(...))`
  (within float rounding: a pixel may differ by one grey level), made by
  resizing each jigsaw crop once and slicing it (module docstring).

  Args:
    image: uint8 [H, W, 3].
    seed: [2] int stateless seed of this example's jigsaw sets.
    spec: view geometry.
    num_sets: number of independent patch sets (2: P_q and P_k).
    perm: as for `jigsaw_boxes`; None: random.

  Returns:
    uint8 [num_sets, grid^2, patch_size, patch_size, 3], patches in shuffled
    order.
  """
  crops, flips, rows, cols = _jigsaw_layout(seed, tf.shape(image), spec,
                                            num_sets, perm)
  crops = tf.cast(crops, tf.int32)
  rows, cols = tf.cast(rows, tf.int32), tf.cast(cols, tf.int32)
  side, patch = spec.local_size, spec.patch_size
  sets = []
  for s in range(num_sets):
    top, left, height, width = (crops[s, i] for i in range(4))
    window = image[top:top + height, left:left + width]
    local = _round_to_uint8(tf.raw_ops.ResizeBilinear(
        images=window[None], size=[side, side], align_corners=True)[0])
    local = _flip(local, flips[s])
    sets.append(tf.stack([
        local[rows[s, k]:rows[s, k] + patch, cols[s, k]:cols[s, k] + patch]
        for k in range(spec.num_patches)]))
  return tf.ensure_shape(tf.stack(sets),
                         [num_sets, spec.num_patches, patch, patch, 3])


def detco_views(image: tf.Tensor, seed: tf.Tensor, spec: ViewSpec,
                with_local: bool = True) -> dict[str, tf.Tensor]:
  """All host-side views of one pretraining example.

  Args:
    image: uint8 [H, W, 3], decoded once.
    seed: [2] int stateless seed of this example (see `pipeline`).
    spec: view geometry.
    with_local: make the jigsaw sets (False for MoCo v2: global views only).

  Returns:
    {"global": uint8 [2, G, G, 3]} and, if `with_local`,
    {"local": uint8 [2, grid^2, p, p, 3]}.
  """
  views = {"global": global_views(image, _sub_seed(seed, _GLOBAL_SEED), spec)}
  if with_local:
    views["local"] = jigsaw_views(image, _sub_seed(seed, _LOCAL_SEED), spec)
  return views


# ----------------------------------------------------------------------------
# Linear-probe views.


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int,
                        area: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                        flip_prob: float = 0.5) -> tf.Tensor:
  """Probe training view: RandomResizedCrop to `size`^2 and a random flip.

  Args:
    image: uint8 [H, W, 3].
    seed: [2] int stateless seed.
    size: output side.
    area: area range of the crop (torchvision's default (0.08, 1)).
    ratio: aspect-ratio range of the crop.
    flip_prob: probability of a horizontal flip.

  Returns:
    uint8 [size, size, 3].
  """
  crops = sample_crops(_sub_seed(seed, _CROP_SEED), tf.shape(image), 1, area,
                       ratio)
  flips = _flips(_sub_seed(seed, _FLIP_SEED), 1, flip_prob)
  return crop_resize_flip(image, crops[0], flips[0], size)


def center_crop(image: tf.Tensor, resize: int, crop: int) -> tf.Tensor:
  """Probe test view: shorter side resized to `resize`, centre crop `crop`^2.

  Follows torchvision's Resize(resize) + CenterCrop(crop): the longer side
  becomes int(resize * long / short), the resize antialiases (PIL does), and
  the crop starts at round((side - crop) / 2).

  Args:
    image: uint8 [H, W, 3].
    resize: target length of the shorter side (>= crop).
    crop: output side.

  Returns:
    uint8 [crop, crop, 3].
  """
  if crop > resize:
    raise ValueError(f"The centre crop ({crop}) must not exceed the resize "
                     f"({resize}) of the shorter side.")
  shape = tf.shape(image)[:2]
  short = tf.reduce_min(shape)
  # torchvision truncates the longer side: int(resize * long / short).
  new_shape = tf.where(shape == short, resize, resize * shape // short)
  resized = tf.image.resize(image, new_shape, method="bilinear",
                            antialias=True)
  top = tf.cast(tf.round(tf.cast(new_shape[0] - crop, tf.float32) / 2),
                tf.int32)
  left = tf.cast(tf.round(tf.cast(new_shape[1] - crop, tf.float32) / 2),
                 tf.int32)
  window = resized[top:top + crop, left:left + crop]
  # Antialiased resampling can overshoot [0, 255] slightly: saturate.
  return _to_uint8(tf.ensure_shape(window, [crop, crop, 3]))
