"""RetinaNet building blocks against NumPy loops written from the definitions.

Every function under test is called through jax.jit.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax.detection import boxes
from detco_jax.detection import losses
from detco_jax.detection import nms


# --- NumPy references, one box (pair) at a time ------------------------------


def np_area(b):
  return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def np_iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  union = np_area(a) + np_area(b) - iw * ih
  return iw * ih / union if union > 0 else 0.0


def np_giou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  c = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
  ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
  union = np_area(a) + np_area(b) - iw * ih
  return np_iou(a, b) - ((c - union) / c if c > 0 else 0.0)


def np_encode(anchor, box, weights=(1.0, 1.0, 1.0, 1.0)):
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  bw, bh = box[2] - box[0], box[3] - box[1]
  ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
  bx, by = box[0] + bw / 2, box[1] + bh / 2
  wx, wy, ww, wh = weights
  return np.array([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                   ww * math.log(bw / aw), wh * math.log(bh / ah)])


def np_decode(anchor, delta, weights=(1.0, 1.0, 1.0, 1.0),
              clip=math.log(1000 / 16)):
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
  wx, wy, ww, wh = weights
  cx, cy = ax + delta[0] / wx * aw, ay + delta[1] / wy * ah
  w = aw * math.exp(min(delta[2] / ww, clip))
  h = ah * math.exp(min(delta[3] / wh, clip))
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def np_match(anchors, gt, valid, fg=0.5, bg=0.4, low_quality=True):
  """detectron2's Matcher rules, one anchor and one gt at a time."""
  ious = np.array([[np_iou(g, a) for a in anchors] for g in gt])
  matched = np.zeros(len(anchors), int)
  label = np.zeros(len(anchors), int)
  for a in range(len(anchors)):
    best = -1.0
    for g in range(len(gt)):
      if valid[g] and ious[g, a] > best:
        best, matched[a] = ious[g, a], g
    label[a] = 1 if best >= fg else (0 if best < bg else -1)
  if low_quality:
    for g in range(len(gt)):
      top = ious[g].max()
      if valid[g] and top > 0:
        label[ious[g] == top] = 1
  return matched, label


def np_focal(x, t, alpha=0.25, gamma=2.0):
  """torchvision's formula, with BCE written stably (log1p(exp(-|x|)))."""
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  log_p = -(np.maximum(-x, 0) + np.log1p(np.exp(-np.abs(x))))  # log sigmoid x
  log_1mp = -(np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))))  # log(1-p)
  p = np.exp(log_p)
  ce = -(t * log_p + (1 - t) * log_1mp)
  p_t = p * t + (1 - p) * (1 - t)
  return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t)**gamma


def np_greedy_nms(bxs, scores, thr, classes=None):
  """Greedy NMS by the definition: best first, drop what overlaps > thr."""
  order = [int(i) for i in np.argsort(-scores, kind="stable")
           if np.isfinite(scores[i])]
  keep, dead = [], set()
  for pos, i in enumerate(order):
    if i in dead:
      continue
    keep.append(i)
    for j in order[pos + 1:]:
      if classes is not None and classes[j] != classes[i]:
        continue
      if np_iou(bxs[i], bxs[j]) > thr:
        dead.add(j)
  return keep


