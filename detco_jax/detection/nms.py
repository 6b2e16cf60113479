"""Greedy non-maximum suppression and RetinaNet inference, static shapes.

NMS visits the candidates in descending score order in a `lax.while_loop`
and suppresses, per kept box, the later boxes that overlap it by more than
the threshold (torchvision's rule: IoU > threshold). Each step computes one
row of IoUs, so memory stays O(N) rather than the O(N^2) of a precomputed
matrix (5000 RetinaNet candidates per image would be 100 MB per image), and
the loop stops at max_output kept boxes or at the first padding candidate.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

from detco_jax.detection import boxes as box_lib


def _greedy_nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array,
                classes: jax.Array | None, iou_threshold: float,
                max_output: int) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS; with `classes`, boxes only suppress boxes of their class."""
  n = boxes.shape[0]
  if n == 0:
    return (jnp.zeros((max_output,), jnp.int32),
            jnp.zeros((max_output,), bool))
  ok = valid & (scores > -jnp.inf)  # NaN scores count as padding too.
  order = jnp.argsort(-jnp.where(ok, scores, -jnp.inf), stable=True)
  boxes = boxes[order].astype(jnp.float32)
  # Padding sorts last, so the first padding candidate ends the loop.
  real = ok[order]
  same = jnp.asarray(classes)[order] if classes is not None else None
  later = jnp.arange(n)

  def cond(state):
    i, count, _, _ = state
    return (i < n) & (count < max_output) & real[jnp.minimum(i, n - 1)]

  def body(state):
    i, count, alive, out = state
    keep = alive[i]
    hit = box_lib.elementwise_iou(boxes[i], boxes) > iou_threshold
    if same is not None:
      hit &= same == same[i]
    alive &= ~(keep & hit & (later > i))
    out = out.at[count].set(jnp.where(keep, order[i], out[count]))
    return i + 1, count + keep.astype(jnp.int32), alive, out

  out = jnp.zeros((max_output,), jnp.int32)
  _, count, _, out = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.int32(0), real, out))
  return out.astype(jnp.int32), jnp.arange(max_output) < count


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float,
        max_output: int,
        valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy NMS with a static number of outputs.

  Args:
    boxes: boxes [N, 4], (x0, y0, x1, y1).
    scores: scores [N]; -inf (or NaN) marks padding.
    iou_threshold: a box is suppressed by a higher-scoring kept box whose
      IoU with it is > this.
    max_output: static number of output slots.
    valid: optional [N] bool, False for padding.

  Returns:
    (indices [max_output] int32 into boxes, in descending score order;
     valid [max_output] bool). Unused slots hold index 0 and valid False.
  """
  valid = jnp.ones(scores.shape, bool) if valid is None else valid
  return _greedy_nms(boxes, scores, valid, None, iou_threshold, max_output)


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array,
                iou_threshold: float, max_output: int,
                valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """NMS within each class: boxes of different classes never suppress.

  torchvision's batched_nms gets this by offsetting each class's boxes by
  class * (max coordinate + 1); here the IoU row is masked to the kept box's
  class instead: the same result, without the float32 rounding that offsets
  of 80 classes times an image size put into the IoUs.

  Args:
    boxes: boxes [N, 4].
    scores: scores [N]; -inf (or NaN) marks padding.
    classes: int classes [N].
    iou_threshold: suppression threshold (IoU > threshold suppresses).
    max_output: static number of output slots.
    valid: optional [N] bool, False for padding.

  Returns:
    (indices [max_output] int32, valid [max_output] bool), as `nms`.
  """
  valid = jnp.ones(scores.shape, bool) if valid is None else valid
  return _greedy_nms(boxes, scores, valid, classes, iou_threshold, max_output)


def _level_candidates(logits: jax.Array, deltas: jax.Array,
                      anchors: jax.Array, level_sizes: Sequence[int],
                      topk: int, weights: Sequence[float]
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k (anchor, class) pairs of each level: scores, boxes, classes."""
  num_classes = logits.shape[-1]
  scores, boxes, classes = [], [], []
  start = 0
  for size in level_sizes:
    flat = logits[start:start + size].reshape(-1).astype(jnp.float32)
    # top_k on logits: the same order as on sigmoids, but without the ties
    # of sigmoids that round to 1.0.
    top, idx = jax.lax.top_k(flat, min(topk, size * num_classes))
    anchor = start + idx // num_classes
    scores.append(jax.nn.sigmoid(top))
    boxes.append(box_lib.decode(anchors[anchor], deltas[anchor], weights))
    classes.append((idx % num_classes).astype(jnp.int32))
    start += size
  return (jnp.concatenate(scores), jnp.concatenate(boxes),
          jnp.concatenate(classes))


