"""RandAugment ("DetCo+AA") on device, pure JAX.

One op per layer, chosen uniformly from `RANDAUGMENT_OPS`, at a fixed
magnitude M (RandAugment's "N, M"; M on the usual 0..10 scale, m = M / 10).
Strengths, with a random sign where the op has one. The paper gives none, so
these are the common ones (RandAugment / timm), all growing with M:
  rotate +-30 m degrees; shear +-0.3 m; translate +-0.45 m of the side
  (100 px at 224); color / contrast / brightness / sharpness factor
  1 +- 0.9 m; solarize threshold 256 (1 - m) on the 0..255 scale (timm's
  "increasing" form; the TF reference's 256 m weakens with M); posterize
  to 8 - floor(4 m) bits (AutoAugment's 4..8 bit range).
Geometric ops use nearest-neighbour sampling about the image centre and fill
uncovered pixels with gray 128/255 (as the TF reference does).

Cost under `vmap`: all five geometric ops are one affine warp whose matrix is
selected per image (the identity for pixel ops, an exact no-op), so only one
gather per layer is paid. The pixel ops are all computed and selected (what
`lax.switch` does under `vmap` anyway), which is cheap except for equalize
(a 256-bin histogram per channel, a scatter-add). Layers run in a
`lax.scan`.

Images are float32 `[H, W, 3]` in [0, 1], one image per call; the view
pipeline (`augment.augment_views`) vmaps `randaugment` over the global views.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from detco_jax.data import colorspace

Array = jax.Array

RANDAUGMENT_OPS = (
    "identity", "autocontrast", "equalize", "rotate", "solarize", "color",
    "posterize", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
    "translate_x", "translate_y",
)
_RA_FILL = 128.0 / 255.0


def _blend(degenerate: Array, image: Array, factor: Array) -> Array:
  """PIL `ImageEnhance`: `clip(degenerate + factor (image - degenerate))`."""
  return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _to_levels(image: Array) -> Array:
  """Float [0, 1] to integer levels 0..255 (int32)."""
  return jnp.clip(jnp.round(image * 255.0), 0, 255).astype(jnp.int32)


def autocontrast(image: Array) -> Array:
  """Stretches each channel of `[H, W, 3]` to span [0, 1] (PIL, cutoff 0)."""
  lo = jnp.min(image, axis=(0, 1), keepdims=True)
  hi = jnp.max(image, axis=(0, 1), keepdims=True)
  span = hi - lo
  stretched = (image - lo) / jnp.where(span > 0, span, 1.0)
  return jnp.where(span > 0, stretched, image)


def equalize(image: Array) -> Array:
  """PIL `ImageOps.equalize` per channel of `[H, W, 3]`, exact on 0..255.

  The image is quantised to 256 levels, a histogram is taken per channel and
  PIL's lookup table is built from it: with `step = (n - count of the
  highest occupied level) // 255`, level i maps to
  `min(255, (step // 2 + #pixels below i) // step)`, or to itself when
  `step == 0`.
  """
  levels = _to_levels(image)                         # [H, W, 3]
  channel = jnp.arange(3, dtype=jnp.int32)
  flat = (levels + 256 * channel).reshape(-1)
  hist = jnp.bincount(flat, length=3 * 256).reshape(3, 256)
  bins = jnp.arange(256, dtype=jnp.int32)
  last = jnp.max(jnp.where(hist > 0, bins, -1), axis=1, keepdims=True)
  last_count = jnp.take_along_axis(hist, last, axis=1)
  total = levels.shape[0] * levels.shape[1]
  step = (total - last_count) // 255                 # [3, 1]
  below = jnp.cumsum(hist, axis=1) - hist            # Pixels below level i.
  safe_step = jnp.maximum(step, 1)
  lut = jnp.minimum((safe_step // 2 + below) // safe_step, 255)
  lut = jnp.where(step > 0, lut, bins)               # [3, 256]
  out = jnp.take_along_axis(lut.T, levels.reshape(-1, 3), axis=0)
  return out.reshape(image.shape).astype(jnp.float32) / 255.0


def solarize(image: Array, threshold: float) -> Array:
  """Inverts the levels `>= threshold` (0..256 scale), as PIL does."""
  return jnp.where(image * 255.0 >= threshold, 1.0 - image, image)


def posterize(image: Array, bits: int) -> Array:
  """Keeps the `bits` most significant bits of each 0..255 level."""
  mask = (0xFF << (8 - bits)) & 0xFF
  return (_to_levels(image) & mask).astype(jnp.float32) / 255.0


def sharpness(image: Array, factor: Array) -> Array:
  """PIL `ImageEnhance.Sharpness` on `[H, W, 3]`.

  The degenerate image is PIL's SMOOTH filter (3x3, centre weight 5, others 1,
  over 13) on the interior, with the one-pixel border left unchanged.
  """
  return _blend(_smooth(image), image, factor)


def _smooth(image: Array) -> Array:
  """PIL's SMOOTH filter on the interior of `[H, W, 3]`, border unchanged."""
  h, w = image.shape[0], image.shape[1]
  # Separable 3x3 box sum (edge padding only feeds the border, which is
  # replaced by the original pixels below), plus 4x the centre.
  padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
  rows = padded[:-2] + padded[1:-1] + padded[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = (box + 4.0 * image) / 13.0
  yy = jnp.arange(h)[:, None, None]
  xx = jnp.arange(w)[None, :, None]
  interior = (yy > 0) & (yy < h - 1) & (xx > 0) & (xx < w - 1)
  return jnp.where(interior, smooth, image)


def _affine_warp(image: Array, matrix: Array, fill: float) -> Array:
  """Nearest-neighbour inverse warp of `[H, W, C]` about the image centre.

  Args:
    image: `[H, W, C]`.
    matrix: `[2, 3]` map from an output pixel's centred (x, y, 1) to its
      source's centred (x, y). The identity gives back `image` exactly.
    fill: value of output pixels whose source is outside the image.

  Returns:
    The warped image.
  """
  h, w, c = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
  src_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] + cx
  src_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] + cy
  ix = jnp.round(src_x).astype(jnp.int32)
  iy = jnp.round(src_y).astype(jnp.int32)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  flat = jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)
  out = jnp.take(image.reshape(h * w, c), flat.reshape(-1), axis=0)
  out = out.reshape(h, w, c)
  return jnp.where(inside[..., None], out, jnp.asarray(fill, image.dtype))


