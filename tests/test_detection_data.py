"""Tests of the detection streams (detco_jax/data/detection.py)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import detco
from configs import detection as detection_config
from detco_jax.data import builtin
from detco_jax.data import detection
from detco_jax.data import pipeline
from detco_jax.data import sources
from test_pipeline import assert_same_batches, take

# The boxes of the fake COCO-style dataset are drawn in these colours, one
# per class, on black; class 3 marks crowd regions only.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
                   np.uint8)
BOX_CLASSES = ("red", "green", "blue", "crowd")


def tiny_config(data_dir, **views):
  """The tiny config on square views, which the tests below pin."""
  c = detection_config.get_config("tiny,square")
  c.data.data_dir = data_dir
  c.views.update(views)
  return c


def xyxy(boxes, height, width):
  """Normalised [ymin, xmin, ymax, xmax] -> XYXY pixels (NumPy reference)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([boxes[:, 1] * width, boxes[:, 0] * height,
                   boxes[:, 3] * width, boxes[:, 2] * height], axis=1)


@pytest.fixture(scope="module")
def shapes(builtin_data_dir):
  """The built-in dataset's examples, as stored: {split: [example]}."""
  b = builtin.builder(32, 256, 64, builtin_data_dir)
  return {split: list(tfds.as_numpy(b.as_dataset(split=split)))
          for split in ("train", "test")}


@pytest.fixture(scope="module")
def by_image(shapes):
  """The built-in training example of each (unique) image."""
  table = {e["image"].tobytes(): e for e in shapes["train"]}
  assert len(table) == len(shapes["train"])
  return table


def source_of(image, by_image):
  """The training example an unflipped, unscaled output image copies."""
  return by_image[np.ascontiguousarray(image).tobytes()]


# ---- Feature layouts on fake TFDS records.


def serialize(features, examples):
  return tf.data.Dataset.from_tensor_slices(
      [features.serialize_example(e) for e in examples])


def decoded(features, layout, examples):
  ds = serialize(features, examples).map(
      detection.make_decoder(features, layout))
  return list(tfds.as_numpy(ds))


def test_coco_layout_on_fake_records(tmp_path):
  # The real feature spec of TFDS's coco/2017 (known without its data).
  features = tfds.builder("coco/2017", data_dir=str(tmp_path)).info.features
  bbox = tfds.features.BBox
  examples = [
      {"image": np.full((6, 10, 3), 9, np.uint8), "image/filename": "a.jpg",
       "image/id": 397133,
       "objects": {"id": [1, 2], "area": [30, 4],
                   "bbox": [bbox(0.1, 0.2, 0.5, 0.9), bbox(0.0, 0.0, 1.0, 1.0)],
                   "label": [79, 0], "is_crowd": [False, True]}},
      {"image": np.zeros((4, 4, 3), np.uint8), "image/filename": "b.jpg",
       "image/id": 7,
       "objects": {"id": [], "area": [], "bbox": [], "label": [],
                   "is_crowd": []}},
  ]
  config = tiny_config(str(tmp_path))
  config.data.dataset = "coco/2017"
  layout = detection.box_features(config.data)
  assert layout == detection.BOX_FEATURES["coco"]
  first, empty = decoded(features, layout, examples)
  assert first["image"].shape == (6, 10, 3) and first["image"][0, 0, 0] == 9
  objects = first["label"]
  np.testing.assert_allclose(objects["boxes"],
                             [[0.1, 0.2, 0.5, 0.9], [0, 0, 1, 1]], atol=1e-7)
  assert objects["classes"].tolist() == [79, 0]
  assert objects["classes"].dtype == np.int32
  assert objects["crowd"].tolist() == [False, True]
  assert objects["difficult"].tolist() == [False, False]
  assert objects["image_id"] == 397133
  assert empty["label"]["boxes"].shape == (0, 4)
  assert empty["label"]["image_id"] == 7


