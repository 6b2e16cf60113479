"""The detection transfer's numerics against detectron2's definitions.

Each `d2_*` function re-states, in NumPy, one function of detectron2
(facebookresearch/detectron2), read at release v0.3 (2020-11-05, commit
4841e70) and on its main branch of 2026-06-06 (commit 02b5c4e): the two
agree on everything re-stated here. The RetinaNet settings are those of
DetCo's benchmarks/detection/configs/Base-RetinaNet.yaml on detectron2's
defaults: P3..P7, sizes [x, x 2^(1/3), x 2^(2/3)] for x in 32..512, aspect
ratios 0.5, 1, 2, ANCHOR_GENERATOR.OFFSET 0.0, IOU_THRESHOLDS [0.4, 0.5]
with IOU_LABELS [0, -1, 1] and low-quality matches, BBOX_REG_WEIGHTS
(1, 1, 1, 1), SMOOTH_L1_LOSS_BETA 0.0, SCORE_THRESH_TEST 0.05,
TOPK_CANDIDATES_TEST 1000, NMS_THRESH_TEST 0.5, 100 detections per image.

Where the project departs from detectron2 on purpose, a test pins the
difference and the config value that removes it (docs/evaluation.md lists
them).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import detco as detco_config
from configs import detection as detection_config
from detco_jax import checkpoint as checkpoint_lib
from detco_jax import loop
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.benchmark import detection_step
from detco_jax.detection import boxes
from detco_jax.detection import losses
from detco_jax.detection import nms
from detco_jax.eval import detection
from detco_jax.models import retinanet
from tests import jobcheck

# Base-RetinaNet.yaml's ANCHOR_GENERATOR.SIZES and detectron2's defaults.
D2_LEVELS = (3, 4, 5, 6, 7)
D2_BASE_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
D2_SIZES = [[x, x * 2**(1.0 / 3), x * 2**(2.0 / 3)] for x in D2_BASE_SIZES]
D2_RATIOS = (0.5, 1.0, 2.0)
D2_SCALE_CLAMP = math.log(1000.0 / 16)


# --- detectron2, re-stated ---------------------------------------------------


def d2_cell_anchors(sizes, aspect_ratios):
  """anchor_generator.py, DefaultAnchorGenerator.generate_cell_anchors.

  Size-major, then aspect ratio (h / w); (x0, y0, x1, y1) centred at 0;
  torch.tensor makes them float32.
  """
  out = []
  for size in sizes:
    area = size**2.0
    for aspect_ratio in aspect_ratios:
      w = math.sqrt(area / aspect_ratio)
      h = aspect_ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, np.float32)


def d2_grid_offsets(size, stride, offset):
  """anchor_generator.py, _create_grid_offsets: y-major, float32."""
  grid_height, grid_width = size
  shifts_x = np.arange(offset * stride, grid_width * stride, stride,
                       dtype=np.float32)
  shifts_y = np.arange(offset * stride, grid_height * stride, stride,
                       dtype=np.float32)
  shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
  return shift_x.reshape(-1), shift_y.reshape(-1)


def d2_anchors(grid_sizes, strides, sizes, aspect_ratios, offset):
  """DefaultAnchorGenerator._grid_anchors, levels concatenated.

  RetinaNet concatenates the levels (`Boxes.cat(anchors)` in
  `label_anchors`); each level is (location, cell anchor) in that order.
  """
  out = []
  for size, stride, level_sizes in zip(grid_sizes, strides, sizes):
    base = d2_cell_anchors(level_sizes, aspect_ratios)
    shift_x, shift_y = d2_grid_offsets(size, stride, offset)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    out.append((shifts.reshape(-1, 1, 4) + base.reshape(1, -1, 4))
               .reshape(-1, 4))
  return np.concatenate(out)


def d2_permute_to_n_hwa_k(tensor, k):
  """meta_arch/dense_detector.py (retinanet.py in v0.3), permute_to_N_HWA_K.

  (N, A * K, H, W) -> (N, H * W * A, K).
  """
  n, _, h, w = tensor.shape
  tensor = tensor.reshape(n, -1, k, h, w).transpose(0, 3, 4, 1, 2)
  return tensor.reshape(n, -1, k)


def d2_get_deltas(src, target, weights):
  """box_regression.py, Box2BoxTransform.get_deltas (no +1 in the sizes)."""
  src, target = src.astype(np.float64), target.astype(np.float64)
  src_w, src_h = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  src_x, src_y = src[:, 0] + 0.5 * src_w, src[:, 1] + 0.5 * src_h
  tgt_w, tgt_h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
  tgt_x, tgt_y = target[:, 0] + 0.5 * tgt_w, target[:, 1] + 0.5 * tgt_h
  wx, wy, ww, wh = weights
  return np.stack([wx * (tgt_x - src_x) / src_w, wy * (tgt_y - src_y) / src_h,
                   ww * np.log(tgt_w / src_w), wh * np.log(tgt_h / src_h)], 1)


def d2_apply_deltas(deltas, src, weights, scale_clamp=D2_SCALE_CLAMP):
  """box_regression.py, Box2BoxTransform.apply_deltas (one box per row)."""
  deltas, src = deltas.astype(np.float64), src.astype(np.float64)
  widths, heights = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  ctr_x, ctr_y = src[:, 0] + 0.5 * widths, src[:, 1] + 0.5 * heights
  wx, wy, ww, wh = weights
  dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
  dw = np.minimum(deltas[:, 2] / ww, scale_clamp)
  dh = np.minimum(deltas[:, 3] / wh, scale_clamp)
  x, y = dx * widths + ctr_x, dy * heights + ctr_y
  w, h = np.exp(dw) * widths, np.exp(dh) * heights
  return np.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], 1)


def d2_pairwise_iou(boxes1, boxes2):
  """structures/boxes.py, pairwise_iou (0 where boxes do not intersect).

  In float32, as detectron2's Boxes hold them: the ties of real arithmetic
  (a gt inside anchors of equal area) stay ties, which the low-quality rule
  depends on; float64 would break them by rounding.
  """
  b1, b2 = boxes1.astype(np.float32), boxes2.astype(np.float32)
  area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
  area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
  wh = np.minimum(b1[:, None, 2:], b2[:, 2:]) - np.maximum(b1[:, None, :2],
                                                           b2[:, :2])
  inter = np.clip(wh, 0, None).prod(axis=2)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = inter / (area1[:, None] + area2 - inter)
  return np.where(inter > 0, iou, np.float32(0))


def d2_matcher(quality, thresholds=(0.4, 0.5), labels=(0, -1, 1),
               allow_low_quality_matches=True):
  """matcher.py, Matcher.__call__ with set_low_quality_matches_.

  quality is [M gt, N predictions]. torch's max(dim=0) returns the first
  maximal index, as np.argmax does.
  """
  num_gt, n = quality.shape
  if num_gt == 0:
    return np.zeros(n, int), np.full(n, labels[0])
  matched_vals, matches = quality.max(axis=0), quality.argmax(axis=0)
  match_labels = np.ones(n, int)
  bounds = [-math.inf, *thresholds, math.inf]
  for label, low, high in zip(labels, bounds[:-1], bounds[1:]):
    match_labels[(matched_vals >= low) & (matched_vals < high)] = label
  if allow_low_quality_matches:
    highest = quality.max(axis=1)
    # Every prediction attaining a gt's highest quality, ties included;
    # its match stays its own argmax.
    _, preds = np.nonzero(quality == highest[:, None])
    match_labels[preds] = 1
  return matches, match_labels


def d2_nms(bxs, scores, iou_threshold):
  """torchvision.ops.nms, as detectron2 calls it: IoU > threshold drops."""
  order = np.argsort(-scores, kind="stable")
  iou = d2_pairwise_iou(bxs, bxs)
  keep, dead = [], np.zeros(len(bxs), bool)
  for i in order:
    if dead[i]:
      continue
    keep.append(i)
    dead |= iou[i] > iou_threshold
  return np.asarray(keep, int)


def d2_batched_nms(bxs, scores, classes, iou_threshold):
  """layers/nms.py, batched_nms: NMS per class, kept ones by score."""
  keep = []
  for c in np.unique(classes):
    idx = np.nonzero(classes == c)[0]
    keep.extend(idx[d2_nms(bxs[idx], scores[idx], iou_threshold)])
  keep = np.asarray(keep, int)
  return keep[np.argsort(-scores[keep], kind="stable")]


def d2_inference_single_image(scores, deltas, anchors, score_thresh=0.05,
                              topk_candidates=1000, nms_thresh=0.5,
                              max_detections=100):
  """retinanet.py, RetinaNet.inference_single_image.

  Per level (dense_detector.py `_decode_per_level_predictions`; inline in
  v0.3): keep the scores [HWA, K] > score_thresh, the top
  min(topk_candidates, number kept) of them, decode their anchors' boxes;
  then batched NMS over all levels, the first max_detections.
  """
  all_boxes, all_scores, all_classes = [], [], []
  for scores_i, deltas_i, anchors_i in zip(scores, deltas, anchors):
    keep = scores_i > score_thresh
    kept_scores = scores_i[keep]
    topk_idxs = np.argwhere(keep)  # (anchor, class) rows.
    num_topk = min(len(topk_idxs), topk_candidates)
    order = np.argsort(-kept_scores, kind="stable")[:num_topk]
    anchor_idxs, class_idxs = topk_idxs[order].T
    all_boxes.append(d2_apply_deltas(deltas_i[anchor_idxs],
                                     anchors_i[anchor_idxs], (1, 1, 1, 1)))
    all_scores.append(kept_scores[order])
    all_classes.append(class_idxs)
  bxs, scr, cls = (np.concatenate(x) for x in (all_boxes, all_scores,
                                               all_classes))
  keep = d2_batched_nms(bxs, scr, cls, nms_thresh)[:max_detections]
  return bxs[keep], scr[keep], cls[keep]


def d2_detector_postprocess(bxs, scr, cls, image_size):
  """postprocessing.py, detector_postprocess at the input's own size.

  Boxes.clip to [0, W] x [0, H], then only Boxes.nonempty ones.
  """
  h, w = image_size
  bxs = np.clip(bxs, 0, [w, h, w, h])
  keep = (bxs[:, 2] > bxs[:, 0]) & (bxs[:, 3] > bxs[:, 1])
  return bxs[keep], scr[keep], cls[keep]


def d2_ema_normalizers(num_pos_anchors, momentum=0.9, initial=100.0):
  """retinanet.py, RetinaNet.losses (`_ema_update` on main): one per step."""
  normalizer, out = initial, []
  for n in num_pos_anchors:
    normalizer = momentum * normalizer + (1 - momentum) * max(n, 1)
    out.append(normalizer)
  return out


def random_boxes(rng, n, hi=100.0, min_size=2.0, max_size=40.0):
  xy = rng.uniform(0, hi, size=(n, 2))
  wh = rng.uniform(min_size, max_size, size=(n, 2))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# --- anchors -----------------------------------------------------------------


@pytest.mark.parametrize("image", [(1024, 1024), (800, 1344), (96, 160)])
@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_anchors_are_detectron2s_in_the_same_order(image, offset):
  got = boxes.anchors(image, D2_LEVELS, D2_BASE_SIZES, 3, D2_RATIOS,
                      offset=offset)
  # The feature maps' sizes, as the project's RetinaNet makes them
  # (tests/test_retinanet.py checks the head's output against these).
  grids = boxes.level_shapes(image, D2_LEVELS)
  ref = d2_anchors(grids, [2**l for l in D2_LEVELS], D2_SIZES, D2_RATIOS,
                   offset)
  assert got.shape == ref.shape
  # Element by element, so the order is detectron2's too. detectron2 rounds
  # the cell anchors to float32 before adding the shifts, the project after:
  # at most an ulp (1.2e-4) of a coordinate below 2,048 px apart.
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)


def test_the_jobs_anchors_are_detectron2s_on_both_padded_shapes():
  config = detection_config.get_config()
  assert config.model.anchor_offset == 0.0
  by_shape = detection.anchors_by_shape(config, "imagenet")
  assert sorted(by_shape) == [(800, 1344), (1344, 800)]
  for shape, (got, per_level) in by_shape.items():
    grids = boxes.level_shapes(shape, D2_LEVELS)
    ref = d2_anchors(grids, [2**l for l in D2_LEVELS], D2_SIZES, D2_RATIOS,
                     0.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
    assert per_level == [h * w * 9 for h, w in grids]
  # The square recipe centres them in their cells, on its one shape.
  square = detection_config.get_config("square")
  ((shape, (got, _)),) = detection.anchors_by_shape(square, "imagenet").items()
  assert shape == (1024, 1024)
  grids = boxes.level_shapes(shape, D2_LEVELS)
  ref = d2_anchors(grids, [2**l for l in D2_LEVELS], D2_SIZES, D2_RATIOS, 0.5)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)


def test_head_outputs_are_laid_out_as_detectron2s():
  """The head's flattening is permute_to_N_HWA_K of the same conv output."""
  a, k = 3, 4
  head = retinanet.RetinaNetHead(num_classes=k, num_anchors=a, channels=8,
                                 num_convs=1, norm="none")
  maps = [jnp.ones((1, 4, 6, 8)), jnp.ones((1, 2, 3, 8))]
  params = head.init(jax.random.key(0), maps)["params"]
  # Output convs that write their channel index c everywhere: the value of
  # a flattened output names the channel it came from.
  for name, width in (("cls_score", a * k), ("bbox_pred", a * 4)):
    params[name] = {"kernel": jnp.zeros_like(params[name]["kernel"]),
                    "bias": jnp.arange(width, dtype=jnp.float32)}
  cls, box = head.apply({"params": params}, maps)
  for got, per_anchor in ((cls, k), (box, 4)):
    ref = np.concatenate([
        d2_permute_to_n_hwa_k(np.broadcast_to(
            np.arange(a * per_anchor, dtype=np.float32)[None, :, None, None],
            (1, a * per_anchor, h, w)), per_anchor)
        for h, w in ((4, 6), (2, 3))], axis=1)
    np.testing.assert_array_equal(np.asarray(got), ref)