def _geometric_matrices(m: float, sign: Array, side: int) -> Array:
  """`[len(RANDAUGMENT_OPS), 2, 3]` inverse maps; identity for pixel ops."""
  eye = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], jnp.float32)
  theta = sign * jnp.deg2rad(30.0 * m)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  shear = sign * 0.3 * m
  shift = sign * 0.45 * m * side
  zero, one = jnp.float32(0.0), jnp.float32(1.0)
  by_name = {
      # Source = R(-theta) output: a counter-clockwise rotation on screen.
      "rotate": jnp.stack([jnp.stack([cos, -sin, zero]),
                           jnp.stack([sin, cos, zero])]),
      "shear_x": jnp.stack([jnp.stack([one, shear, zero]),
                            jnp.stack([zero, one, zero])]),
      "shear_y": jnp.stack([jnp.stack([one, zero, zero]),
                            jnp.stack([shear, one, zero])]),
      "translate_x": jnp.stack([jnp.stack([one, zero, shift]),
                                jnp.stack([zero, one, zero])]),
      "translate_y": jnp.stack([jnp.stack([one, zero, zero]),
                                jnp.stack([zero, one, shift])]),
  }
  return jnp.stack([by_name.get(name, eye) for name in RANDAUGMENT_OPS])


def _pixel_op(image: Array, op: Array, sign: Array, m: float) -> Array:
  """The pixel part of RandAugment op `op`; the identity for geometric ops.

  Every candidate is computed and one is selected with `jnp.where` on a
  per-image scalar: under `vmap` a `lax.switch` does the same, but its
  select of nine materialised images measured 1.4x slower on XLA:CPU than
  these fused selects. The four enhance ops share one blend whose degenerate
  image is selected (black, grayscale, mean gray or smoothed).
  """
  def is_op(*names):
    return functools.reduce(
        jnp.logical_or, [op == RANDAUGMENT_OPS.index(n) for n in names])

  factor = jnp.maximum(1.0 + sign * 0.9 * m, 0.0)
  degenerate = jnp.where(
      is_op("color"), colorspace.to_grayscale(image),
      jnp.where(is_op("contrast"), colorspace.mean_luma(image),
                jnp.where(is_op("sharpness"), _smooth(image), 0.0)))
  out = jnp.where(
      is_op("color", "contrast", "brightness", "sharpness"),
      _blend(degenerate, image, factor), image)
  out = jnp.where(is_op("solarize"), solarize(image, 256.0 * (1.0 - m)), out)
  out = jnp.where(is_op("posterize"), posterize(image, max(1, 8 - int(4 * m))),
                  out)
  out = jnp.where(is_op("autocontrast"), autocontrast(image), out)
  return jnp.where(is_op("equalize"), equalize(image), out)


