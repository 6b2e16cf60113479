"""Tests of the COCO-format files and AP (detco_jax/eval/coco.py)."""

import copy
import json

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval
import pytest

from detco_jax.eval import coco

CLASSES = ("circle", "square", "triangle")


def make_batch(boxes, labels, *, max_boxes=4, crowd=None, size=128,
               pad_examples=0):
  """A test batch as `make_test_iterator` gives: per-image XYXY boxes."""
  n = len(boxes) + pad_examples
  batch = {
      "image_id": np.array([10 + i for i in range(len(boxes))]
                           + [-1] * pad_examples, np.int64),
      "boxes": np.zeros((n, max_boxes, 4), np.float32),
      "labels": np.full((n, max_boxes), -1, np.int32),
      "valid": np.zeros((n, max_boxes), bool),
      "crowd": np.zeros((n, max_boxes), bool),
      "mask": np.array([1] * len(boxes) + [0] * pad_examples, np.int32),
      "height": np.array([size] * len(boxes) + [0] * pad_examples, np.int32),
      "width": np.array([size] * len(boxes) + [0] * pad_examples, np.int32),
  }
  for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
    k = len(image_boxes)
    if k:
      batch["boxes"][i, :k] = image_boxes
    batch["labels"][i, :k] = image_labels
    batch["valid"][i, :k] = True
    if crowd is not None:
      batch["crowd"][i, :k] = crowd[i]
  return batch


def perfect(batch, score=0.9):
  """The ground truth's own boxes as detections."""
  return coco.detections(batch["image_id"], batch["boxes"],
                         np.full(batch["valid"].shape, score),
                         np.maximum(batch["labels"], 0),
                         batch["valid"] & (batch["mask"] == 1)[:, None])


