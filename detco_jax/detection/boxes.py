"""Anchors, box overlaps, anchor matching and the box <-> delta transform.

Boxes are float32 (x0, y0, x1, y1) in pixels. The anchor grid is a NumPy
constant of the image size (it never changes during a run); everything else
is jnp and jit-able with static shapes.
"""

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# detectron2's Box2BoxTransform clamp on dw, dh: no box grows past 1000/16
# times its anchor, so exp() cannot overflow on a wild prediction.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def num_anchors_per_location(
    scales_per_octave: int = 3,
    ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> int:
  """How many anchors sit at each feature-map location.

  Args:
    scales_per_octave: anchor scales per level.
    ratios: aspect ratios h / w.

  Returns:
    scales_per_octave * len(ratios), the A of a head output [.., A * C].
  """
  return scales_per_octave * len(ratios)


def level_shapes(image_size: tuple[int, int],
                 levels: Sequence[int]) -> list[tuple[int, int]]:
  """Feature-map shapes (H_l, W_l) = ceil(S / 2**l) of pyramid levels.

  ceil is what stride-2 convolutions with padding k // 2 produce, stacked.

  Args:
    image_size: (H, W) of the (padded) input image.
    levels: pyramid levels l (stride 2**l), e.g. (3, 4, 5, 6, 7).

  Returns:
    One (H_l, W_l) per level.
  """
  h, w = image_size
  return [(-(-h // 2**l), -(-w // 2**l)) for l in levels]


def anchors_per_level(image_size: tuple[int, int], levels: Sequence[int],
                      scales_per_octave: int = 3,
                      ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> list[int]:
  """Anchor counts H_l * W_l * A of each level (the `level_sizes` of nms).

  Args:
    image_size: (H, W) of the input image.
    levels: pyramid levels.
    scales_per_octave: anchor scales per level.
    ratios: aspect ratios h / w.

  Returns:
    One count per level, in the order of `anchors`.
  """
  a = num_anchors_per_location(scales_per_octave, ratios)
  return [h * w * a for h, w in level_shapes(image_size, levels)]


def _cell_anchors(size: float, scales_per_octave: int,
                  ratios: Sequence[float]) -> np.ndarray:
  """Anchors [A, 4] centred at the origin, scale-major then ratio."""
  out = []
  for i in range(scales_per_octave):
    area = (size * 2.0**(i / scales_per_octave))**2
    for r in ratios:
      w = math.sqrt(area / r)
      h = r * w
      out.append((-w / 2, -h / 2, w / 2, h / 2))
  return np.asarray(out, np.float64)


def anchors(image_size: tuple[int, int], levels: Sequence[int],
            sizes: Sequence[float], scales_per_octave: int = 3,
            ratios: Sequence[float] = (0.5, 1.0, 2.0),
            offset: float = 0.5) -> np.ndarray:
  """The RetinaNet anchor grid of an image size, in head-output order.

  At level l (stride 2**l) with base size s, each location carries
  scales_per_octave * len(ratios) anchors of area (s * 2**(i / spo))**2 and
  aspect ratio h / w = r, ordered scale-major, then ratio (detectron2's
  DefaultAnchorGenerator). Location (y, x) is centred at
  ((x + offset) * stride, (y + offset) * stride). The default offset 0.5
  puts the centre in the middle of the cell's receptive field (TF Model
  Garden); detectron2's default is offset 0.0 (the cell's corner).

  Order: level, then y, then x, then (scale, ratio): exactly a head output
  [B, H_l, W_l, A * C] reshaped to [B, H_l * W_l * A, C] and concatenated
  over levels.

  Args:
    image_size: (H, W) of the input image.
    levels: pyramid levels l, e.g. (3, 4, 5, 6, 7).
    sizes: base anchor size of each level, e.g. (32, 64, 128, 256, 512).
    scales_per_octave: anchor scales per level.
    ratios: aspect ratios h / w.
    offset: centre of a cell in units of the stride (see above).

  Returns:
    float32 boxes [sum_l H_l * W_l * A, 4], (x0, y0, x1, y1) in pixels.
  """
  if len(levels) != len(sizes):
    raise ValueError(f"One anchor size per level: got levels {levels} and "
                     f"sizes {sizes}.")
  out = []
  for l, s, (h, w) in zip(levels, sizes, level_shapes(image_size, levels)):
    stride = 2.0**l
    cx, cy = np.meshgrid((np.arange(w) + offset) * stride,
                         (np.arange(h) + offset) * stride)  # [H, W], y-major.
    centres = np.stack([cx, cy, cx, cy], -1).reshape(-1, 1, 4)
    cell = _cell_anchors(s, scales_per_octave, ratios)[None]
    out.append((centres + cell).reshape(-1, 4))
  return np.concatenate(out).astype(np.float32)


def _area(b: jax.Array) -> jax.Array:
  """Area [...] of boxes [..., 4]; inverted boxes count as empty."""
  return (jnp.maximum(b[..., 2] - b[..., 0], 0) *
          jnp.maximum(b[..., 3] - b[..., 1], 0))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den where den > 0, else 0 (no NaN, no NaN gradient either)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _overlaps(a: jax.Array,
              b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(intersection, union, enclosing-box area) of broadcast box pairs."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  lo = jnp.maximum(a[..., :2], b[..., :2])
  hi = jnp.minimum(a[..., 2:], b[..., 2:])
  inter = jnp.prod(jnp.maximum(hi - lo, 0), axis=-1)
  union = _area(a) + _area(b) - inter
  enc_lo = jnp.minimum(a[..., :2], b[..., :2])
  enc_hi = jnp.maximum(a[..., 2:], b[..., 2:])
  enclose = jnp.prod(jnp.maximum(enc_hi - enc_lo, 0), axis=-1)
  return inter, union, enclose


def elementwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of boxes a[..., 4] and b[..., 4], broadcast against each other.

  Args:
    a: boxes [..., 4].
    b: boxes [..., 4].

  Returns:
    IoU [...]; 0 where the union is empty (zero-area boxes), never NaN.
  """
  inter, union, _ = _overlaps(a, b)
  return _safe_div(inter, union)


def elementwise_giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Generalised IoU (Rezatofighi et al. 2019) of broadcast box pairs.

  GIoU = IoU - (C - U) / C, with C the area of the smallest enclosing box.

  Args:
    a: boxes [..., 4].
    b: boxes [..., 4].

  Returns:
    GIoU [...] in [-1, 1]; terms with an empty denominator count as 0.
  """
  inter, union, enclose = _overlaps(a, b)
  return _safe_div(inter, union) - _safe_div(enclose - union, enclose)


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise IoU.

  Args:
    a: boxes [N, 4].
    b: boxes [M, 4].

  Returns:
    IoU [N, M]; 0 for pairs with an empty union (zero-area boxes).
  """
  return elementwise_iou(a[:, None], b[None])


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise generalised IoU.

  Args:
    a: boxes [N, 4].
    b: boxes [M, 4].

  Returns:
    GIoU [N, M].
  """
  return elementwise_giou(a[:, None], b[None])


def match(anchors: jax.Array, gt: jax.Array, gt_valid: jax.Array,
          fg_iou: float = 0.5, bg_iou: float = 0.4,
          low_quality: bool = True) -> tuple[jax.Array, jax.Array]:
  """Assigns each anchor a ground-truth box (detectron2's Matcher).

  An anchor's match is the valid gt of highest IoU (the first on ties). Its
  label is 1 (foreground) if that IoU >= fg_iou, 0 (background) if it is
  < bg_iou, and -1 (ignored) in between. With `low_quality`, every anchor
  that ties a valid gt's highest IoU becomes foreground too (its match
  stays the argmax gt, as in detectron2), so no gt is left without an
  anchor. Unlike detectron2, a gt that overlaps no anchor at all (highest
  IoU 0) promotes nothing: otherwise every anchor would tie at 0.

  Args:
    anchors: anchors [A, 4].
    gt: ground-truth boxes [G, 4], padded.
    gt_valid: [G] bool, False for padding; padding never matches.
    fg_iou: foreground IoU threshold.
    bg_iou: background IoU threshold (<= fg_iou).
    low_quality: allow the low-quality matches above.

  Returns:
    (matched [A] int32 index into gt, meaningful where label == 1;
     label [A] int32 in {1, 0, -1}). Without valid gt, all background.
  """
  # [G, A]; padding rows at -1 lose every argmax and fall below bg_iou.
  q = jnp.where(gt_valid[:, None], iou(gt, anchors), -1.0)
  best = q.max(axis=0)
  matched = jnp.argmax(q, axis=0).astype(jnp.int32)
  label = jnp.where(best >= fg_iou, 1, jnp.where(best < bg_iou, 0, -1))
  if low_quality:
    per_gt = q.max(axis=1, keepdims=True)
    ties = (q == per_gt) & (per_gt > 0) & gt_valid[:, None]
    label = jnp.where(ties.any(axis=0), 1, label)
  return matched, label.astype(jnp.int32)


def _centre_size(b: jax.Array) -> tuple[jax.Array, ...]:
  """(cx, cy, w, h) of boxes [..., 4]."""
  w = b[..., 2] - b[..., 0]
  h = b[..., 3] - b[..., 1]
  return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(anchors: jax.Array, boxes: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jax.Array:
  """Deltas that take anchors to boxes (detectron2's Box2BoxTransform).

  dx = wx (bx - ax) / aw, dy = wy (by - ay) / ah, dw = ww log(bw / aw),
  dh = wh log(bh / ah), with (x, y) box centres and (w, h) sizes.

  Args:
    anchors: anchors [..., 4] (positive sizes).
    boxes: target boxes [..., 4] (positive sizes), same shape.
    weights: (wx, wy, ww, wh); RetinaNet uses all ones.

  Returns:
    float32 deltas [..., 4] = (dx, dy, dw, dh).
  """
  ax, ay, aw, ah = _centre_size(anchors.astype(jnp.float32))
  bx, by, bw, bh = _centre_size(boxes.astype(jnp.float32))
  wx, wy, ww, wh = weights
  return jnp.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                    ww * jnp.log(bw / aw), wh * jnp.log(bh / ah)], axis=-1)


def decode(anchors: jax.Array, deltas: jax.Array,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           clip: float = DEFAULT_SCALE_CLAMP) -> jax.Array:
  """Boxes from anchors and deltas, the inverse of `encode`.

  Args:
    anchors: anchors [..., 4], broadcastable against deltas.
    deltas: (dx, dy, dw, dh) [..., 4].
    weights: (wx, wy, ww, wh), as given to `encode`.
    clip: upper clamp of dw / ww and dh / wh before exp().

  Returns:
    float32 boxes [..., 4].
  """
  ax, ay, aw, ah = _centre_size(anchors.astype(jnp.float32))
  deltas = deltas.astype(jnp.float32)
  wx, wy, ww, wh = weights
  cx = deltas[..., 0] / wx * aw + ax
  cy = deltas[..., 1] / wy * ah + ay
  w = jnp.exp(jnp.minimum(deltas[..., 2] / ww, clip)) * aw
  h = jnp.exp(jnp.minimum(deltas[..., 3] / wh, clip)) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)