def random_boxes(rng, n, lo=0.0, hi=100.0, min_size=2.0, max_size=40.0):
  xy = rng.uniform(lo, hi, size=(n, 2))
  wh = rng.uniform(min_size, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# --- anchors -----------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.5, 0.0])
def test_anchor_count_order_centres_areas_and_ratios(offset):
  image, levels, sizes, spo = (70, 100), (3, 4), (32.0, 64.0), 3
  ratios = (0.5, 1.0, 2.0)
  got = boxes.anchors(image, levels, sizes, spo, ratios, offset=offset)
  assert boxes.level_shapes(image, levels) == [(9, 13), (5, 7)]
  assert boxes.num_anchors_per_location(spo, ratios) == 9
  assert boxes.anchors_per_level(image, levels, spo, ratios) == [
      9 * 13 * 9, 5 * 7 * 9]
  assert got.shape == (9 * 13 * 9 + 5 * 7 * 9, 4) and got.dtype == np.float32
  k = 0
  for level, size, (h, w) in zip(levels, sizes, [(9, 13), (5, 7)]):
    stride = 2**level
    for y in range(h):
      for x in range(w):
        for i in range(spo):
          for r in ratios:
            b = got[k].astype(np.float64)
            k += 1
            bw, bh = b[2] - b[0], b[3] - b[1]
            np.testing.assert_allclose(
                [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2],
                [(x + offset) * stride, (y + offset) * stride], atol=1e-4)
            np.testing.assert_allclose(bw * bh, (size * 2**(i / spo))**2,
                                       rtol=1e-5)
            np.testing.assert_allclose(bh / bw, r, rtol=1e-5)
  assert k == len(got)


def test_anchor_order_is_the_reshaped_head_output_order():
  image, levels, spo, ratios = (32, 48), (3, 4), 2, (0.5, 2.0)
  a = boxes.num_anchors_per_location(spo, ratios)
  got = boxes.anchors(image, levels, (16.0, 32.0), spo, ratios)
  # A head's output [1, H, W, A * C] whose entries name their (level, y, x, a).
  flat = []
  for level, (h, w) in zip(levels, boxes.level_shapes(image, levels)):
    out = np.zeros((1, h, w, a * 4))
    for y in range(h):
      for x in range(w):
        for j in range(a):
          out[0, y, x, 4 * j:4 * j + 4] = (level, y, x, j)
    flat.append(out.reshape(1, h * w * a, 4)[0])
  names = np.concatenate(flat)
  for (level, y, x, j), b in zip(names, got):
    stride = 2**level
    assert (b[0] + b[2]) / 2 == pytest.approx((x + 0.5) * stride)
    assert (b[1] + b[3]) / 2 == pytest.approx((y + 0.5) * stride)
    ratio = (b[3] - b[1]) / (b[2] - b[0])
    assert ratio == pytest.approx(ratios[int(j) % len(ratios)], rel=1e-5)


# --- IoU / GIoU --------------------------------------------------------------


def test_iou_and_giou_match_numpy_including_degenerate_boxes():
  rng = np.random.default_rng(0)
  special = np.array([
      [0, 0, 10, 10],    # reference
      [20, 20, 30, 30],  # disjoint
      [2, 2, 6, 6],      # nested in the reference
      [0, 0, 10, 10],    # identical
      [5, 5, 5, 5],      # zero area, inside the reference
      [5, 5, 5, 9],      # zero width
      [5, 5, 5, 5],      # zero area, identical to the other point
  ], np.float32)
  a = np.concatenate([special, random_boxes(rng, 20)])
  b = np.concatenate([special, random_boxes(rng, 15)])
  got_iou = np.asarray(jax.jit(boxes.iou)(a, b))
  got_giou = np.asarray(jax.jit(boxes.giou)(a, b))
  assert got_iou.shape == (len(a), len(b))
  assert np.isfinite(got_iou).all() and np.isfinite(got_giou).all()
  ref_iou = np.array([[np_iou(x, y) for y in b] for x in a])
  ref_giou = np.array([[np_giou(x, y) for y in b] for x in a])
  np.testing.assert_allclose(got_iou, ref_iou, atol=1e-6)
  np.testing.assert_allclose(got_giou, ref_giou, atol=1e-6)
  assert got_iou[0, 1] == 0 and got_iou[0, 3] == 1
  assert got_iou[0, 2] == pytest.approx(16 / 100)
  assert (got_iou[4:7, :7] == 0).all() and (got_iou[:7, 4:7] == 0).all()
  # Disjoint boxes: GIoU = -(C - U) / C with C the 30 x 30 enclosing box.
  assert got_giou[0, 1] == pytest.approx(-(900 - 200) / 900)


def test_iou_gradient_is_finite_for_zero_area_boxes():
  a = jnp.array([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 4.0, 4.0]])
  grad = jax.jit(jax.grad(lambda x: boxes.giou(x, x).sum()))(a)
  assert np.isfinite(np.asarray(grad)).all()