# --- Box2BoxTransform --------------------------------------------------------


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0),
                                     (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_are_get_deltas_and_apply_deltas(weights):
  rng = np.random.default_rng(0)
  src = random_boxes(rng, 200, hi=1000.0, min_size=4.0, max_size=500.0)
  target = random_boxes(rng, 200, hi=1000.0, min_size=1.0, max_size=700.0)
  got = np.asarray(jax.jit(functools.partial(boxes.encode, weights=weights))(
      src, target))
  np.testing.assert_allclose(got, d2_get_deltas(src, target, weights),
                             rtol=1e-5, atol=1e-5)
  # dw / ww and dh / wh of sd 4: some past the clamp log(62.5) = 4.14.
  deltas = (rng.normal(0, 1, (200, 4)) * [1, 1, 4, 4]
            * np.asarray(weights)).astype(np.float32)
  assert (deltas[:, 2:] / np.asarray(weights[2:]) > D2_SCALE_CLAMP).any()
  got = np.asarray(jax.jit(functools.partial(boxes.decode, weights=weights))(
      src, deltas))
  ref = d2_apply_deltas(deltas, src, weights)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
  assert boxes.DEFAULT_SCALE_CLAMP == D2_SCALE_CLAMP


# --- Matcher -----------------------------------------------------------------


def check_match(anchors, gt, num_padding=0):
  """The project's `match` of gt (+ padding rows) against d2_matcher."""
  padded = np.concatenate([gt, np.zeros((num_padding, 4), np.float32)])
  valid = np.arange(len(padded)) < len(gt)
  matched, label = (np.asarray(x) for x in jax.jit(boxes.match)(
      anchors, padded, valid))
  ref_matched, ref_label = d2_matcher(d2_pairwise_iou(gt, anchors))
  np.testing.assert_array_equal(label, ref_label)
  if len(gt):
    np.testing.assert_array_equal(matched, ref_matched)
  return label


def test_match_ties_and_a_low_quality_match_kept_on_its_argmax_gt():
  anchors = np.array([
      [0, 0, 10, 10], [0, 0, 10, 10],  # Tie for gt 0's best IoU, 1/3.
      [5, 0, 25, 10],                   # gt 1's best (0.2); 0.37 with gt 2.
      [12, 0, 40, 10],                  # gt 2 itself.
      [60, 60, 70, 70],                 # Overlaps nothing.
  ], np.float32)
  gt = np.array([[0, 0, 10, 30], [5, 5, 25, 25], [12, 0, 40, 10]], np.float32)
  iou = d2_pairwise_iou(gt, anchors)
  assert iou[0, 0] == iou[0, 1] == iou[0].max() < 0.4
  assert iou[1].argmax() == 2 and iou[1].max() < iou[2, 2] < 0.4
  label = check_match(anchors, gt, num_padding=2)
  np.testing.assert_array_equal(label, [1, 1, 1, 1, 0])
  # Anchor 2 is foreground for gt 1 but regresses to gt 2, its argmax.
  matched, _ = jax.jit(boxes.match)(anchors, gt, np.ones(3, bool))
  assert int(matched[2]) == 2


def test_match_random_gt_against_a_real_anchor_grid():
  rng = np.random.default_rng(1)
  image = (128, 160)
  anchors = boxes.anchors(image, (3, 4, 5), (32.0, 64.0, 128.0), 3, D2_RATIOS,
                          offset=0.0)
  for n in (1, 7, 20):
    gt = random_boxes(rng, n, hi=120.0, min_size=3.0, max_size=100.0)
    gt = np.concatenate([gt, gt[:1]])  # A duplicate gt: ties across gts.
    label = check_match(anchors, gt, num_padding=3)
    assert (label == 1).any()


def test_match_without_gt_is_all_background():
  anchors = random_boxes(np.random.default_rng(2), 50)
  label = check_match(anchors, np.zeros((0, 4), np.float32), num_padding=4)
  assert (label == 0).all()


def test_a_gt_that_overlaps_no_anchor_is_the_one_departure():
  """detectron2 promotes every anchor at a gt's highest IoU, even at 0.

  A gt that overlaps no anchor would make every anchor foreground there
  (its match its own argmax gt); the project promotes none. Such a gt
  cannot occur: detectron2's DatasetMapper drops empty boxes
  (filter_empty_instances), the project's views those under
  `views.min_box_size`, and a non-empty box inside the image overlaps the
  anchors that tile it.
  """
  anchors = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
  gt = np.array([[100, 100, 110, 110]], np.float32)
  _, ref_label = d2_matcher(d2_pairwise_iou(gt, anchors))
  _, label = jax.jit(boxes.match)(anchors, gt, np.array([True]))
  np.testing.assert_array_equal(ref_label, [1, 1])
  np.testing.assert_array_equal(np.asarray(label), [0, 0])
  # Tiny boxes anywhere in the image overlap the grid (offset 0 or 0.5).
  rng = np.random.default_rng(3)
  for offset in (0.0, 0.5):
    grid = boxes.anchors((64, 64), (3,), (32.0,), 1, (1.0,), offset=offset)
    tiny = random_boxes(rng, 200, hi=63.0, min_size=0.1, max_size=1.0)
    assert (d2_pairwise_iou(tiny, grid).max(axis=1) > 0).all()


# --- losses: L1 and the moving normaliser ------------------------------------


def loss_case(rng, num_gt):
  """Logits, deltas, anchors and one image's padded gt (num_gt real)."""
  anchors = boxes.anchors((64, 64), (3, 4), (16.0, 32.0), 1, (1.0,))
  gt = np.zeros((1, 4, 4), np.float32)
  gt[0, :num_gt] = random_boxes(rng, num_gt, hi=40.0, min_size=8.0,
                                max_size=24.0)
  labels = rng.integers(0, 3, (1, 4)).astype(np.int32)
  valid = (np.arange(4) < num_gt)[None]
  logits = rng.normal(0, 2, (1, len(anchors), 3)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (1, len(anchors), 4)).astype(np.float32)
  return logits, deltas, anchors, gt, labels, valid


def test_smooth_l1_with_beta_0_is_l1():
  """Base-RetinaNet.yaml's SMOOTH_L1_LOSS_BETA 0.0: fvcore's smooth_l1_loss
  is then L1, the project's default box loss."""
  case = loss_case(np.random.default_rng(4), 3)
  l1 = jax.jit(functools.partial(losses.retinanet_loss, box_loss="l1"))(*case)
  sl1 = jax.jit(functools.partial(losses.retinanet_loss, box_loss="smooth_l1",
                                  smooth_l1_beta=0.0))(*case)
  assert float(l1[1]["box_loss"]) > 0
  assert float(l1[1]["box_loss"]) == float(sl1[1]["box_loss"])


def test_moving_normalizer_over_steps_is_detectron2s():
  rng = np.random.default_rng(5)
  loss = jax.jit(losses.retinanet_loss)
  ema_loss = jax.jit(functools.partial(losses.retinanet_loss,
                                       normalizer_momentum=0.9))
  normalizer = jnp.float32(losses.NORMALIZER_INIT)
  counts, got = [], []
  for num_gt in (3, 0, 1, 4, 2):  # Step 2 has no foreground: max(0, 1).
    case = loss_case(rng, num_gt)
    _, plain = loss(*case)
    _, ema = ema_loss(*case, normalizer=normalizer)
    normalizer = ema["loss_normalizer"]
    count = int(round(float(plain["num_fg"])))
    counts.append(count)
    got.append(float(normalizer))
    # Both losses are their sums over the moving count.
    for key in ("cls_loss", "box_loss"):
      total = float(plain[key]) * max(count, 1)
      np.testing.assert_allclose(float(ema[key]), total / got[-1], rtol=1e-5)
  assert counts[1] == 0 and min(counts[::2]) > 0
  np.testing.assert_allclose(got, d2_ema_normalizers(counts), rtol=1e-6)
  # Without a moving count: the batch's own, as before.
  np.testing.assert_allclose(
      float(losses.loss_normalizer(jnp.int32(0))), 1.0)
  np.testing.assert_allclose(
      float(losses.loss_normalizer(jnp.int32(37), jnp.float32(5.0), 0.0)), 37)


@pytest.mark.long
def test_the_job_carries_the_moving_normalizer_in_its_state(tmp_path):
  """The train step updates it from the global batch's count; checkpoints
  keep it; a resume with the other setting says so."""
  config = detection_config.get_config("tiny,square")
  assert config.loss.normalizer_momentum == 0.0  # The square recipe's.
  assert detection.initial_loss_normalizer(config) is None
  config.loss.normalizer_momentum = 0.9
  config.loss.normalizer_init = 100.0
  mesh = sharding.make_mesh(jax.devices()[:1])
  backbone = pretrained.random_init(detco_config.get_config("tiny"), 0, mesh)
  detector = detection.build(config, backbone, 3, mesh)
  state = detection.create_state(
      detector.model, backbone, detector.tx, detector.anchors, mesh,
      config.seed,
      detection.initial_loss_normalizer(config))
  assert isinstance(state, detection.EmaDetectorState)
  assert float(state.loss_normalizer) == 100.0
  make_batch = jax.jit(detection_step.make_batch_fn(config, 3, 2))
  counts = []
  for i in range(3):
    state, metrics = detector.train_step(state, make_batch(jax.random.key(i)))
    counts.append(float(metrics["num_fg"]) * config.batch_size)
    assert float(metrics["loss_normalizer"]) == float(state.loss_normalizer)
  np.testing.assert_allclose(float(state.loss_normalizer),
                             d2_ema_normalizers(counts)[-1], rtol=1e-6)

  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ema", asynchronous=False)
  ckpt.save(3, state)
  restored = ckpt.restore(state)
  ckpt.close()
  assert float(restored.loss_normalizer) == float(state.loss_normalizer)
  check = detection._check_saved_normalizer  # pylint: disable=protected-access
  check(str(tmp_path / "ema"), True, mesh)
  with pytest.raises(ValueError,
                     match="saved with loss.normalizer_momentum > 0"):
    check(str(tmp_path / "ema"), False, mesh)
  # A run saved without it (every run before the option) resumes as it was,
  # and refuses a moving count with a clear message.
  plain = detection.DetectorState(state.step, state.params, state.batch_stats,
                                  state.opt_state)
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "plain", asynchronous=False)
  ckpt.save(3, plain)
  ckpt.close()
  check(str(tmp_path / "plain"), False, mesh)
  with pytest.raises(ValueError, match="saved with loss.normalizer_momentum 0"):
    check(str(tmp_path / "plain"), True, mesh)