def apply_randaugment_op(image: Array, op: Array | int, sign: Array | float,
                         magnitude: float) -> Array:
  """Applies RandAugment op number `op` (in `RANDAUGMENT_OPS`) to one image.

  Args:
    image: float32 `[H, W, 3]` in [0, 1].
    op: index into `RANDAUGMENT_OPS`; may be traced (and batched by `vmap`).
    sign: +1 or -1, the direction of ops that have one.
    magnitude: RandAugment's M (0..10 scale), static.

  Returns:
    The transformed image, `[H, W, 3]` float32 in [0, 1].
  """
  if magnitude < 0:
    raise ValueError(f"magnitude must be >= 0, got {magnitude}.")
  m = float(magnitude) / 10.0
  side = min(image.shape[0], image.shape[1])
  image = image.astype(jnp.float32)
  op = jnp.asarray(op, jnp.int32)
  sign = jnp.asarray(sign, jnp.float32)
  image = _pixel_op(image, op, sign, m)
  # Pixel ops select the identity matrix, an exact no-op of the warp. A
  # one-hot product, not a gather, so the per-pixel loop reads 6 scalars.
  onehot = jax.nn.one_hot(op, len(RANDAUGMENT_OPS), dtype=jnp.float32)
  matrices = _geometric_matrices(m, sign, side)
  matrix = jnp.einsum("o,oij->ij", onehot, matrices,
                      precision=lax.Precision.HIGHEST)
  return _affine_warp(image, matrix, _RA_FILL)


def randaugment(image: Array, rng: Array, *, num_layers: int,
                magnitude: float) -> Array:
  """RandAugment (Cubuk et al. 2020) on one image, pure JAX.

  Each of `num_layers` layers applies one op drawn uniformly from
  `RANDAUGMENT_OPS` (identity, autocontrast, equalize, rotate, solarize,
  color, posterize, contrast, brightness, sharpness, shear_x/y,
  translate_x/y) at strength `magnitude` (0..10 scale; the module docstring
  gives each op's range), with a random sign per layer. Equalize is exact
  (PIL's algorithm on 256 levels), not an approximation.

  Args:
    image: float32 `[H, W, 3]` in [0, 1].
    rng: a PRNG key.
    num_layers: number of ops applied in sequence (RandAugment's N).
    magnitude: strength (RandAugment's M), static.

  Returns:
    The augmented image, `[H, W, 3]` float32 in [0, 1].
  """
  num_ops = len(RANDAUGMENT_OPS)
  u = jax.random.uniform(rng, (num_layers, 2))  # One draw for all layers.
  ops = jnp.minimum((u[:, 0] * num_ops).astype(jnp.int32), num_ops - 1)
  signs = jnp.where(u[:, 1] < 0.5, 1.0, -1.0)

  def layer(x, op_sign):
    return apply_randaugment_op(x, op_sign[0], op_sign[1], magnitude), None

  # A scan materialises each layer's output: unrolled, XLA fuses a layer's
  # warp (a gather) into every read of the next layer's ops and re-runs it.
  image, _ = lax.scan(layer, image.astype(jnp.float32), (ops, signs))
  return image