# --- matching ----------------------------------------------------------------


def _match_case(seed):
  """Anchors with duplicates (ties), gt near some anchors, far gt, padding."""
  rng = np.random.default_rng(seed)
  anchors = random_boxes(rng, 120, hi=200.0, min_size=10.0, max_size=60.0)
  anchors[60:70] = anchors[50:60]  # exact duplicates tie for every gt.
  near = anchors[rng.choice(120, 4, replace=False)]
  jitter = rng.uniform(-6, 6, size=near.shape).astype(np.float32)
  gt = np.concatenate([
      near + jitter,
      random_boxes(rng, 2, hi=200.0, min_size=5.0, max_size=15.0),  # small.
      [[1000, 1000, 1010, 1010]],  # overlaps nothing.
      np.zeros((3, 4)),  # padding.
  ]).astype(np.float32)
  valid = np.array([True] * 7 + [False] * 3)
  return anchors, gt, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("low_quality", [True, False])
def test_match_agrees_with_a_numpy_loop(seed, low_quality):
  anchors, gt, valid = _match_case(seed)
  fn = jax.jit(functools.partial(boxes.match, fg_iou=0.5, bg_iou=0.4,
                                 low_quality=low_quality))
  matched, label = (np.asarray(x) for x in fn(anchors, gt, valid))
  ref_matched, ref_label = np_match(anchors, gt, valid, 0.5, 0.4, low_quality)
  assert matched.dtype == np.int32 and label.dtype == np.int32
  np.testing.assert_array_equal(label, ref_label)
  fg = label == 1
  np.testing.assert_array_equal(matched[fg], ref_matched[fg])
  assert fg.any() and (label == 0).any()
  assert valid[matched[fg]].all()  # padding never matches.


def test_match_low_quality_rule_promotes_every_tied_best_anchor():
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [30, 0, 40, 10],
                      [0, 0, 40, 40]], np.float32)
  gt = np.array([[0, 0, 4, 10], [100, 100, 110, 110]], np.float32)
  valid = np.array([True, True])
  # gt 0's best IoU (0.4 with the two identical anchors) is below fg_iou;
  # gt 1 overlaps no anchor, so it promotes none.
  lq, plain = (jax.jit(functools.partial(
      boxes.match, fg_iou=0.5, bg_iou=0.3, low_quality=low_quality))(
          anchors, gt, valid) for low_quality in (True, False))
  np.testing.assert_array_equal(np.asarray(plain[1]), [-1, -1, 0, 0])
  np.testing.assert_array_equal(np.asarray(lq[1]), [1, 1, 0, 0])
  np.testing.assert_array_equal(np.asarray(lq[0])[:2], [0, 0])


def test_match_thresholds_are_inclusive_for_fg_and_bg_boundaries():
  gt = np.array([[0, 0, 10, 10]], np.float32)
  anchors = np.array([[0, 0, 10, 20],   # IoU 0.5 exactly: fg (>= fg_iou).
                      [0, 0, 10, 25],   # IoU 0.4 exactly: ignored (not < 0.4).
                      [0, 0, 10, 26]],  # IoU 0.385: bg.
                     np.float32)
  fn = jax.jit(functools.partial(boxes.match, low_quality=False))
  _, label = fn(anchors, gt, np.array([True]))
  np.testing.assert_array_equal(np.asarray(label), [1, -1, 0])


def test_match_without_valid_gt_is_all_background():
  rng = np.random.default_rng(3)
  anchors = random_boxes(rng, 30)
  gt = anchors[:4].copy()  # would match perfectly if it were valid.
  _, label = jax.jit(boxes.match)(anchors, gt, np.zeros(4, bool))
  np.testing.assert_array_equal(np.asarray(label), np.zeros(30))