def test_voc_layout_on_fake_records(tmp_path):
  features = tfds.builder("voc/2012", data_dir=str(tmp_path)).info.features
  bbox = tfds.features.BBox
  # As TFDS stores VOC: 1-based pixel indices divided by the size.
  example = {
      "image": np.zeros((10, 20, 3), np.uint8),
      "image/filename": "2008_000123.jpg",
      "objects": {"label": [14, 2], "pose": [0, 1],
                  "bbox": [bbox(1 / 10, 1 / 20, 5 / 10, 8 / 20),
                           bbox(3 / 10, 11 / 20, 1.0, 1.0)],
                  "is_truncated": [False, False],
                  "is_difficult": [False, True]},
      "labels": [2, 14], "labels_no_difficult": [14],
  }
  config = tiny_config(str(tmp_path))
  config.data.dataset = "voc/2012"
  layout = detection.box_features(config.data)
  assert layout == detection.BOX_FEATURES["voc"]
  (out,) = decoded(features, layout, [example])
  objects = out["label"]
  # VOC's pixels 1..5 (rows) and 1..8 (columns) cover [0, 5) x [0, 8).
  np.testing.assert_allclose(
      objects["boxes"], [[0.0, 0.0, 0.5, 0.4], [0.2, 0.5, 1.0, 1.0]],
      atol=1e-6)
  assert objects["classes"].tolist() == [14, 2]
  assert objects["difficult"].tolist() == [False, True]
  assert objects["crowd"].tolist() == [False, False]
  assert objects["image_id"] == 2008000123


def test_layout_lookup_and_errors(tmp_path):
  config = tiny_config(str(tmp_path))
  assert detection.box_features(config.data) == detection.BOX_FEATURES[
      "detco_shapes"]
  config.data.dataset = "my_boxes/1.0.0"
  with pytest.raises(sources.DatasetUnavailableError,
                     match="set config.data.box_features"):
    detection.box_features(config.data)
  config.data.box_features = "coco"
  assert detection.box_features(config.data) == detection.BOX_FEATURES["coco"]
  features = tfds.builder("voc/2007", data_dir=str(tmp_path)).info.features
  with pytest.raises(sources.DatasetUnavailableError,
                     match=r"no features \['image/id', 'objects/is_crowd'\]"):
    detection.make_decoder(features, detection.BOX_FEATURES["coco"])


# ---- Errors.


def test_missing_dataset_gives_the_pretraining_error(tmp_path):
  config = tiny_config(str(tmp_path))
  config.data.dataset = "coco/2017"
  pretrain = detco.get_config("tiny")
  pretrain.data.dataset = "coco/2017"
  pretrain.data.data_dir = str(tmp_path)
  with pytest.raises(sources.DatasetUnavailableError) as expected:
    pipeline.make_pretrain_iterator(pretrain, process_index=0,
                                    process_count=1)
  assert f"tfds build coco/2017 --data_dir={tmp_path}" in str(expected.value)
  for make in (
      lambda: detection.make_train_iterator(config, process_index=0,
                                            process_count=1),
      lambda: detection.make_test_iterator(config, batch_size=4,
                                           process_index=0, process_count=1),
      lambda: detection.num_classes(config)):
    with pytest.raises(sources.DatasetUnavailableError) as got:
      make()
    assert str(got.value) == str(expected.value)
  config.data.dataset = f"folder:{tmp_path}"
  with pytest.raises(sources.DatasetUnavailableError, match="needs boxes"):
    detection.make_train_iterator(config, process_index=0, process_count=1)


def test_bad_views_are_reported(builtin_data_dir):
  config = tiny_config(builtin_data_dir, scale_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="views.scale_range"):
    detection.make_train_iterator(config, process_index=0, process_count=1)
  config = tiny_config(builtin_data_dir)
  config.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size \(6\)"):
    detection.make_train_iterator(config, process_index=0, process_count=4)


# ---- The built-in dataset.