@pytest.mark.long
def test_a_resumed_job_continues_the_moving_normalizer(
    tiny_pretrain_workdir, builtin_data_dir, tmp_path):
  """SIGTERM or NaN, then resume: bit for bit the uninterrupted run's state,
  the moving count included (eval/detection.py `job`)."""
  config = detection_config.get_config("tiny")
  config.pretrained = tiny_pretrain_workdir
  config.data.data_dir = builtin_data_dir
  assert config.loss.normalizer_momentum == 0.9  # The protocol's.
  config.loss.normalizer_init = 100.0
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: detection.job(config, workdir), tmp_path, stop_k=3,
      nan_k=5)
  assert float(straight.state.loss_normalizer) != 100.0
  config.loss.normalizer_momentum = 0.0
  with pytest.raises(ValueError, match="normalizer_momentum > 0"):
    loop.run(detection.job(config, str(tmp_path / "straight")))


# --- inference ---------------------------------------------------------------


def inference_case(seed, image=(96, 128), num_classes=4):
  """Random logits and deltas over a real 3-level anchor grid."""
  rng = np.random.default_rng(seed)
  levels, sizes = (3, 4, 5), (32.0, 64.0, 128.0)
  anchors = boxes.anchors(image, levels, sizes, 3, D2_RATIOS, offset=0.0)
  per_level = boxes.anchors_per_level(image, levels, 3, D2_RATIOS)
  logits = rng.normal(-3.0, 2.0, (1, len(anchors), num_classes))
  deltas = rng.normal(0.0, 0.3, (1, len(anchors), 4))
  return (logits.astype(np.float32), deltas.astype(np.float32), anchors,
          per_level)