# --- box transform -----------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0),
                                     (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_numpy_and_round_trip(weights):
  rng = np.random.default_rng(4)
  anchors, targets = random_boxes(rng, 50), random_boxes(rng, 50)
  enc = jax.jit(functools.partial(boxes.encode, weights=weights))
  dec = jax.jit(functools.partial(boxes.decode, weights=weights))
  deltas = np.asarray(enc(anchors, targets))
  ref = np.array([np_encode(a, t, weights) for a, t in zip(anchors, targets)])
  np.testing.assert_allclose(deltas, ref, rtol=1e-5, atol=1e-5)
  raw = rng.normal(size=(50, 4)).astype(np.float32)
  ref_boxes = np.array([np_decode(a, d, weights) for a, d in zip(anchors, raw)])
  np.testing.assert_allclose(np.asarray(dec(anchors, raw)), ref_boxes,
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dec(anchors, deltas)), targets,
                             rtol=1e-5, atol=1e-4)


def test_decode_clamps_the_size_deltas():
  anchor = np.array([[0, 0, 16, 16]], np.float32)
  out = np.asarray(jax.jit(boxes.decode)(anchor, np.array([[0, 0, 50, 50.]])))
  # exp(clamp) * 16 = 1000 pixels, centred on the anchor's centre (8, 8).
  np.testing.assert_allclose(out[0], [8 - 500, 8 - 500, 8 + 500, 8 + 500],
                             rtol=1e-5)


# --- losses ------------------------------------------------------------------


def test_sigmoid_focal_loss_matches_numpy_and_is_stable():
  rng = np.random.default_rng(5)
  x = np.concatenate([rng.normal(0, 3, 200), [-1000, -100, -30, 30, 100, 1000]])
  x = x.astype(np.float32)
  t = np.concatenate([rng.integers(0, 2, 200), [1, 1, 0, 1, 0, 1]])
  t = t.astype(np.float32)
  fn = jax.jit(losses.sigmoid_focal_loss)
  got = np.asarray(fn(x, t))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, np_focal(x, t), rtol=1e-5, atol=1e-7)
  # The saturated ends: confidently wrong costs alpha_t * |x|, right ~0.
  np.testing.assert_allclose(got[-6:], [250.0, 25.0, 0, 0, 75.0, 0],
                             rtol=1e-5, atol=1e-6)
  for gamma, alpha in [(0.0, 0.25), (1.5, -1.0)]:
    got = np.asarray(jax.jit(functools.partial(
        losses.sigmoid_focal_loss, alpha=alpha, gamma=gamma))(x, t))
    ref = np_focal(x, t, gamma=gamma, alpha=0.5) * 2 if alpha < 0 else (
        np_focal(x, t, alpha=alpha, gamma=gamma))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  grad = jax.jit(jax.grad(lambda v: losses.sigmoid_focal_loss(v, t).sum()))(x)
  assert np.isfinite(np.asarray(grad)).all()


