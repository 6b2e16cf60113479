"""Tests of the built-in offline dataset `detco_shapes`, a real TFDS builder."""

import colorsys
import hashlib
import pathlib
import re
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from detco_jax.data import builtin
from detco_jax.data import scenes

SIZE, NUM_TRAIN, NUM_TEST = 32, 64, 16


def _no_network(*args, **kwargs):
  raise AssertionError(f"detco_shapes tried to open a connection: {args}")


def _prepare_offline(data_dir: pathlib.Path) -> tfds.core.DatasetBuilder:
  """Prepares the small test config with every socket connection refused."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket, "create_connection", _no_network)
    return builtin.prepare(image_size=SIZE, num_train=NUM_TRAIN,
                           num_test=NUM_TEST, data_dir=str(data_dir))


def _read(b: tfds.core.DatasetBuilder, split: str) -> list[dict]:
  return list(tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  b = _prepare_offline(data_dir)
  return data_dir, b, {split: _read(b, split) for split in scenes.SPLITS}


def _files(root: pathlib.Path) -> dict[str, tuple[int, str]]:
  """Relative path -> (mtime_ns, sha256) of every file under `root`."""
  return {
      str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                 hashlib.sha256(p.read_bytes()).hexdigest())
      for p in sorted(root.rglob("*")) if p.is_file()
  }


def test_prepares_offline_with_requested_counts_dtypes_and_shapes(prepared):
  _, b, examples = prepared
  assert b.builder_config.name == f"s{SIZE}_tr{NUM_TRAIN}_te{NUM_TEST}"
  assert b.info.splits["train"].num_examples == NUM_TRAIN
  assert b.info.splits["test"].num_examples == NUM_TEST
  assert len(examples["train"]) == NUM_TRAIN
  assert len(examples["test"]) == NUM_TEST
  assert b.info.features["label"].names == list(builtin.CLASS_NAMES)
  assert len(builtin.CLASS_NAMES) >= 8
  assert b.info.supervised_keys == ("image", "label")
  for split, exs in examples.items():
    # Stored in index order.
    assert [int(ex["index"]) for ex in exs] == list(range(len(exs))), split
    for ex in exs:
      assert ex["image"].shape == (SIZE, SIZE, 3)
      assert ex["image"].dtype == np.uint8
      assert ex["mask"].shape == (SIZE, SIZE, 1)
      assert ex["mask"].dtype == np.uint8
      assert ex["labels"].shape == (scenes.NUM_CLASSES,)
      assert ex["labels"].dtype == np.float32
      assert ex["boxes"].dtype == np.float32
      n = len(ex["box_labels"])
      assert 1 <= n <= scenes.MAX_OBJECTS
      assert ex["boxes"].shape == (n, 4)
      assert 0 <= ex["label"] < scenes.NUM_CLASSES


def _pixel_box(box: np.ndarray) -> tuple[int, int, int, int]:
  """Normalised [ymin, xmin, ymax, xmax] -> pixel rows/cols, max exclusive."""
  return tuple(int(round(float(c) * SIZE)) for c in box)


def _mask_box(region: np.ndarray) -> tuple[int, int, int, int]:
  rows = np.flatnonzero(region.any(axis=1))
  cols = np.flatnonzero(region.any(axis=0))
  return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def test_labels_and_boxes_agree_with_masks(prepared):
  _, _, examples = prepared
  for ex in examples["train"] + examples["test"]:
    mask = ex["mask"][..., 0]
    assert mask.max() <= scenes.NUM_CLASSES
    counts = np.bincount(mask.ravel(), minlength=scenes.NUM_CLASSES + 1)[1:]
    present = np.flatnonzero(counts)
    # `label`: the class with the most visible pixels (lower id on ties).
    assert ex["label"] == np.argmax(counts)
    np.testing.assert_array_equal(ex["labels"], (counts > 0).astype(np.float32))
    # One box per visible object; objects have different classes, so the
    # boxes' classes are exactly the classes in the mask, each once.
    assert sorted(ex["box_labels"].tolist()) == present.tolist()
    for box, c in zip(ex["boxes"], ex["box_labels"]):
      ymin, xmin, ymax, xmax = box
      assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
      # The box encloses exactly its object's visible pixels: no wider, no
      # narrower, since every side of the bounding box touches the object.
      assert _pixel_box(box) == _mask_box(mask == c + 1)


def test_label_is_the_large_main_object():
  # The first object drawn is the main one, and it outsizes every distractor
  # even when they occlude it: `label` is its class in every image.
  size = 64
  fractions = []
  for i in range(300):
    ex = scenes.generate_example("train", i, size)
    main = ex["box_labels"][0]
    assert ex["label"] == main, i
    counts = np.bincount(ex["mask"].ravel(), minlength=scenes.NUM_CLASSES + 1)
    fractions.append(counts[main + 1] / size**2)
    # Its box lies around the centre: crops of most of the image keep it.
    centre = (ex["boxes"][0][:2] + ex["boxes"][0][2:]) / 2
    assert np.all(np.abs(centre - 0.5) < 0.3), (i, centre)
  # At least 0.4 of a disc of radius 0.2 stays visible; unoccluded, mean
  # ~pi * 0.25^2.
  assert min(fractions) >= 0.4 * np.pi * 0.2**2 * 0.9
  assert 0.12 < np.mean(fractions) < 0.25


def test_mask_matches_image_colours(prepared):
  # No anti-aliasing: an object is one colour (shaded, plus pixel noise), so
  # its mask pixels stay close to their median colour. A mask even one pixel
  # off its objects takes in background and more than doubles the spread.
  _, _, examples = prepared
  spreads = []
  for ex in examples["train"]:
    mask, image = ex["mask"][..., 0], ex["image"].astype(np.float32)
    for c in np.unique(mask[mask > 0]):
      inside = image[mask == c]
      spreads.append(np.abs(inside - np.median(inside, axis=0)).mean())
  assert np.median(spreads) < 10.0
  assert np.max(spreads) < 30.0


def test_deterministic_across_data_dirs_and_distinct_across_indices(
    prepared, tmp_path):
  _, _, examples = prepared
  again = _prepare_offline(tmp_path / "other")
  for split in scenes.SPLITS:
    for a, b in zip(examples[split], _read(again, split), strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # The stored example is the generator's output for (split, index).
  direct = scenes.generate_example("test", 3, SIZE)
  for key, value in direct.items():
    np.testing.assert_array_equal(examples["test"][3][key], value, key)
  # Different indices, and the two splits, give different images.
  digests = {hashlib.sha256(ex["image"].tobytes()).hexdigest()
             for split in scenes.SPLITS for ex in examples[split]}
  assert len(digests) == NUM_TRAIN + NUM_TEST


def _object_colours(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean RGB of every visible object and its class, from generated data."""
  colours, classes = [], []
  for index in range(num_examples):
    ex = scenes.generate_example("train", index, SIZE)
    mask = ex["mask"][..., 0]
    for c in ex["box_labels"]:
      colours.append(ex["image"][mask == c + 1].mean(axis=0))
      classes.append(c)
  return np.array(colours), np.array(classes)