def test_configs_and_classes(builtin_data_dir):
  for variant in ("", "voc", "demo", "tiny", "square", "demo,square"):
    c = detection_config.get_config(variant)
    spec = detection.BoxViewSpec.from_config(c)
    assert spec.image_size == c.views.image_size
    assert spec.min_sizes == tuple(c.views.min_sizes)
    assert spec.grouped == ("square" not in variant)
  voc = detection_config.get_config("voc")
  assert detection.train_parts(voc.data) == [
      ("voc/2007", "train+validation"), ("voc/2012", "train+validation")]
  config = tiny_config(builtin_data_dir)
  assert detection.class_names(config) == builtin.CLASS_NAMES
  assert detection.num_classes(config) == 10


def test_test_boxes_equal_numpy_resize_and_cover_the_mask(builtin_data_dir,
                                                          shapes):
  # 32 px images evaluated at 48 px: x1.5, no padding needed.
  config = tiny_config(builtin_data_dir, image_size=48)
  it = detection.make_test_iterator(config, batch_size=48, process_index=0,
                                    process_count=1)
  batches = list(it)
  assert len(batches) == it.num_batches == 2
  keys = {"image", "boxes", "labels", "valid", "crowd", "image_id", "mask",
          "height", "width", "source_height", "source_width"}
  g = config.data.max_boxes
  for b in batches:
    assert set(b) == keys
    assert b["image"].shape == (48, 48, 48, 3) and b["image"].dtype == np.uint8
    assert b["boxes"].shape == (48, g, 4) and b["boxes"].dtype == np.float32
    assert b["labels"].dtype == np.int32 and b["valid"].dtype == bool
    assert b["image_id"].dtype == np.int64 and b["mask"].dtype == np.int32
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [1] * 64 + [0] * 32
  examples = shapes["test"]
  for b in batches:
    for i in np.flatnonzero(b["mask"]):
      e = examples[b["image_id"][i]]
      n = len(e["box_labels"])
      assert (b["height"][i], b["width"][i]) == (48, 48)
      assert (b["source_height"][i], b["source_width"][i]) == (32, 32)
      assert b["valid"][i].tolist() == [True] * n + [False] * (g - n)
      np.testing.assert_allclose(b["boxes"][i, :n],
                                 xyxy(e["boxes"], 48, 48), atol=1e-4)
      assert b["labels"][i, :n].tolist() == e["box_labels"].tolist()
      assert not b["crowd"][i].any()
      # Nearest-upsampled object pixels lie in the box and span it.
      # (TF's nearest resize samples source pixel floor((j + 0.5) / 1.5).)
      up = np.floor((np.arange(48) + 0.5) / 1.5).astype(int)
      big_mask = e["mask"][..., 0][up][:, up]
      for (x1, y1, x2, y2), c in zip(b["boxes"][i, :n], e["box_labels"]):
        rows, cols = np.nonzero(big_mask == c + 1)
        assert rows.min() >= y1 - 1 and rows.max() + 1 <= y2 + 1
        assert cols.min() >= x1 - 1 and cols.max() + 1 <= x2 + 1
        assert rows.min() <= y1 + 1 and rows.max() + 1 >= y2 - 1
        assert cols.min() <= x1 + 1 and cols.max() + 1 >= x2 - 1
    padding = b["mask"] == 0
    assert not b["valid"][padding].any() and np.all(b["image"][padding] == 0)
    assert np.all(b["image_id"][padding] == -1)
    assert np.all(b["labels"][~b["valid"]] == -1)
    assert np.all(b["boxes"][~b["valid"]] == 0)
  assert it.num_truncated == 0