# Image 0: one gt (class 1) and a padding row; image 1: padding only.
LOSS_ANCHORS = np.array([
    [0, 0, 10, 10],   # IoU 1: fg
    [5, 0, 15, 10],   # IoU 1/3: bg
    [0, 0, 10, 18],   # IoU 0.556: fg
    [2, 0, 12, 10],   # IoU 0.667: fg
    [0, 0, 10, 22],   # IoU 0.455: ignored
    [50, 50, 60, 60],  # IoU 0: bg
], np.float32)
LOSS_GT = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]],
                    [[0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
LOSS_LABELS = np.array([[1, 0], [0, 0]], np.int32)
LOSS_VALID = np.array([[True, False], [False, False]])


def np_retinanet_loss(logits, deltas, box_loss, beta=0.0):
  """The hand-built case by its definition: labels fg / bg / ignored."""
  state = [["fg", "bg", "fg", "fg", "ignore", "bg"], ["bg"] * 6]
  gt = LOSS_GT[0, 0]
  cls = box = 0.0
  for b in range(2):
    for a, s in enumerate(state[b]):
      if s == "ignore":
        continue
      target = np.eye(3)[1] if s == "fg" else np.zeros(3)
      cls += np_focal(logits[b, a], target).sum()
      if s != "fg":
        continue
      if box_loss == "giou":
        box += 1 - np_giou(np_decode(LOSS_ANCHORS[a], deltas[b, a]), gt)
        continue
      d = np.abs(deltas[b, a] - np_encode(LOSS_ANCHORS[a], gt))
      if box_loss == "smooth_l1":
        d = np.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
      box += d.sum()
  return cls / 3, box / 3


@pytest.mark.parametrize("box_loss,beta", [("l1", 0.0), ("smooth_l1", 0.1),
                                           ("giou", 0.0)])
def test_retinanet_loss_on_a_hand_built_case(box_loss, beta):
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 2, size=(2, 6, 3)).astype(np.float32)
  deltas = rng.normal(0, 0.2, size=(2, 6, 4)).astype(np.float32)
  fn = jax.jit(functools.partial(
      losses.retinanet_loss, alpha=0.25, gamma=2.0, fg_iou=0.5, bg_iou=0.4,
      box_loss=box_loss, smooth_l1_beta=beta))
  total, metrics = fn(logits, deltas, LOSS_ANCHORS, LOSS_GT, LOSS_LABELS,
                      LOSS_VALID)
  ref_cls, ref_box = np_retinanet_loss(logits, deltas, box_loss, beta)
  np.testing.assert_allclose(float(metrics["cls_loss"]), ref_cls, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["box_loss"]), ref_box, rtol=1e-5)
  np.testing.assert_allclose(float(total), ref_cls + ref_box, rtol=1e-5)
  assert float(metrics["loss"]) == float(total)
  assert float(metrics["num_fg"]) == 1.5  # 3 fg anchors over 2 images.
  # Padding gt boxes (all zeros) must not leak a NaN into the gradient.
  grads = jax.jit(jax.grad(lambda l, d: fn(l, d, LOSS_ANCHORS, LOSS_GT,
                                           LOSS_LABELS, LOSS_VALID)[0],
                           argnums=(0, 1)))(logits, deltas)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert np.asarray(grads[1])[1].sum() == 0  # image 1 has no fg anchors.


def test_retinanet_loss_without_foreground_divides_by_one():
  logits = np.zeros((1, 6, 3), np.float32)
  total, metrics = jax.jit(losses.retinanet_loss)(
      logits, np.zeros((1, 6, 4), np.float32), LOSS_ANCHORS, LOSS_GT[1:],
      LOSS_LABELS[1:], LOSS_VALID[1:])
  np.testing.assert_allclose(float(total), np_focal(logits, 0.0).sum(),
                             rtol=1e-5)
  assert float(metrics["box_loss"]) == 0 and float(metrics["num_fg"]) == 0


# --- NMS ---------------------------------------------------------------------


def _nms_case(seed, n=300, num_padding=20):
  """Crowded random boxes (many overlaps), distinct scores, some padding."""
  rng = np.random.default_rng(seed)
  bxs = random_boxes(rng, n, hi=120.0, min_size=5.0, max_size=50.0)
  scores = rng.permutation(n).astype(np.float32) / n  # no ties.
  scores[rng.choice(n, num_padding, replace=False)] = -np.inf
  classes = rng.integers(0, 4, n).astype(np.int32)
  return bxs, scores, classes