def _nearest_mean_accuracy(colours: np.ndarray, classes: np.ndarray) -> float:
  """Held-out accuracy of a nearest-class-mean classifier on colours."""
  half = len(colours) // 2
  means = np.stack([colours[:half][classes[:half] == c].mean(axis=0)
                    for c in range(scenes.NUM_CLASSES)])
  dist = ((colours[half:, None, :] - means[None]) ** 2).sum(-1)
  return float(np.mean(np.argmin(dist, axis=1) == classes[half:]))


def test_colour_does_not_predict_class():
  colours, classes = _object_colours(400)
  assert np.bincount(classes).min() >= 50
  chance = 1 / scenes.NUM_CLASSES
  assert _nearest_mean_accuracy(colours, classes) < chance + 0.12
  # Control: the same classifier does find colour tied to class.
  palette = np.random.default_rng(0).uniform(0, 255, (scenes.NUM_CLASSES, 3))
  tied = palette[classes] + np.random.default_rng(1).normal(
      0, 20, colours.shape)
  assert _nearest_mean_accuracy(tied, classes) > 0.9
  # And every class comes in many hues (sextants of the hue circle).
  for c in range(scenes.NUM_CLASSES):
    hues = {int(colorsys.rgb_to_hsv(*(rgb / 255))[0] * 6) % 6
            for rgb in colours[classes == c]}
    assert len(hues) >= 5, (builtin.CLASS_NAMES[c], hues)