def test_max_boxes_truncates_and_counts(builtin_data_dir, shapes):
  config = tiny_config(builtin_data_dir)
  config.data.max_boxes = 2
  it = detection.make_test_iterator(config, batch_size=64, process_index=0,
                                    process_count=1)
  (batch,) = list(it)
  counts = np.array([len(e["box_labels"]) for e in shapes["test"]])
  assert counts.max() > 2  # The test needs images with 3 or 4 objects.
  order = batch["image_id"]
  np.testing.assert_array_equal(batch["valid"].sum(1),
                                np.minimum(counts[order], 2))
  assert it.num_truncated == int(np.maximum(counts - 2, 0).sum())
  for i, e in enumerate(shapes["test"][j] for j in order):
    k = min(len(e["box_labels"]), 2)
    np.testing.assert_allclose(batch["boxes"][i, :k],
                               xyxy(e["boxes"][:k], 32, 32), atol=1e-4)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_moves_boxes_as_numpy_says(builtin_data_dir, by_image,
                                        flip_prob):
  config = tiny_config(builtin_data_dir, scale_range=(1.0, 1.0),
                       flip_prob=flip_prob)
  it = detection.make_train_iterator(config, process_index=0, process_count=1)
  for b in take(it, 2):
    assert set(b) == {"image", "boxes", "labels", "valid"}
    assert b["image"].shape == (8, 32, 32, 3)
    for i in range(8):
      image = b["image"][i][:, ::-1] if flip_prob else b["image"][i]
      e = source_of(image, by_image)  # An exact copy, mirrored or not.
      want = xyxy(e["boxes"], 32, 32)
      if flip_prob:
        want = np.stack([32 - want[:, 2], want[:, 1], 32 - want[:, 0],
                         want[:, 3]], axis=1)
      n = len(want)
      assert b["valid"][i].tolist() == [True] * n + [False] * (4 - n)
      np.testing.assert_allclose(b["boxes"][i, :n], want, atol=1e-4)
      assert b["labels"][i, :n].tolist() == e["box_labels"].tolist()


def reference_view(example, geometry, spec):
  """NumPy (+ tf.image.resize as the reference resampler) of a train view.

  Returns:
    (image uint8 [S, S, 3], mask [S, S] nearest-resampled, -1 outside the
    image, XYXY boxes [n, 4] clipped, keep [n], clipped [n]).
  """
  s = spec.image_size
  flip, h, w, top, left = (int(geometry.flip), int(geometry.height),
                           int(geometry.width), int(geometry.top),
                           int(geometry.left))
  image, mask = example["image"], example["mask"]
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  resized = tf.image.resize(image, [h, w]).numpy()
  window = resized[top:top + s, left:left + s]
  canvas = np.broadcast_to(np.float32(spec.pad_value), (s, s, 3)).copy()
  canvas[:window.shape[0], :window.shape[1]] = window
  labels = tf.image.resize(mask, [h, w], method="nearest").numpy()[..., 0]
  labels = labels[top:top + s, left:left + s].astype(np.int64)
  label_canvas = np.full((s, s), -1)
  label_canvas[:labels.shape[0], :labels.shape[1]] = labels
  boxes = np.asarray(example["label"]["boxes"], np.float64)
  y1, x1, y2, x2 = boxes.T
  if flip:
    x1, x2 = 1 - x2, 1 - x1
  boxes = np.stack([x1 * w - left, y1 * h - top, x2 * w - left,
                    y2 * h - top], axis=1)
  unclipped = boxes.copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, min(s, w - left))
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, min(s, h - top))
  sides = boxes[:, 2:] - boxes[:, :2]
  keep = np.all(sides >= spec.min_box_size, axis=1) & np.all(sides > 0, 1)
  return (np.clip(np.round(canvas), 0, 255).astype(np.uint8), label_canvas,
          boxes, keep, np.any(boxes != unclipped, axis=1))