def _check_nms(idx, valid, ref, max_output):
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == valid.shape == (max_output,) and idx.dtype == np.int32
  k = min(len(ref), max_output)
  np.testing.assert_array_equal(valid, np.arange(max_output) < k)
  np.testing.assert_array_equal(idx[:k], ref[:k])
  assert (idx[k:] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_agrees_with_numpy_greedy_nms(seed, thr):
  bxs, scores, _ = _nms_case(seed)
  ref = np_greedy_nms(bxs, scores, thr)
  for max_output in (10, 400):  # cut short, and more slots than kept.
    fn = jax.jit(functools.partial(nms.nms, iou_threshold=thr,
                                   max_output=max_output))
    _check_nms(*fn(bxs, scores), ref, max_output)


@pytest.mark.parametrize("seed", [3, 4])
def test_nms_valid_mask_equals_minus_inf_scores(seed):
  bxs, scores, _ = _nms_case(seed, num_padding=0)
  mask = np.random.default_rng(seed).random(len(scores)) < 0.8
  ref = np_greedy_nms(bxs, np.where(mask, scores, -np.inf), 0.5)
  fn = jax.jit(functools.partial(nms.nms, iou_threshold=0.5, max_output=64))
  _check_nms(*fn(bxs, scores, valid=mask), ref, 64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_agrees_with_numpy_per_class_nms(seed):
  bxs, scores, classes = _nms_case(seed)
  ref = np_greedy_nms(bxs, scores, 0.5, classes)
  assert len(ref) > len(np_greedy_nms(bxs, scores, 0.5))  # classes matter.
  fn = jax.jit(functools.partial(nms.batched_nms, iou_threshold=0.5,
                                 max_output=300))
  _check_nms(*fn(bxs, scores, classes), ref, 300)


def test_nms_keeps_a_box_whose_iou_equals_the_threshold():
  bxs = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 11]], np.float32)
  scores = np.array([3.0, 2.0, 1.0], np.float32)
  # IoU 0.5 exactly with box 0 is kept (suppression needs IoU > thr).
  idx, valid = jax.jit(functools.partial(nms.nms, iou_threshold=0.5,
                                         max_output=3))(bxs, scores)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], [0, 1])


def test_nms_of_all_padding_keeps_nothing():
  bxs = random_boxes(np.random.default_rng(7), 16)
  scores = np.full(16, -np.inf, np.float32)
  for fn in (functools.partial(nms.nms, iou_threshold=0.5, max_output=8),
             functools.partial(nms.batched_nms, classes=np.zeros(16, np.int32),
                               iou_threshold=0.5, max_output=8)):
    idx, valid = jax.jit(fn)(bxs, scores)
    assert not np.asarray(valid).any() and (np.asarray(idx) == 0).all()
  _, valid = jax.jit(functools.partial(nms.nms, iou_threshold=0.5,
                                       max_output=8))(
                                           bxs, np.full(16, np.inf, np.float32),
                                           valid=np.zeros(16, bool))
  assert not np.asarray(valid).any()


def test_nms_of_thousands_of_candidates_agrees_with_numpy():
  rng = np.random.default_rng(8)
  bxs = random_boxes(rng, 3000, hi=800.0, min_size=10.0, max_size=120.0)
  scores = rng.permutation(3000).astype(np.float32)
  classes = rng.integers(0, 80, 3000).astype(np.int32)
  fn = jax.jit(functools.partial(nms.batched_nms, iou_threshold=0.5,
                                 max_output=100))
  idx, valid = fn(bxs, scores, classes)
  # The reference only needs the first 100 kept: the top 400 scores hold them.
  top = np.argsort(-scores)[:400]
  ref = [top[i] for i in np_greedy_nms(bxs[top], scores[top], 0.5,
                                       classes[top])]
  _check_nms(idx, valid, np.array(ref), 100)


# --- postprocess -------------------------------------------------------------

# Two levels of one 16 / 32 px square anchor per location on a 64 x 64 image.
PP_LEVELS, PP_SIZES, PP_IMAGE = (3, 4), (16.0, 32.0), (64, 64)