def d2_detect(logits, deltas, anchors, per_level, image, **kwargs):
  """detectron2's detections of image 0: inference, then postprocess."""
  splits = np.cumsum(per_level)[:-1]
  scores = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
  out = d2_inference_single_image(
      np.split(scores, splits), np.split(deltas[0], splits),
      np.split(anchors, splits), **kwargs)
  return d2_detector_postprocess(*out, image)


def project_detect(logits, deltas, anchors, per_level, image, **kwargs):
  """The project's valid detections of image 0, as NumPy."""
  out = jax.jit(functools.partial(nms.postprocess, level_sizes=per_level,
                                  image_size=image, **kwargs))(
                                      logits, deltas, anchors)
  out = {k: np.asarray(v)[0] for k, v in out.items()}
  n = int(out["valid"].sum())
  assert out["valid"][:n].all()  # Valid slots first.
  return out["boxes"][:n], out["scores"][:n], out["classes"][:n]


@pytest.mark.parametrize("seed,score_thresh,topk,max_det", [
    (0, 0.05, 1000, 100),  # detectron2's settings.
    (1, 0.05, 60, 100),    # Top-k binds on every level.
    (2, 0.5, 200, 40),     # Fewer than top-k above the threshold on P5.
])
def test_postprocess_with_clip_after_nms_is_detectron2s(seed, score_thresh,
                                                         topk, max_det):
  image = (96, 128)
  case = inference_case(seed, image)
  ref = d2_detect(*case, image, score_thresh=score_thresh,
                  topk_candidates=topk, nms_thresh=0.5,
                  max_detections=max_det)
  got = project_detect(*case, image, score_threshold=score_thresh,
                       topk_per_level=topk, nms_threshold=0.5,
                       max_detections=max_det, clip_after_nms=True)
  assert 10 < len(ref[0]) <= max_det
  # Same detections in the same (score) order; the random scores have no
  # ties.
  np.testing.assert_array_equal(got[2], ref[2])
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-3)