def from_files(tmp_path, split):
  """pycocotools' stats[:6] recomputed from the two written files."""
  gt_path, dets_path = coco.paths(str(tmp_path), split)
  assert gt_path.exists() and dets_path.exists()
  gt = coco_api.COCO(str(gt_path))
  evaluator = cocoeval.COCOeval(gt, gt.loadRes(str(dets_path)), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return dict(zip(coco.METRICS, evaluator.stats[:6].tolist()))


def test_ground_truth_and_detections_convert_boxes_and_categories():
  boxes = [np.array([[1.5, 2.0, 11.5, 22.0], [0, 0, 128, 64]], np.float32),
           np.array([[5.0, 6.0, 7.0, 10.0]], np.float32)]
  batch = make_batch(boxes, [[2, 0], [1]], crowd=[[False, True], [False]],
                     pad_examples=1)
  batch["width"][1] = 96  # A landscape image resized: 128 x 96.
  gt = coco.ground_truth(batch, CLASSES)
  assert gt["categories"] == [{"id": 1, "name": "circle"},
                              {"id": 2, "name": "square"},
                              {"id": 3, "name": "triangle"}]
  # The padding example (mask 0) is not an image.
  assert gt["images"] == [{"id": 10, "width": 128, "height": 128},
                          {"id": 11, "width": 96, "height": 128}]
  xyxy = np.concatenate(boxes)
  want = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
  anns = gt["annotations"]
  np.testing.assert_allclose([a["bbox"] for a in anns], want)
  np.testing.assert_allclose([a["area"] for a in anns],
                             want[:, 2] * want[:, 3])
  assert [a["category_id"] for a in anns] == [3, 1, 2]
  assert [a["image_id"] for a in anns] == [10, 10, 11]
  assert [a["iscrowd"] for a in anns] == [0, 1, 0]
  assert [a["id"] for a in anns] == [1, 2, 3]

  scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2],
                     [0.1, 0.1, 0.1, 0.1]])
  classes = np.array([[2, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
  valid = batch["valid"].copy()
  valid[0, 3] = True  # A detection whose box is the padding's zeros.
  dets = coco.detections(batch["image_id"], batch["boxes"], scores, classes,
                         valid)
  assert [d["image_id"] for d in dets] == [10, 10, 10, 11]
  assert [d["category_id"] for d in dets] == [3, 1, 2, 2]
  np.testing.assert_allclose([d["score"] for d in dets], [0.9, 0.8, 0.6, 0.5])
  np.testing.assert_allclose([d["bbox"] for d in dets],
                             np.insert(want, 2, [0, 0, 0, 0], axis=0))
  json.dumps(gt), json.dumps(dets)  # Python numbers only.


def test_perfect_detections_give_ap_one():
  rng = np.random.default_rng(0)
  boxes, labels = [], []
  for _ in range(6):
    # Small, medium and large objects, so that every AP is measured.
    xy = rng.uniform(0, 20, (3, 2))
    side = np.array([[20.0], [60.0], [110.0]]) * rng.uniform(0.9, 1.0, (3, 1))
    boxes.append(np.concatenate([xy, xy + side], axis=1))
    labels.append(rng.integers(0, 3, 3))
  batch = make_batch(boxes, labels, max_boxes=5, size=140)
  metrics = coco.evaluate(coco.ground_truth(batch, CLASSES), perfect(batch))
  assert metrics == dict.fromkeys(coco.METRICS, 1.0)


def test_one_of_two_objects_found_matches_pycocotools_files(tmp_path):
  # Two large objects of one class; one detected exactly: recall 0.5 at
  # precision 1 at every IoU, so the 101-point AP is 51 / 101.
  boxes = [np.array([[0, 0, 100, 100], [10, 20, 120, 125]], np.float32)]
  batch = make_batch(boxes, [[1, 1]])
  gt = coco.ground_truth(batch, CLASSES)
  dets = coco.detections([10], boxes[0][None, :1], [[0.7]], [[1]], [[True]])
  metrics = coco.evaluate(gt, dets)
  coco.write(str(tmp_path), "val", gt, dets)
  assert metrics == pytest.approx(from_files(tmp_path, "val"))
  assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == metrics[
      "APl"] == pytest.approx(51 / 101)
  assert metrics["APs"] == metrics["APm"] == -1  # No such objects.


def test_shifted_box_matches_only_low_iou_thresholds(tmp_path):
  # Shifted by 20 px: IoU 80 / 120 = 0.667 passes 0.5 .. 0.65 (4 of the 10
  # thresholds), so AP 0.4, AP50 1 and AP75 0.
  boxes = [np.array([[0, 0, 100, 100]], np.float32)]
  batch = make_batch(boxes, [[0]])
  gt = coco.ground_truth(batch, CLASSES)
  dets = coco.detections([10], np.array([[[20, 0, 120, 100]]]), [[0.9]],
                         [[0]], [[True]])
  metrics = coco.evaluate(gt, dets)
  coco.write(str(tmp_path), "test", gt, dets)
  assert metrics == pytest.approx(from_files(tmp_path, "test"))
  assert metrics["AP"] == pytest.approx(0.4)
  assert (metrics["AP50"], metrics["AP75"]) == (pytest.approx(1.0), 0.0)
  # A detection of the wrong class finds nothing.
  wrong = [dict(dets[0], category_id=3)]
  assert coco.evaluate(gt, wrong)["AP50"] == 0.0


def test_empty_detections_give_zero():
  batch = make_batch([np.array([[0, 0, 50, 50]], np.float32)], [[0]])
  gt = coco.ground_truth(batch, CLASSES)
  dets = coco.detections(batch["image_id"], batch["boxes"],
                         np.ones((1, 4)), np.zeros((1, 4), int),
                         np.zeros((1, 4), bool))
  assert dets == []
  assert coco.evaluate(gt, dets) == dict.fromkeys(coco.METRICS, 0.0)


def test_crowd_boxes_are_ignored():
  boxes = [np.array([[0, 0, 100, 100], [0, 0, 30, 120]], np.float32)]
  batch = make_batch(boxes, [[0, 0]], crowd=[[False, True]])
  gt = coco.ground_truth(batch, CLASSES)
  # Only the non-crowd box found: nothing is missed.
  assert coco.evaluate(gt, perfect(batch)[:1])["AP"] == pytest.approx(1.0)
  # Detecting the crowd box too costs nothing either.
  assert coco.evaluate(gt, perfect(batch))["AP"] == pytest.approx(1.0)


def test_source_pixels_scale_boxes_back():
  # 200 x 100 source, evaluated at S = 64: resized to 64 x 32.
  boxes = [np.array([[8, 4, 40, 28]], np.float32)]
  batch = make_batch(boxes, [[2]], size=64)
  batch["height"][:] = 32
  batch["source_width"] = np.array([200], np.int32)
  batch["source_height"] = np.array([100], np.int32)
  scales = coco.source_scales(batch)
  np.testing.assert_allclose(scales, [[200 / 64, 100 / 32]])
  gt = coco.ground_truth(batch, CLASSES, source_pixels=True)
  assert gt["images"] == [{"id": 10, "width": 200, "height": 100}]
  want = [8 * 200 / 64, 4 * 100 / 32, 32 * 200 / 64, 24 * 100 / 32]
  np.testing.assert_allclose(gt["annotations"][0]["bbox"], want)
  dets = coco.detections(batch["image_id"], batch["boxes"],
                         np.ones((1, 4)), np.full((1, 4), 2), batch["valid"],
                         scales=scales)
  np.testing.assert_allclose(dets[0]["bbox"], want)
  assert coco.evaluate(gt, dets)["AP"] == pytest.approx(1.0)


def test_evaluate_prints_nothing_and_keeps_its_inputs(capsys):
  batch = make_batch([np.array([[0, 0, 50, 50]], np.float32)], [[0]])
  gt = coco.ground_truth(batch, CLASSES)
  dets = perfect(batch)
  gt_copy, dets_copy = copy.deepcopy(gt), copy.deepcopy(dets)
  capsys.readouterr()
  coco.evaluate(gt, dets)
  assert capsys.readouterr().out == ""
  assert gt == gt_copy and dets == dets_copy


def test_ground_truth_of_several_batches():
  one = make_batch([np.array([[0, 0, 5, 5]], np.float32)], [[0]])
  two = make_batch([np.array([[1, 1, 6, 6]], np.float32)], [[1]],
                   pad_examples=1)
  two["image_id"][0] = 11
  gt = coco.ground_truth([one, two], CLASSES)
  assert [i["id"] for i in gt["images"]] == [10, 11]
  assert [a["category_id"] for a in gt["annotations"]] == [1, 2]