def test_train_views_match_numpy_reconstruction(builtin_data_dir, shapes):
  # Scales below and above 1: images get padded and cropped.
  config = tiny_config(builtin_data_dir, scale_range=(0.5, 1.75))
  spec = detection.BoxViewSpec.from_config(config)
  batches = take(detection.make_train_iterator(config, process_index=0,
                                               process_count=1), 3)
  # The stream's slots, from the public pieces its docstring names.
  source = detection.open_box_source(
      config.data, detection.train_parts(config.data), process_index=0,
      process_count=1, drop_remainder=True)
  tags = pipeline.SeedTag
  slots = pipeline.slot_stream(
      source, order_key=pipeline.seed_key(config.seed, tags.DETECTION_ORDER),
      start_position=0).take(24)
  view_key = pipeline.seed_key(config.seed, 0, tags.DETECTION_VIEWS)
  masks = {int(e["index"]): e["mask"] for e in shapes["train"]}
  flips, crops, pads, checked_boxes = 0, 0, 0, 0
  for slot in slots:
    p = int(slot["position"])
    got = {k: v[p % 8] for k, v in batches[p // 8].items()}
    seed = pipeline.view_seed(view_key, slot["position"])
    geometry = detection.sample_geometry(seed, tf.shape(slot["image"]), spec)
    example = tf.nest.map_structure(lambda t: t.numpy(), slot)
    example["mask"] = masks[int(example["label"]["image_id"])]
    image, labels, boxes, keep, clipped = reference_view(example, geometry,
                                                         spec)
    assert np.abs(got["image"].astype(int) - image).max() <= 1
    n = int(keep.sum())
    assert got["valid"].tolist() == [True] * n + [False] * (4 - n)
    np.testing.assert_allclose(got["boxes"][:n], boxes[keep], atol=1e-4)
    classes = example["label"]["classes"]
    assert got["labels"][:n].tolist() == classes[keep].tolist()
    # Each kept box holds its object's (resampled) mask pixels, to the
    # sampling's half pixel.
    for (x1, y1, x2, y2), c, cut in zip(got["boxes"][:n], classes[keep],
                                        clipped[keep]):
      rows, cols = np.nonzero(labels == c + 1)
      if not len(rows):
        continue  # An object thinner than the nearest sampling grid.
      checked_boxes += 1
      assert y1 - 1 <= rows.min() and rows.max() + 1 <= y2 + 1
      assert x1 - 1 <= cols.min() and cols.max() + 1 <= x2 + 1
      if not cut:
        # And spans them, up to thin tips that a downscaling grid misses.
        # (A box cut by the crop need not be tight on what remains.)
        assert rows.min() <= y1 + 2 and rows.max() + 1 >= y2 - 2
        assert cols.min() <= x1 + 2 and cols.max() + 1 >= x2 - 2
    # Dropped boxes had (almost) nothing left in the output.
    for c in classes[~keep]:
      rows, cols = np.nonzero(labels == c + 1)
      assert len(rows) == 0 or min(np.ptp(rows), np.ptp(cols)) <= 1
    flips += bool(geometry.flip)
    crops += int(geometry.height) > 32 or int(geometry.width) > 32
    pads += int(geometry.height) < 32
  assert 0 < flips < 24 and crops and pads and checked_boxes > 24


def test_sample_geometry_ranges():
  spec = detection.BoxViewSpec(image_size=32, scale_range=(0.5, 2.0),
                               flip_prob=0.25)
  shape = tf.constant([30, 45, 3])  # Landscape: width is the longer side.
  rows = []
  for i in range(300):
    g = detection.sample_geometry(tf.constant([7, i], tf.int64), shape, spec)
    rows.append([int(g.flip), int(g.height), int(g.width), int(g.top),
                 int(g.left)])
  flip, height, width, top, left = np.array(rows).T
  assert 0.15 < flip.mean() < 0.35
  assert width.min() >= 16 and width.max() <= 64
  assert width.min() < 20 and width.max() > 60  # The range is covered.
  np.testing.assert_allclose(height, width * 30 / 45, atol=1)
  assert np.all(top <= np.maximum(height - 32, 0))
  assert np.all(left <= np.maximum(width - 32, 0))
  big = width > 40
  assert np.any(left[big] == 0) and np.any(left[big] == width[big] - 32)
  test = detection.test_geometry(shape, 32)
  assert (int(test.height), int(test.width), int(test.top), int(test.left),
          bool(test.flip)) == (21, 32, 0, 0, False)


@pytest.mark.long
def test_shards_are_disjoint_and_cover_the_split(builtin_data_dir, by_image):
  config = tiny_config(builtin_data_dir, scale_range=(1.0, 1.0),
                       flip_prob=0.0)
  config.batch_size = 16
  seen, tested, num_batches = [], [], []
  for p in range(2):
    it = detection.make_train_iterator(config, process_index=p,
                                       process_count=2)
    assert it.num_examples == 128
    epoch = np.concatenate([b["image"] for b in take(it, 16)])
    seen.append([int(source_of(x, by_image)["index"]) for x in epoch])
    test = detection.make_test_iterator(config, batch_size=16,
                                        process_index=p, process_count=2)
    batches = list(test)
    num_batches.append(len(batches))
    tested.append([int(i) for b in batches for i in b["image_id"][
        b["mask"] == 1]])
  for ids, n in ((seen, 256), (tested, 64)):
    assert len(set(ids[0])) == len(ids[0]) == n // 2
    assert not set(ids[0]) & set(ids[1])
    assert set(ids[0]) | set(ids[1]) == set(range(n))
  assert num_batches == [4, 4]


@pytest.mark.long
def test_resume_equals_uninterrupted_stream(builtin_data_dir):
  # 20 examples, 8 per step: epochs end mid-batch.
  config = tiny_config(builtin_data_dir)
  config.data.train_split = "train[:20]"
  make = lambda s, p=0, n=1: detection.make_train_iterator(
      config, start_step=s, process_index=p, process_count=n)
  full = take(make(0), 6)
  for start in (2, 5):
    assert_same_batches(take(make(start), 6 - start), full[start:])
  assert_same_batches(take(make(0), 6), full)  # Deterministic.
  config.batch_size = 4
  second = take(make(0, 1, 2), 5)
  assert_same_batches(take(make(3, 1, 2), 2), second[3:])
  config.seed = 1
  config.batch_size = 8
  other = next(make(0))
  assert not np.array_equal(other["image"], full[0]["image"])


def test_train_sources_interleave_every_part(builtin_data_dir, by_image):
  config = tiny_config(builtin_data_dir, scale_range=(1.0, 1.0),
                       flip_prob=0.0)
  config.data.train_sources = (("detco_shapes", "train[:25%]"),
                               ("detco_shapes", "train[25%:]"))
  config.batch_size = 16
  it = detection.make_train_iterator(config, process_index=0, process_count=1)
  assert it.num_examples == 256
  epoch = np.concatenate([b["image"] for b in take(it, 16)])
  ids = [int(source_of(x, by_image)["index"]) for x in epoch]
  assert sorted(ids) == list(range(256))
  first = np.array(ids[:64])
  assert 4 <= (first < 64).sum() <= 30  # Both parts from the start.


# ---- A COCO-style TFDS dataset: non-square images of coloured boxes.


class DetcoTestBoxes(tfds.core.GeneratorBasedBuilder):
  """Solid rectangles on black, stored in COCO's TFDS layout."""

  VERSION = tfds.core.Version("1.0.0")
  SHAPES = ((24, 40), (40, 24), (30, 30), (36, 20), (20, 48), (32, 32))

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=BOX_CLASSES),
                "is_crowd": np.bool_,
            }),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 12),
            "test": self._generate_examples(100, 7)}

  def _generate_examples(self, first_id, n):
    for i in range(n):
      h, w = self.SHAPES[i % len(self.SHAPES)]
      image = np.zeros((h, w, 3), np.uint8)
      boxes, labels, crowd = [], [], []
      # Up to 3 coloured boxes in separate vertical bands, and a crowd box.
      bands = np.linspace(0, w, 4).astype(int)
      for k in range(i % 4):
        x1, x2 = bands[k] + 1, bands[k + 1] - 1
        y1, y2 = 2 + k, h - 3 - (i % 3)
        image[y1:y2, x1:x2] = COLOURS[k]
        boxes.append(tfds.features.BBox(y1 / h, x1 / w, y2 / h, x2 / w))
        labels.append(k)
        crowd.append(False)
      if i % 2:
        image[0:2, :] = COLOURS[3]
        boxes.append(tfds.features.BBox(0.0, 0.0, 2 / h, 1.0))
        labels.append(3)
        crowd.append(True)
      yield i, {"image": image, "image/id": first_id + i,
                "objects": {"bbox": boxes, "label": labels,
                            "is_crowd": crowd}}


