"""COCO-format ground truth and detections, and box AP through pycocotools.

The detection job writes both files of each evaluation (`write`) so that the
numbers can be recomputed, or compared with other tools, from the files alone.

Conventions:

  * Boxes come in as XYXY (x1, y1, x2, y2) pixels of the evaluated image, the
    S x S output of `data.detection.make_test_iterator`, and go out as COCO's
    [x, y, width, height] in the same pixels. With `source_pixels=True` /
    `scales=source_scales(...)` they go out in the dataset's own pixels
    instead: COCO's small / medium / large areas (32^2, 96^2) are meant at
    that resolution, so APs / APm / APl at another size mean other objects.
  * Class k (a "labels" value, 0..K-1) is `category_id` k + 1: COCO's ids
    start at 1, and some tools read 0 as background.
  * An image is one real example of the test batches ("mask" 1), with the
    dataset's image id; its width and height are the real (unpadded) image's.
  * A ground-truth box flagged "crowd" (COCO crowd, VOC difficult) is written
    with `iscrowd` 1: pycocotools then neither rewards nor penalises
    detections of it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from absl import logging
from etils import epath
import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval

# pycocotools' `stats[0..5]`, by name: AP over IoU 0.5:0.95, at 0.5, at 0.75,
# then AP of small, medium and large objects.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

Batches = Union[Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]]]


def _concat(examples: Batches) -> dict[str, np.ndarray]:
  """One dict of all examples from a batch or an iterable of batches."""
  if isinstance(examples, Mapping):
    return {k: np.asarray(v) for k, v in examples.items()}
  batches = list(examples)
  if not batches:
    raise ValueError("No test batches given.")
  return {k: np.concatenate([np.asarray(b[k]) for b in batches])
          for k in batches[0]}


def _real(ex: Mapping[str, np.ndarray]) -> np.ndarray:
  """bool [N]: the real examples (not batch padding)."""
  n = len(ex["image_id"])
  return np.asarray(ex["mask"]) == 1 if "mask" in ex else np.ones(n, bool)


def source_scales(examples: Batches) -> np.ndarray:
  """Per-example factors from evaluated-image pixels to the dataset's pixels.

  Args:
    examples: test batches with "width", "height", "source_width",
      "source_height".

  Returns:
    float64 [N, 2], (x, y) factors (source size / resized size); 1 for
    padding examples. Pass as `detections(..., scales=...)`.
  """
  ex = _concat(examples)
  resized = np.stack([ex["width"], ex["height"]], axis=1).astype(np.float64)
  source = np.stack([ex["source_width"], ex["source_height"]],
                    axis=1).astype(np.float64)
  return np.where(resized > 0, source / np.maximum(resized, 1), 1.0)


def _xywh(boxes: np.ndarray, scales: Optional[np.ndarray]) -> np.ndarray:
  """XYXY [..., 4] -> COCO [x, y, w, h], optionally scaled per example.

  Args:
    boxes: float [N, ..., 4] (x1, y1, x2, y2).
    scales: None or [N, 2] (x, y) factors.

  Returns:
    float64 [N, ..., 4].
  """
  boxes = np.asarray(boxes, np.float64)
  if scales is not None:
    factor = np.tile(np.asarray(scales, np.float64), 2)  # (x, y, x, y)
    boxes = boxes * factor.reshape((len(boxes),) + (1,) * (boxes.ndim - 2)
                                   + (4,))
  return np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]],
                        axis=-1)


def ground_truth(examples: Batches, class_names: Sequence[str], *,
                 source_pixels: bool = False) -> dict[str, Any]:
  """The COCO annotation file of the test batches.

  Args:
    examples: a test batch or an iterable of them
      (`data.detection.make_test_iterator`): "image_id" [N], "boxes"
      [N, G, 4] XYXY pixels, "labels" [N, G], "valid" [N, G], and, if
      present, "mask" [N] (padding examples are left out), "crowd" [N, G],
      "height" / "width" [N] (else the side of "image"); with
      `source_pixels`, also "source_height" / "source_width".
    class_names: the K class names; class k is category k + 1.
    source_pixels: boxes and image sizes in the dataset's pixels rather than
      the evaluated image's.

  Returns:
    {"info", "images": [{"id", "width", "height"}], "annotations": [{"id",
    "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd"}],
    "categories": [{"id", "name"}]}, with Python numbers only.
  """
  ex = _concat(examples)
  real = _real(ex)
  if "width" in ex:
    widths, heights = ex["width"], ex["height"]
  else:
    side = ex["image"].shape[2]
    widths = heights = np.full(len(real), side)
  scales = source_scales(ex) if source_pixels else None
  if source_pixels:
    widths, heights = ex["source_width"], ex["source_height"]
  bboxes = _xywh(ex["boxes"], scales)
  crowd = ex["crowd"] if "crowd" in ex else np.zeros(ex["valid"].shape, bool)
  images, annotations = [], []
  for i in np.flatnonzero(real):
    image_id = int(ex["image_id"][i])
    images.append({"id": image_id, "width": int(widths[i]),
                   "height": int(heights[i])})
    for j in np.flatnonzero(ex["valid"][i]):
      x, y, w, h = (float(v) for v in bboxes[i, j])
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(ex["labels"][i, j]) + 1,
          "bbox": [x, y, w, h], "area": w * h,
          "iscrowd": int(bool(crowd[i, j]))})
  categories = [{"id": k + 1, "name": str(name)}
                for k, name in enumerate(class_names)]
  return {"info": {"description": "detco_jax detection ground truth"},
          "images": images, "annotations": annotations,
          "categories": categories}


def detections(image_ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
               classes: np.ndarray, valid: np.ndarray, *,
               scales: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
  """Detections in COCO's results format.

  Args:
    image_ids: int [N] image ids (as in the ground truth).
    boxes: float [N, D, 4] XYXY pixels of the evaluated image.
    scores: float [N, D].
    classes: int [N, D] class ids 0..K-1.
    valid: bool [N, D]: which detections exist (False for padding, and for
      every detection of a padding example).
    scales: None, or float [N, 2] (x, y) factors applied to the boxes, e.g.
      `source_scales(test_batches)` for the dataset's pixels.

  Returns:
    [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}], with
    Python numbers only.
  """
  bboxes = _xywh(boxes, scales)
  scores = np.asarray(scores, np.float64)
  classes = np.asarray(classes)
  image_ids = np.asarray(image_ids)
  return [{"image_id": int(image_ids[i]),
           "category_id": int(classes[i, j]) + 1,
           "bbox": [float(v) for v in bboxes[i, j]],
           "score": float(scores[i, j])}
          for i, j in zip(*np.nonzero(np.asarray(valid)))]


def paths(workdir: str, split: str) -> tuple[epath.Path, epath.Path]:
  """(ground truth, detections) file paths of a split in `workdir`."""
  root = epath.Path(workdir)
  return (root / f"ground_truth_{split}.json",
          root / f"detections_{split}.json")


def write(workdir: str, split: str, gt: Mapping[str, Any],
          dets: Sequence[Mapping[str, Any]]) -> None:
  """Writes `ground_truth_<split>.json` and `detections_<split>.json`.

  Only process 0 writes (every process would write the same files); `workdir`
  may be any etils path (local, gs://).

  Args:
    workdir: the job's directory.
    split: the evaluated split, part of the file names.
    gt: `ground_truth`'s dict.
    dets: `detections`' list.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  gt_path, dets_path = paths(workdir, split)
  gt_path.parent.mkdir(parents=True, exist_ok=True)
  gt_path.write_text(json.dumps(gt))
  dets_path.write_text(json.dumps(list(dets)))
  logging.info("Wrote %s and %s (%d images, %d boxes, %d detections).",
               gt_path, dets_path, len(gt["images"]), len(gt["annotations"]),
               len(dets))


def evaluate(gt: Mapping[str, Any],
             dets: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Box AP of `dets` against `gt` with pycocotools' COCOeval.

  pycocotools' printed summary is logged at INFO, not printed. Neither
  argument is changed (pycocotools annotates what it is given; it gets
  copies).

  Args:
    gt: `ground_truth`'s dict.
    dets: `detections`' list.

  Returns:
    {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions in [0, 1];
    all 0 when there is no detection (pycocotools cannot load an empty
    result list); -1 where the ground truth has no box to measure (e.g. no
    small object), as pycocotools reports it.
  """
  if not dets:
    logging.info("No detections: every AP is 0.")
    return dict.fromkeys(METRICS, 0.0)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    coco_gt = coco_api.COCO()
    coco_gt.dataset = copy.deepcopy(dict(gt))
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(copy.deepcopy(list(dets)))
    evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  logging.info("pycocotools COCOeval (bbox):\n%s", printed.getvalue())
  return {name: float(v) for name, v in zip(METRICS, evaluator.stats[:6])}
