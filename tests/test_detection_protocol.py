"""DetCo's detectron2 RetinaNet protocol: config, views, groups, programs.

detectron2's definitions are re-stated from its source, each test naming
the file and function it re-states.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import jobcheck
from configs import detco as detco_config
from configs import detection as detection_config
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import aspect_groups
from detco_jax.data import detection as detection_data
from detco_jax.eval import coco
from detco_jax.eval import detection
from detco_jax.models import retinanet
from test_detection_data import DetcoTestBoxes
from test_pipeline import take

# ---- The config and its docstring table.

# A row: "  entry[, entry] = value", then the source after 2+ spaces.
ROW = re.compile(r"^  ([a-z_.]+(?:, [a-z_.]+)*) = (.+?)(?:\s{2,}\S.*)?$")


def table_rows():
  """(entry, value) of every row of configs/detection.py's table."""
  rows = []
  for line in detection_config.__doc__.splitlines():
    match = ROW.match(line)
    if match and match.group(1) != "entry":  # Not the header.
      entries, value = match.groups()
      # The values are Python literals and quotients of them.
      value = eval(value, {"__builtins__": {}})  # pylint: disable=eval-used
      entries = entries.split(", ")
      values = value if len(entries) > 1 else (value,)
      rows += list(zip(entries, values, strict=True))
  return rows


def lookup(config, entry):
  for key in entry.split("."):
    config = config[key]
  return config


def test_the_default_config_is_the_docstrings_table():
  rows = table_rows()
  assert len(rows) >= 40
  config = detection_config.get_config()
  for entry, value in rows:
    got = lookup(config, entry)
    if isinstance(value, tuple):
      np.testing.assert_allclose(got, value, rtol=1e-12, err_msg=entry)
    else:
      assert got == value and type(got) is type(value), (entry, got, value)
  # What the table says of detectron2's 1x, in its own terms.
  assert detection.total_steps(config) == 90_000
  assert detection.warmup_steps(config) == 1000


def test_square_is_the_model_gardens_recipe_at_any_scale():
  square = detection_config.get_config("square")
  assert square.views.resize == "longest_edge"
  assert (square.model.norm, square.model.fpn_norm) == ("gn", "none")
  assert square.model.anchor_offset == 0.5
  assert square.loss.normalizer_momentum == 0.0
  assert not square.eval.clip_after_nms and not square.eval.source_pixels
  assert square.eval.precise_bn_batches == 0 and not square.data.filter_empty
  assert detection.padded_shapes(square) == ((1024, 1024),)
  demo = detection_config.get_config("demo,square")
  assert detection.padded_shapes(demo) == ((32, 32),)
  # Only the protocol's entries change: the demo's scale stays.
  assert demo.model.anchor_sizes == (4, 8, 16, 32)


def test_padded_shapes():
  assert detection.padded_shapes(detection_config.get_config()) == (
      (800, 1344), (1344, 800))
  demo = detection_config.get_config("demo")
  assert demo.views.min_sizes == (26, 27, 28, 29, 31, 32)
  # Square images: one program.
  assert detection.padded_shapes(demo) == ((32, 32),)


# ---- detectron2's resize and groups.


def d2_output_shape(oldh, oldw, short_edge_length, max_size):
  """detectron2/data/transforms/augmentation_impl.py,
  ResizeShortestEdge.get_output_shape."""
  h, w = oldh, oldw
  size = short_edge_length * 1.0
  scale = size / min(h, w)
  if h < w:
    newh, neww = size, scale * w
  else:
    newh, neww = scale * h, size
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  neww = int(neww + 0.5)
  newh = int(newh + 0.5)
  return (newh, neww)


def d2_bucket(w, h):
  """detectron2/data/common.py, AspectRatioGroupedDataset.__iter__."""
  return 0 if w > h else 1