def test_clipping_before_nms_is_a_departure():
  """Two same-class boxes out of the image: IoU 0.3 as predicted (both
  kept by detectron2), 0.94 once clipped (the default drops one)."""
  image = (64, 64)
  anchors = np.array([[0, 0, 200, 20], [0, 0, 60, 20]], np.float32)
  logits = np.array([[[3.0], [2.0]]], np.float32)
  deltas = np.zeros((1, 2, 4), np.float32)
  case = (logits, deltas, anchors, [2])
  ref = d2_detect(*case, image)
  np.testing.assert_allclose(ref[0], [[0, 0, 64, 20], [0, 0, 60, 20]])
  after = project_detect(*case, image, clip_after_nms=True)
  np.testing.assert_allclose(after[0], ref[0], atol=1e-4)
  before = project_detect(*case, image)
  np.testing.assert_allclose(before[0], ref[0][:1], atol=1e-4)


def test_clip_after_nms_drops_boxes_left_empty_and_keeps_the_order():
  image = (64, 64)
  anchors = np.array([[0, 0, 20, 20], [70, 0, 90, 20], [30, 30, 50, 50]],
                     np.float32)  # The second lies right of the image.
  logits = np.array([[[3.0], [2.0], [1.0]]], np.float32)
  case = (logits, np.zeros((1, 3, 4), np.float32), anchors, [3])
  ref = d2_detect(*case, image)
  got = project_detect(*case, image, clip_after_nms=True, max_detections=3)
  assert len(ref[0]) == len(got[0]) == 2
  np.testing.assert_allclose(got[0], ref[0], atol=1e-4)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-6)
