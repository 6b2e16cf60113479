"""The sigmoid focal loss and the RetinaNet training loss.

The RetinaNet loss follows detectron2's `RetinaNet.losses`: anchors are
matched to the ground truth of their image, foreground anchors get a one-hot
target of their gt's class, background anchors all zeros, ignored anchors no
classification loss; the box loss covers foreground anchors only; both sums
are divided by the number of foreground anchors of the whole batch, or by
detectron2's moving average of it (`loss_normalizer`).
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from detco_jax.detection import boxes as box_lib

BOX_LOSSES = ("l1", "smooth_l1", "giou")
# detectron2's starting value of the moving foreground count (RetinaNet's
# `losses`). It starts each GPU's count there: over a global batch spread on
# G GPUs, G * 100 starts where detectron2 does (800 for 16 images on 8). The
# start fades as 0.9**step, within the first ~50 warm-up steps.
NORMALIZER_INIT = 100.0


def loss_normalizer(num_fg: jax.Array, previous: jax.Array | None = None,
                    momentum: float = 0.0) -> jax.Array:
  """What the summed RetinaNet losses are divided by.

  detectron2's `RetinaNet.losses` keeps an exponential moving average of the
  foreground count, `momentum * previous + (1 - momentum) * max(n, 1)`: with
  few images per GPU the count of one batch varies a lot, and dividing by
  it alone cost detectron2 AP. With `previous` None (or momentum 0) it is
  the batch's own `max(n, 1)`.

  Here n counts the global batch; detectron2 counts and averages each GPU's
  share separately, and averaging the gradients over its GPUs then comes to
  the same normaliser scaled to the global batch, apart from the starting
  value (see `NORMALIZER_INIT`).

  Args:
    num_fg: foreground anchors of the batch (an int or float scalar).
    previous: the moving average after the last step, or None.
    momentum: weight of `previous`, in [0, 1).

  Returns:
    The float32 normaliser of this step (also the new moving average).
  """
  count = jnp.maximum(num_fg, 1).astype(jnp.float32)
  if previous is None:
    return count
  return momentum * jnp.asarray(previous, jnp.float32) + (1 - momentum) * count


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array,
                       alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Focal loss of independent sigmoids (Lin et al. 2017), elementwise.

  As torchvision's `sigmoid_focal_loss` with reduction "none":
  alpha_t (1 - p_t)**gamma BCE(logits, targets).

  Args:
    logits: logits [...], any float dtype (computed in float32).
    targets: targets in [0, 1], same shape.
    alpha: weight of positives (1 - alpha for negatives); < 0 disables it.
    gamma: focusing exponent; 0 gives plain (alpha-weighted) BCE.

  Returns:
    float32 loss [...], finite for any finite logits.
  """
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  # BCE with logits via log-sigmoid: no log(0) when |x| is large.
  ce = -(t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x))
  loss = ce
  if gamma:
    # 1 - p_t without 1 - sigmoid(x), which rounds to 0 for large x.
    one_minus_pt = t * jax.nn.sigmoid(-x) + (1 - t) * jax.nn.sigmoid(x)
    loss = loss * one_minus_pt**gamma
  if alpha >= 0:
    loss = loss * (alpha * t + (1 - alpha) * (1 - t))
  return loss


def _box_loss(kind: str, deltas: jax.Array, anchors: jax.Array,
              target_boxes: jax.Array, weights: Sequence[float],
              beta: float) -> jax.Array:
  """Per-anchor box loss [B, A] of predicted deltas against target boxes."""
  if kind == "giou":
    pred = box_lib.decode(anchors, deltas, weights)
    return 1.0 - box_lib.elementwise_giou(pred, target_boxes)
  diff = jnp.abs(deltas - box_lib.encode(anchors, target_boxes, weights))
  # fvcore's smooth_l1_loss: beta below 1e-5 is exactly L1.
  if kind == "smooth_l1" and beta >= 1e-5:
    diff = jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta)
  return diff.sum(axis=-1)


def retinanet_loss(
    cls_logits: jax.Array, box_deltas: jax.Array, anchors: jax.Array,
    gt_boxes: jax.Array, gt_labels: jax.Array, gt_valid: jax.Array, *,
    alpha: float = 0.25, gamma: float = 2.0, fg_iou: float = 0.5,
    bg_iou: float = 0.4, low_quality: bool = True, box_loss: str = "l1",
    smooth_l1_beta: float = 0.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    normalizer: jax.Array | None = None, normalizer_momentum: float = 0.0,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """RetinaNet's focal + box loss over a batch with padded ground truth.

  Args:
    cls_logits: class logits [B, A, K], anchors in `boxes.anchors` order.
    box_deltas: predicted (dx, dy, dw, dh) [B, A, 4].
    anchors: anchors [A, 4].
    gt_boxes: ground-truth boxes [B, G, 4], padded.
    gt_labels: int classes [B, G] in 0..K-1 (any value for padding).
    gt_valid: [B, G] bool, False for padding.
    alpha: focal loss alpha.
    gamma: focal loss gamma.
    fg_iou: IoU from which an anchor is foreground.
    bg_iou: IoU below which an anchor is background.
    low_quality: let each gt's best anchors be foreground (see `match`).
    box_loss: "l1" on deltas (detectron2's smooth L1 with beta 0),
      "smooth_l1" on deltas with `smooth_l1_beta`, or "giou" on decoded
      boxes.
    smooth_l1_beta: beta of "smooth_l1".
    weights: Box2BoxTransform weights of the deltas.
    normalizer: the moving foreground count after the previous step (see
      `loss_normalizer`); None divides by this batch's count alone.
    normalizer_momentum: the moving average's momentum (detectron2: 0.9).

  Returns:
    (total loss, metrics): "loss", "cls_loss", "box_loss" (each already
    divided by max(1, foreground anchors in the batch), or by the moving
    count), "num_fg" (the mean number of foreground anchors per image) and,
    with a `normalizer`, "loss_normalizer": the moving count after this
    step, which the next step takes as its `normalizer`.
  """
  if box_loss not in BOX_LOSSES:
    raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}.")
  match = jax.vmap(lambda g, v: box_lib.match(anchors, g, v, fg_iou, bg_iou,
                                              low_quality))
  matched, label = match(gt_boxes, gt_valid)  # [B, A] each.
  fg = label == 1
  take = jax.vmap(lambda x, i: x[i])
  num_classes = cls_logits.shape[-1]
  cls_target = jax.nn.one_hot(take(gt_labels, matched), num_classes)
  cls_target = jnp.where(fg[..., None], cls_target, 0.0)
  focal = sigmoid_focal_loss(cls_logits, cls_target, alpha, gamma)
  cls_sum = jnp.where((label >= 0)[..., None], focal, 0.0).sum()

  # Non-foreground anchors regress onto themselves: their (masked) target
  # must stay finite, since padding gt boxes would give log(0) deltas and
  # a NaN that leaks through the where's gradient.
  target = jnp.where(fg[..., None], take(gt_boxes, matched), anchors[None])
  per_anchor = _box_loss(box_loss, box_deltas, anchors[None], target, weights,
                         smooth_l1_beta)
  box_sum = jnp.where(fg, per_anchor, 0.0).sum()

  num_fg = fg.sum()
  norm = loss_normalizer(num_fg, normalizer, normalizer_momentum)
  cls, box = cls_sum / norm, box_sum / norm
  total = cls + box
  metrics = {"loss": total, "cls_loss": cls, "box_loss": box,
             "num_fg": num_fg / fg.shape[0]}
  if normalizer is not None:
    metrics["loss_normalizer"] = norm
  return total, metrics