def test_shortest_edge_size_is_detectron2s():
  rng = np.random.default_rng(0)
  sizes = [(480, 640), (640, 480), (500, 500), (427, 640), (100, 2000),
           (2000, 100), (1, 1333), (800, 1333), (801, 1334)]
  sizes += [tuple(s) for s in rng.integers(1, 3000, (300, 2))]
  for h, w in sizes:
    for short in (640, 704, 800):
      got = detection_data.shortest_edge_size(
          tf.constant([h, w, 3]), tf.constant(short), 1333)
      assert tuple(int(x) for x in got) == d2_output_shape(h, w, short,
                                                           1333), (h, w)
      assert d2_bucket(w, h) == int(aspect_groups.group_of(h, w))


def test_shortest_edge_render_is_pils_bilinear_resize():
  """detectron2/data/transforms/transform.py ResizeTransform.apply_image:
  PIL's bilinear resize of uint8 images, which antialiases when shrinking."""
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (61, 93, 3), np.uint8)
  spec = detection_data.BoxViewSpec(resize="shortest_edge", min_sizes=(40,),
                                    test_min_size=40, max_size=64,
                                    size_divisibility=8)
  geometry = detection_data.shortest_edge_geometry(
      tf.shape(image), 40, 64, tf.constant(False))
  h, w = int(geometry.height), int(geometry.width)
  assert (h, w) == d2_output_shape(61, 93, 40, 64) == (40, 61)
  out = detection_data.render(tf.constant(image), geometry, spec,
                              spec.padded_shape(aspect_groups.LANDSCAPE))
  assert out.shape == (40, 64, 3)
  pil = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  diff = np.abs(out.numpy()[:h, :w].astype(int) - pil.astype(int))
  assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
  assert np.all(out.numpy()[:, w:] == detection_data.PAD_VALUE)


# ---- Batches of one group each, on images of both orientations.


@pytest.fixture(scope="module")
def protocol_boxes(tmp_path_factory):
  """The protocol on the COCO-style fake set: 12 train / 7 test images of
  six shapes, landscape and portrait (test_detection_data.py)."""
  data_dir = str(tmp_path_factory.mktemp("tfds_protocol_boxes"))
  DetcoTestBoxes(data_dir=data_dir).download_and_prepare()
  c = detection_config.get_config("tiny")
  c.data.data_dir = data_dir
  c.data.dataset = "detco_test_boxes"
  c.data.box_features = "coco"
  c.data.eval_split = "test"
  c.views.min_sizes, c.views.test_min_size = (16, 20, 24), 24
  c.views.max_size, c.views.size_divisibility = 40, 8
  c.batch_size = 2
  c.eval_batch_size = 2
  return c


SHAPES = {aspect_groups.LANDSCAPE: (24, 40), aspect_groups.PORTRAIT: (40, 24)}


def real_extent(image):
  """(rows, cols) of the image inside the padding (pad value all around)."""
  inside = np.any(image != detection_data.PAD_VALUE, axis=-1)
  return (inside.any(1).nonzero()[0].max() + 1,
          inside.any(0).nonzero()[0].max() + 1)


def test_groups_are_counted_and_empty_images_left_out(protocol_boxes):
  # Train image i has i % 4 trainable boxes (crowd boxes do not count):
  # images 0, 4 and 8 have none. Shapes cycle through DetcoTestBoxes.SHAPES.
  counts, left_out = detection_data.count_train_groups(
      protocol_boxes, process_index=0, process_count=1)
  assert counts.tolist() == [2, 7] and left_out == 3
  config = protocol_boxes.copy_and_resolve_references()
  config.data.filter_empty = False
  counts, left_out = detection_data.count_train_groups(
      config, process_index=0, process_count=1)
  assert counts.tolist() == [4, 8] and left_out == 0
  counts, left_out = detection_data.count_test_groups(
      protocol_boxes, process_index=0, process_count=1)
  assert counts.tolist() == [3, 4] and left_out == 0