@pytest.fixture(scope="module")
def boxes_config(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_boxes"))
  DetcoTestBoxes(data_dir=data_dir).download_and_prepare()
  config = tiny_config(data_dir)
  config.data.dataset = "detco_test_boxes"
  config.data.box_features = "coco"
  config.data.eval_split = "test"
  config.batch_size = 4
  return config


def colour_extent(image, colour):
  """Rows and columns whose pixels are nearest to `colour` (of COLOURS)."""
  distance = np.abs(image[..., None, :].astype(int) - COLOURS).sum(-1)
  near = (np.argmin(distance, -1) == colour) & (image.max(-1) > 127)
  return np.nonzero(near)


def test_coco_style_test_stream(boxes_config):
  it = detection.make_test_iterator(boxes_config, batch_size=4,
                                    process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 2
  assert detection.class_names(boxes_config) == BOX_CLASSES
  for b in batches:
    for i in np.flatnonzero(b["mask"]):
      index = int(b["image_id"][i]) - 100
      h, w = DetcoTestBoxes.SHAPES[index % 6]
      assert (b["source_height"][i], b["source_width"][i]) == (h, w)
      rh, rw = round(h * 32 / max(h, w)), round(w * 32 / max(h, w))
      assert (b["height"][i], b["width"][i]) == (rh, rw)
      image = b["image"][i]
      # Padded bottom / right with the pad value.
      assert np.all(image[rh:] == (124, 116, 104))
      assert np.all(image[:, rw:] == (124, 116, 104))
      n = index % 4 + index % 2
      assert b["valid"][i].tolist() == [True] * n + [False] * (4 - n)
      assert b["crowd"][i, :n].tolist() == [False] * (index % 4) + [True] * (
          index % 2)
      for (x1, y1, x2, y2), c in zip(b["boxes"][i, :n], b["labels"][i, :n]):
        rows, cols = colour_extent(image, c)
        assert abs(rows.min() - y1) <= 1 and abs(rows.max() + 1 - y2) <= 1
        assert abs(cols.min() - x1) <= 1 and abs(cols.max() + 1 - x2) <= 1
  assert it.num_truncated == 0


def test_coco_style_train_stream(boxes_config):
  config = boxes_config.copy_and_resolve_references()
  config.views.scale_range = (0.6, 1.8)
  config.data.max_boxes = 2
  it = detection.make_train_iterator(config, process_index=0, process_count=1)
  boxes_seen = 0
  for b in take(it, 6):
    assert b["boxes"].shape == (4, 2, 4)
    for i in range(4):
      n = int(b["valid"][i].sum())
      assert b["valid"][i].tolist() == [True] * n + [False] * (2 - n)
      # Crowd boxes never train.
      assert 3 not in b["labels"][i, :n].tolist()
      for (x1, y1, x2, y2), c in zip(b["boxes"][i, :n], b["labels"][i, :n]):
        assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
        rows, cols = colour_extent(b["image"][i], c)
        assert abs(rows.min() - y1) <= 1.5 and abs(rows.max() + 1 - y2) <= 1.5
        assert abs(cols.min() - x1) <= 1.5 and abs(cols.max() + 1 - x2) <= 1.5
        boxes_seen += 1
  assert boxes_seen > 12
  # Examples with 3 boxes lost one to max_boxes = 2, now and then.
  assert it.num_truncated > 0


def test_train_sources_must_share_classes(boxes_config):
  config = boxes_config.copy_and_resolve_references()
  config.data.builtin_image_size = 32
  config.data.train_sources = (("detco_test_boxes", "train"),
                               ("detco_shapes", "train"))
  with pytest.raises(ValueError, match="must share the classes"):
    detection.make_train_iterator(config, process_index=0, process_count=1)