def test_every_class_appears_and_labels_are_balanced(prepared):
  _, _, examples = prepared
  seen = set()
  for ex in examples["train"]:
    seen.update(np.flatnonzero(ex["labels"]).tolist())
  assert seen == set(range(scenes.NUM_CLASSES))
  # `label` (the largest object) is roughly uniform: shapes have equal areas.
  labels = [scenes.generate_example("train", i, SIZE)["label"]
            for i in range(600)]
  counts = np.bincount(labels, minlength=scenes.NUM_CLASSES)
  expected = len(labels) / scenes.NUM_CLASSES
  assert counts.min() > 0.5 * expected and counts.max() < 1.5 * expected


def test_second_prepare_is_a_no_op(prepared, monkeypatch):
  data_dir, _, _ = prepared
  before = _files(data_dir)

  def must_not_run(*args, **kwargs):
    raise AssertionError("the dataset was generated again")

  monkeypatch.setattr(scenes, "generate_example", must_not_run)
  start = time.perf_counter()
  b = _prepare_offline(data_dir)
  assert time.perf_counter() - start < 5.0
  assert _files(data_dir) == before
  assert b.info.splits["train"].num_examples == NUM_TRAIN


def test_building_says_what_where_and_how_long(tmp_path, caplog):
  caplog.set_level("INFO")

  def said():
    lines = [r.getMessage() for r in caplog.records
             if r.pathname.endswith("builtin.py")]
    caplog.clear()
    return lines

  b = builtin.prepare(image_size=16, num_train=8, num_test=4,
                      data_dir=str(tmp_path))
  where = str(b.data_dir)
  assert where.startswith(str(tmp_path))
  building, built = said()
  assert building == (
      "Building the built-in dataset detco_shapes/s16_tr8_te4 (8 train and "
      f"4 test images of 16 px) into {where}; this happens once per data "
      "dir.")
  assert re.fullmatch(r"Built detco_shapes/s16_tr8_te4 in \d+\.\d s; "
                      rf"cached in {re.escape(where)}\.", built), built
  # Cached: nothing to say.
  builtin.prepare(image_size=16, num_train=8, num_test=4,
                  data_dir=str(tmp_path))
  assert not said()


def test_config_names_and_cache_dirs(tmp_path):
  small = builtin.builder(24, 10, 5, data_dir=str(tmp_path))
  other = builtin.builder(32, 10, 5, data_dir=str(tmp_path))
  assert small.builder_config.name == "s24_tr10_te5"
  assert small.builder_config.image_size == 24
  assert small.data_dir != other.data_dir
  # Any such name works through TFDS's own entry points.
  by_name = tfds.builder("detco_shapes/s24_tr10_te5", data_dir=str(tmp_path))
  assert by_name.builder_config is small.builder_config
  # The default config is the demo's.
  default = tfds.builder("detco_shapes", data_dir=str(tmp_path))
  assert default.builder_config.name == "s64_tr10000_te2000"
  with pytest.raises(ValueError):
    builtin.builder(8, 10, 5, data_dir=str(tmp_path))
  with pytest.raises(ValueError):
    scenes.generate_example("validation", 0)