def test_train_batches_are_one_group_and_resume_exactly(protocol_boxes):
  it = detection_data.make_train_iterator(protocol_boxes, process_index=0,
                                          process_count=1)
  assert it.num_examples == 9
  batches = take(it, 24)
  share = 2 / 9
  key = detection_data.pipeline.seed_key(
      protocol_boxes.seed, detection_data.pipeline.SeedTag.DETECTION_GROUPS)
  groups = list(aspect_groups.step_groups(key, share, 0).take(24)
                .as_numpy_iterator())
  assert set(groups) == {0, 1}
  for group, b in zip(groups, batches):
    assert b["image"].shape[1:3] == SHAPES[group]
    for image, valid in zip(b["image"], b["valid"]):
      h, w = real_extent(image)
      assert (w > h) == (group == aspect_groups.LANDSCAPE)
      # Short side from (16, 20, 24), long at most 40.
      assert min(h, w) in (16, 20, 24) or max(h, w) == 40, (h, w)
      assert valid.any()  # Images without a box do not train.
  np.testing.assert_array_equal(
      aspect_groups.steps_per_group(key, share, 24),
      [groups.count(0), groups.count(1)])
  resumed = take(detection_data.make_train_iterator(
      protocol_boxes, start_step=9, process_index=0, process_count=1), 15)
  for a, b in zip(batches[9:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_no_trainable_image_is_one_clear_error(protocol_boxes):
  none = aspect_groups.GroupCounts(np.zeros((1, 2), np.int64))
  with pytest.raises(detection_data.sources.DatasetUnavailableError,
                     match="No training image .* has a box to train on"):
    detection_data.make_train_iterator(protocol_boxes, process_index=0,
                                       process_count=1, group_counts=none)


def test_step_groups_follow_the_share_across_blocks():
  key = 12345
  assert set(aspect_groups.step_groups(key, 0.0, 0).take(50)
             .as_numpy_iterator()) == {aspect_groups.PORTRAIT}
  assert set(aspect_groups.step_groups(key, 1.0, 0).take(50)
             .as_numpy_iterator()) == {aspect_groups.LANDSCAPE}
  all_groups = np.array(list(aspect_groups.step_groups(key, 0.7, 0)
                             .take(3000).as_numpy_iterator()))
  assert abs((all_groups == 0).mean() - 0.7) < 0.03
  later = np.array(list(aspect_groups.step_groups(key, 0.7, 2500)
                        .take(500).as_numpy_iterator()))
  np.testing.assert_array_equal(later, all_groups[2500:])
  for steps in (0, 1, 1023, 1024, 2500, 3000):
    np.testing.assert_array_equal(
        aspect_groups.steps_per_group(key, 0.7, steps),
        [(all_groups[:steps] == 0).sum(), (all_groups[:steps] == 1).sum()])


def test_test_pass_goes_group_by_group(protocol_boxes):
  it = detection_data.make_test_iterator(protocol_boxes, batch_size=2,
                                         process_index=0, process_count=1)
  batches = list(it)
  # 3 landscape images in 2 batches, then 4 portrait ones in 2.
  assert it.num_batches == len(batches) == 4
  assert [b["image"].shape[1:3] for b in batches] == [
      SHAPES[0], SHAPES[0], SHAPES[1], SHAPES[1]]
  ids = np.concatenate([b["image_id"][b["mask"] > 0] for b in batches])
  assert sorted(ids.tolist()) == list(range(100, 107))
  for b in batches:
    for i in np.flatnonzero(b["mask"]):
      h, w = DetcoTestBoxes.SHAPES[(int(b["image_id"][i]) - 100) % 6]
      assert (b["source_height"][i], b["source_width"][i]) == (h, w)
      assert (b["height"][i], b["width"][i]) == d2_output_shape(h, w, 24, 40)
      assert real_extent(b["image"][i]) == (b["height"][i], b["width"][i])
  # Two processes: the same number of batches of each group on both.
  counts = aspect_groups.GroupCounts(np.stack([
      detection_data.count_test_groups(protocol_boxes, process_index=i,
                                       process_count=2)[0]
      for i in range(2)]))
  per_process = [list(detection_data.make_test_iterator(
      protocol_boxes, batch_size=2, process_index=i, process_count=2,
      group_counts=counts)) for i in range(2)]
  assert [[b["image"].shape[1:3] for b in p] for p in per_process] == [
      [SHAPES[0], SHAPES[0], SHAPES[1], SHAPES[1]]] * 2
  ids = np.concatenate([b["image_id"][b["mask"] > 0]
                        for p in per_process for b in p])
  assert sorted(ids.tolist()) == list(range(100, 107))
  with pytest.raises(ValueError, match="need group_counts"):
    detection_data.make_test_iterator(protocol_boxes, batch_size=2,
                                      process_index=0, process_count=2)


# ---- The detector: FPN norm, programs, precise BN.


def test_fpn_syncbn_follows_the_lateral_and_output_convs():
  """detectron2/modeling/backbone/fpn.py FPN.__init__: with a norm, each
  lateral and output conv has no bias and a norm after it; the
  LastLevelP6P7 convs have neither."""
  maps = {f"res{l}": jnp.ones((2, 64 // 2**l, 64 // 2**l, 8)) for l in
          (3, 4, 5)}
  fpn = retinanet.FPN(16, (3, 4, 5), (6, 7), norm="bn")
  variables = fpn.init(jax.random.key(0), maps)
  params = variables["params"]
  for level in (3, 4, 5):
    for name in (f"fpn_lateral{level}", f"fpn_output{level}"):
      assert set(params[name]) == {"kernel"}
      assert set(params[f"{name}_norm"]) == {"scale", "bias"}
      assert set(variables["batch_stats"][f"{name}_norm"]) == {"mean", "var"}
  assert set(params["p6"]) == set(params["p7"]) == {"kernel", "bias"}
  x = {k: jax.random.normal(jax.random.key(1), v.shape) for k, v in
       maps.items()}
  out, updated = fpn.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(updated["batch_stats"]["fpn_output3_norm"]["mean"],
                         0)
  # Evaluation normalises with the running statistics.
  evaluated = fpn.apply({**variables, **updated}, x, train=False)
  assert not np.allclose(out[3], evaluated[3])
  with pytest.raises(ValueError, match="FPN norm"):
    retinanet.FPN(16, norm="gn").init(jax.random.key(0), maps)


def two_shape_config():
  c = detection_config.get_config("tiny")
  c.views.min_sizes, c.views.test_min_size = (24, 32), 32
  c.views.max_size = 48
  return c


def batch_of(shape, n=8):
  rng = np.random.default_rng(shape[0])
  boxes = np.zeros((n, 4, 4), np.float32)
  boxes[:, 0] = [2, 3, 18, 20]
  return {"image": rng.integers(0, 256, (n, *shape, 3), np.uint8),
          "boxes": boxes, "labels": np.where(np.arange(4) == 0, 1, -1)[
              None].repeat(n, 0).astype(np.int32),
          "valid": (np.arange(4) == 0)[None].repeat(n, 0)}


def tiny_detector(config):
  """(mesh, backbone, detector, fresh state) on an untrained tiny ResNet."""
  mesh = sharding.make_mesh()
  backbone = pretrained.random_init(detco_config.get_config("tiny"), 0, mesh)
  detector = detection.build(config, backbone, 3, mesh)
  state = detection.create_state(
      detector.model, backbone, detector.tx, detector.anchors, mesh, 0,
      detection.initial_loss_normalizer(config))
  return mesh, backbone, detector, state


@pytest.mark.long
def test_two_train_and_two_test_programs_and_precise_bn():
  config = two_shape_config()
  assert detection.padded_shapes(config) == ((32, 48), (48, 32))
  mesh, backbone, detector, state = tiny_detector(config)
  shapes = [(32, 48), (48, 32), (32, 48), (48, 32), (32, 48)]
  for shape in shapes:
    batch = sharding.host_to_global(batch_of(shape), mesh)
    state, metrics = detector.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
  assert detector.train_step._cache_size() == 2  # pylint: disable=protected-access
  for shape in shapes:
    images = sharding.host_to_global(batch_of(shape)["image"], mesh)
    sizes = sharding.host_to_global(np.full((8, 2), 24, np.int32), mesh)
    out = detector.predict(state, images, sizes)
    assert out["boxes"].shape == (8, config.eval.max_detections, 4)
  assert detector.predict._cache_size() == 2  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="not one of the run's padded shapes"):
    detector.train_step(state, sharding.host_to_global(batch_of((40, 40)),
                                                       mesh))

  # Precise BN: the running statistics become the batches' mean ones.
  measure = detection.make_measure_bn(detector.model, backbone, mesh)
  batches = [batch_of(s) for s in shapes[:3]]
  measured = [measure(state, sharding.host_to_global(b["image"], mesh))
              for b in batches]
  precise, read = detection.precise_bn(measure, state, iter(batches), 10,
                                       mesh)
  assert read == 3
  jax.tree.map(lambda got, *each: np.testing.assert_allclose(
      got, np.mean(each, 0), rtol=1e-5, atol=1e-6),
               precise.batch_stats, *measured)
  fpn = precise.batch_stats["fpn"]["fpn_output3_norm"]["var"]
  assert not np.allclose(fpn, state.batch_stats["fpn"]["fpn_output3_norm"][
      "var"])


@pytest.mark.long
def test_precise_bn_keeps_frozen_statistics_exactly():
  config = two_shape_config()
  config.model.frozen_stages = 2  # The stem and res2 keep their BN.
  mesh, backbone, detector, state = tiny_detector(config)
  measure = detection.make_measure_bn(detector.model, backbone, mesh)
  precise, _ = detection.precise_bn(
      measure, state, iter([batch_of((32, 48)), batch_of((48, 32))]), 2, mesh)
  before = state.batch_stats[retinanet.BACKBONE]
  after = precise.batch_stats[retinanet.BACKBONE]
  frozen = [k for k in before if not k.startswith("layer")
            or k.startswith("layer1_")]
  assert frozen
  for key in before:
    same = jax.tree.leaves(jax.tree.map(np.array_equal, before[key],
                                        after[key]))
    assert all(same) == (key in frozen), key


# ---- The job, end to end on both groups.


@pytest.mark.long
def test_the_job_trains_both_groups_resumes_and_scores_source_pixels(
    protocol_boxes, tiny_pretrain_workdir, tmp_path):
  config = protocol_boxes.copy_and_resolve_references()
  config.pretrained = tiny_pretrain_workdir
  config.batch_size = config.eval_batch_size = 8  # One image per device.
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: detection.job(config, workdir), tmp_path, stop_k=3,
      nan_k=5)
  assert straight.results["eval_images"] == 7
  # The ground truth is in the dataset's pixels: the source sizes.
  gt_path, _ = coco.paths(str(tmp_path / "straight"), "test")
  gt = json.loads(gt_path.read_text())
  sizes = {(im["height"], im["width"]) for im in gt["images"]}
  assert sizes == set(DetcoTestBoxes.SHAPES)


def test_unreadable_images_are_left_out_of_both_groups_and_counted():
  def png(h, w):
    return tf.io.encode_png(tf.zeros([h, w, 3], tf.uint8)).numpy()

  def jpeg(h, w):
    return tf.io.encode_jpeg(tf.zeros([h, w, 3], tf.uint8)).numpy()

  encoded = [jpeg(20, 30), png(30, 20), b"not an image", jpeg(25, 25),
             jpeg(10, 40)[:40]]  # The last: a truncated header.
  source = detection_data.sources.Source(
      name="fake", split="train", num_examples=len(encoded),
      split_size=len(encoded), num_classes=1, process_index=0,
      process_count=1,
      _records=lambda seed: tf.data.Dataset.from_tensor_slices(encoded),
      _decode=lambda r: {})

  def meta(record):
    size = aspect_groups.encoded_image_size(record)
    return {"height": size[0], "width": size[1], "boxes": tf.constant(1)}

  counts, left_out = aspect_groups.count_groups(source, meta)
  assert counts.tolist() == [1, 2] and left_out == 2
  portrait = aspect_groups.group_source(source, meta, aspect_groups.PORTRAIT,
                                        2)
  kept = list(portrait.records(None).as_numpy_iterator())
  assert kept == [encoded[1], encoded[3]]