def _pp_anchors():
  a = boxes.anchors(PP_IMAGE, PP_LEVELS, PP_SIZES, 1, (1.0,))
  return a, boxes.anchors_per_level(PP_IMAGE, PP_LEVELS, 1, (1.0,))


def test_postprocess_decodes_planted_detections_and_suppresses_duplicates():
  anchors, sizes = _pp_anchors()
  assert sizes == [64, 16]
  logits = np.full((2, 80, 3), -10.0, np.float32)  # sigmoid < 0.05
  deltas = np.zeros((2, 80, 4), np.float32)
  target = np.array([10, 12, 30, 28.0])
  # Anchor 18 (level 3, y 2, x 2) finds the target as class 2; its
  # neighbour 19 a near copy of it (a duplicate), and level-4 anchor 64 + 5
  # the same box as class 0 (another class: kept).
  plants = [(18, 2, 4.0, target), (19, 2, 3.0, target + [1, 0, 1, 0]),
            (69, 0, 2.0, target)]
  for a, c, logit, box in plants:
    logits[0, a, c] = logit
    deltas[0, a] = np_encode(anchors[a], box)
  # An image-1 detection hanging over the border of its 40 x 50 image.
  # And one entirely right of it: clipped to an empty box, dropped.
  logits[1, 40, 1], logits[1, 47, 0] = 5.0, 6.0
  deltas[1, 40] = np_encode(anchors[40], np.array([35, 30, 60, 45.0]))
  deltas[1, 47] = np_encode(anchors[47], np.array([55, 30, 70, 45.0]))
  fn = jax.jit(functools.partial(nms.postprocess, level_sizes=sizes,
                                 image_size=np.array([[64, 64], [40, 50]]),
                                 max_detections=5))
  out = {k: np.asarray(v) for k, v in fn(logits, deltas, anchors).items()}
  assert out["boxes"].shape == (2, 5, 4) and out["classes"].dtype == np.int32
  np.testing.assert_array_equal(out["valid"], [[1, 1, 0, 0, 0],
                                               [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out["classes"][0, :2], [2, 0])
  sig = lambda v: 1 / (1 + math.exp(-v))
  np.testing.assert_allclose(out["scores"][0, :2], [sig(4.0), sig(2.0)],
                             rtol=1e-6)
  np.testing.assert_allclose(out["boxes"][0, :2], [target, target], atol=1e-3)
  np.testing.assert_allclose(out["boxes"][1, 0], [35, 30, 50, 40], atol=1e-3)
  assert (out["scores"][~out["valid"]] == 0).all()


def test_postprocess_caps_detections_and_candidates_per_level():
  anchors, sizes = _pp_anchors()
  # Every anchor confident in class 1 at its own box: neighbours overlap
  # by IoU 1/3 (< 0.5), so nothing is suppressed and the cap binds.
  logits = np.full((1, 80, 2), -10.0, np.float32)
  logits[0, :, 1] = np.linspace(1, 3, 80)
  deltas = np.zeros((1, 80, 4), np.float32)
  common = dict(level_sizes=sizes, image_size=PP_IMAGE)
  out = jax.jit(functools.partial(nms.postprocess, max_detections=20,
                                  **common))(logits, deltas, anchors)
  valid = np.asarray(out["valid"])
  assert valid.sum() == 20
  scores = np.asarray(out["scores"])[0]
  assert (np.diff(scores) <= 0).all()  # descending.
  # Three candidates per level, then NMS: the level-4 anchors are the
  # best, and level 3's best three (59..63 overlap only each other weakly).
  out = jax.jit(functools.partial(nms.postprocess, max_detections=20,
                                  topk_per_level=3, **common))(
                                      logits, deltas, anchors)
  assert np.asarray(out["valid"]).sum() == 6
  got = sorted(np.asarray(out["scores"])[0, :6].tolist())
  ref = sorted(1 / (1 + np.exp(-logits[0, [61, 62, 63, 77, 78, 79], 1])))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