def _nonempty(boxes: jax.Array) -> jax.Array:
  """Boxes [N, 4] of positive width and height (detectron2's `nonempty`)."""
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _clip(boxes: jax.Array, image_size: jax.Array) -> jax.Array:
  """Clips boxes [N, 4] to an image of size (H, W)."""
  hi = jnp.stack([image_size[1], image_size[0]] * 2)
  return jnp.clip(boxes, 0.0, hi)


def postprocess(cls_logits: jax.Array, box_deltas: jax.Array,
                anchors: jax.Array, level_sizes: Sequence[int], *,
                image_size: tuple[int, int] | jax.Array,
                score_threshold: float = 0.05,
                topk_per_level: int = 1000, nms_threshold: float = 0.5,
                max_detections: int = 100,
                weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                clip_after_nms: bool = False) -> dict[str, jax.Array]:
  """RetinaNet inference (detectron2's `RetinaNet.inference`), batched.

  Per image and level: scores = sigmoid(logits) over all (anchor, class)
  pairs, the top min(topk_per_level, A_l * K) of them, those > the score
  threshold (the same set as detectron2's top min(topk, number above the
  threshold) of those above it); their anchors' boxes decoded and clipped
  to the image (boxes left empty by clipping dropped); then per-class NMS
  over all levels, keeping the best max_detections.

  detectron2 clips later: NMS sees the unclipped boxes, and its
  `detector_postprocess` clips the kept ones and drops those left empty
  (so fewer than max_detections may remain). `clip_after_nms` does that.

  Args:
    cls_logits: class logits [B, A, K], anchors in `boxes.anchors` order.
    box_deltas: predicted deltas [B, A, 4].
    anchors: anchors [A, 4].
    level_sizes: static anchor counts per level (`boxes.anchors_per_level`),
      summing to A.
    image_size: (H, W) of every image, or [B, 2] per image (the real size
      inside a padded batch).
    score_threshold: minimum score (exclusive) of a detection.
    topk_per_level: candidates per level before NMS.
    nms_threshold: per-class NMS IoU threshold.
    max_detections: static number of detection slots D.
    weights: Box2BoxTransform weights of the deltas.
    clip_after_nms: clip after NMS rather than before (detectron2's order).

  Returns:
    {"boxes": [B, D, 4], "scores": [B, D], "classes": [B, D] int32,
     "valid": [B, D] bool}, by descending score, valid slots first; invalid
    slots are zeros.
  """
  if sum(level_sizes) != anchors.shape[0]:
    raise ValueError(f"level_sizes {list(level_sizes)} sum to "
                     f"{sum(level_sizes)}, not the {anchors.shape[0]} anchors.")
  batch = cls_logits.shape[0]
  sizes = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (batch, 2))

  def one(logits, deltas, size):
    scores, boxes, classes = _level_candidates(
        logits, deltas, anchors, level_sizes, topk_per_level, weights)
    if not clip_after_nms:
      boxes = _clip(boxes, size)
    ok = (scores > score_threshold) & _nonempty(boxes)
    idx, valid = batched_nms(boxes, scores, classes, nms_threshold,
                             max_detections, ok)
    kept = boxes[idx]
    if clip_after_nms:
      kept = _clip(kept, size)
      valid &= _nonempty(kept)
      # Dropped slots move behind the kept ones, which keep their order.
      order = jnp.argsort(~valid, stable=True)
      idx, valid, kept = idx[order], valid[order], kept[order]
    return {"boxes": jnp.where(valid[:, None], kept, 0.0),
            "scores": jnp.where(valid, scores[idx], 0.0),
            "classes": jnp.where(valid, classes[idx], 0),
            "valid": valid}

  return jax.vmap(one)(cls_logits, box_deltas, sizes)
