"""Tests of the dense probe (detco_jax/eval/dense.py, data/segmentation.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from configs import dense_probe
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import builtin
from detco_jax.data import segmentation
from detco_jax.eval import dense
from tests import jobcheck

STAGES = ("res2", "res3", "res4", "res5")


def tiny_config(data_dir, pretrain_workdir=None, **overrides):
  c = dense_probe.get_config("tiny")
  c.data.data_dir = data_dir
  c.pretrained = pretrain_workdir
  c.update(overrides)
  return c


# ----------------------------------------------------------------------------
# Metrics.


def reference_metrics(labels, predictions, k):
  """Per-class IoU, mIoU and accuracy by explicit counting, in NumPy."""
  valid = (labels >= 0) & (labels < k)
  l, p = labels[valid], predictions[valid]
  confusion = np.zeros((k, k), np.int64)
  for t, q in zip(l, p):
    confusion[t, q] += 1
  ious = []
  for c in range(k):
    tp = np.sum((l == c) & (p == c))
    fp = np.sum((l != c) & (p == c))
    fn = np.sum((l == c) & (p != c))
    ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
  present = [x for x in ious if not np.isnan(x)]
  return confusion, np.array(ious), np.mean(present), np.mean(l == p)


def test_confusion_and_miou_match_numpy_reference():
  k = 6
  rng = np.random.default_rng(0)
  shape = (16, 9, 7)  # 16 examples: split over the 8 devices below.
  # Class 4 is never a label but is predicted (IoU 0, counted); class 5 is
  # neither (absent: left out of the mean); 255 and -1 are ignored.
  labels = rng.choice([0, 1, 2, 3, 255], size=shape, p=[.3, .3, .2, .1, .1])
  labels[0, 0, :3] = -1
  predictions = np.where(rng.random(shape) < 0.6, labels,
                         rng.integers(0, 5, shape)) % 5
  ref_confusion, ref_iou, ref_miou, ref_acc = reference_metrics(
      labels, predictions, k)

  mesh = sharding.make_mesh()
  data = sharding.batch_sharded(mesh)
  compute = jax.jit(
      lambda l, p: dense.confusion_matrix(l, p, (l >= 0) & (l < k), k),
      in_shardings=(data, data), out_shardings=sharding.replicated(mesh))
  confusion = np.asarray(compute(jnp.asarray(labels, jnp.int32),
                                 jnp.asarray(predictions, jnp.int32)))
  np.testing.assert_array_equal(confusion, ref_confusion)

  metrics = dense.segmentation_metrics(confusion)
  np.testing.assert_allclose(metrics["iou"], ref_iou, rtol=1e-12)
  assert np.isnan(metrics["iou"][5]) and metrics["iou"][4] == 0.0
  assert metrics["miou"] == pytest.approx(ref_miou, rel=1e-12)
  assert metrics["pixel_accuracy"] == pytest.approx(ref_acc, rel=1e-12)
  assert np.isnan(dense.segmentation_metrics(np.zeros((3, 3)))["miou"])


# ----------------------------------------------------------------------------
# Data.


def blocks_example(height=40, width=56, block=8, classes=6, seed=0):
  """A mask of `block`-px squares and an image whose colour encodes it."""
  rng = np.random.default_rng(seed)
  cells = rng.integers(0, classes, (height // block, width // block))
  mask = np.kron(cells, np.ones((block, block), np.int64)).astype(np.uint8)
  lut = np.array([[40 * c + 10, 230 - 37 * c, (90 * c) % 251]
                  for c in range(classes)], np.uint8)
  return lut[mask], mask, lut


def agreement(image, mask, lut):
  """Fraction of pixels whose colour is exactly their mask class's colour."""
  return np.mean(np.all(image == lut[mask], axis=-1))


def test_random_view_cuts_image_and_mask_alike():
  image, mask, lut = blocks_example()
  scores, mirrored = [], []
  for i in range(24):
    view, labels = segmentation.random_view(
        tf.constant(image), tf.constant(mask[..., None]),
        tf.constant([7, i], tf.int64), 24, area=(0.3, 1.0))
    view, labels = view.numpy(), labels.numpy()
    assert view.shape == (24, 24, 3) and labels.shape == (24, 24)
    assert view.dtype == labels.dtype == np.uint8
    scores.append(agreement(view, labels, lut))
    mirrored.append(agreement(view, labels[:, ::-1], lut))
  # Away from block edges the bilinear image pixel is exactly its class's
  # colour; a misaligned (here: mirrored) mask would break that.
  assert min(scores) > 0.7, scores
  assert np.mean(mirrored) < np.mean(scores) - 0.2


def test_center_view_cuts_image_and_mask_alike():
  image, mask, lut = blocks_example(height=48, width=72)
  view, labels = segmentation.center_view(
      tf.constant(image), tf.constant(mask[..., None]), resize=40, crop=32)
  view, labels = view.numpy(), labels.numpy()
  assert view.shape == (32, 32, 3) and labels.shape == (32, 32)
  # The centre crop of the 40 x 60 resize: a 32 x 32 window at (4, 14), that
  # is source pixels (4.8.., 16.8..) on the 48 x 72 grid, scale 1.2.
  rows = np.floor((np.arange(32) + 4 + 0.5) * 1.2).astype(int)
  cols = np.floor((np.arange(32) + 14 + 0.5) * 1.2).astype(int)
  np.testing.assert_array_equal(labels, mask[rows][:, cols])
  assert agreement(view, labels, lut) > 0.6


def test_remap_mask_offsets_and_ignores():
  raw = tf.constant([[[0], [1], [2], [3], [4]]], tf.uint8)
  np.testing.assert_array_equal(
      segmentation.remap_mask(raw, -1, 3).numpy()[0, :, 0],
      [255, 0, 1, 2, 255])


@pytest.mark.long
def test_streams_on_builtin(builtin_data_dir):
  config = tiny_config(builtin_data_dir)
  assert config.data.class_names == ("background",) + builtin.CLASS_NAMES
  train = segmentation.make_train_iterator(config, process_index=0,
                                           process_count=1)
  batch = next(train)
  assert set(batch) == {"image", "mask"}
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["mask"].shape == (16, 32, 32)
  assert batch["image"].dtype == batch["mask"].dtype == np.uint8
  assert batch["mask"].max() <= 10 and len(np.unique(batch["mask"])) > 2

  test = list(segmentation.make_test_iterator(
      config, batch_size=48, process_index=0, process_count=1))
  assert len(test) == 2
  np.testing.assert_array_equal(test[1]["valid"], [1] * 16 + [0] * 32)
  assert np.all(test[0]["valid"] == 1)
  assert np.all(test[1]["mask"][16:] == segmentation.IGNORE)
  assert np.all(test[1]["image"][16:] == 0)
  # The stream's first example is the first record, both parts cut alike.
  raw = next(iter(builtin.prepare(32, 256, 64, builtin_data_dir).as_dataset(
      split="test")))
  image, mask = segmentation.center_view(raw["image"], raw["mask"], 37, 32)
  np.testing.assert_array_equal(test[0]["image"][0], image.numpy())
  np.testing.assert_array_equal(test[0]["mask"][0], mask.numpy())

  # Two processes: each shard of 32 in two batches of 24, the same count.
  shards = [list(segmentation.make_test_iterator(
      config, batch_size=48, process_index=p, process_count=2))
            for p in range(2)]
  assert [len(s) for s in shards] == [2, 2]
  assert [sum(int(b["valid"].sum()) for b in s) for s in shards] == [32, 32]


def test_foreground_background_merges_the_classes(builtin_data_dir):
  config = tiny_config(builtin_data_dir)
  assert segmentation.probe_classes(config.data) == (
      11, ("background",) + builtin.CLASS_NAMES)
  per_class = list(segmentation.make_test_iterator(
      config, batch_size=48, process_index=0, process_count=1))
  config = dense_probe.get_config("tiny,fgbg")
  config.data.data_dir = builtin_data_dir
  assert segmentation.probe_classes(config.data) == (
      2, ("background", "foreground"))
  merged = list(segmentation.make_test_iterator(
      config, batch_size=48, process_index=0, process_count=1))
  for a, b in zip(per_class, merged):
    np.testing.assert_array_equal(a["image"], b["image"])
    want = np.where(a["mask"] == segmentation.IGNORE, segmentation.IGNORE,
                    (a["mask"] > 0).astype(np.uint8))
    np.testing.assert_array_equal(b["mask"], want)
  assert set(np.unique(merged[0]["mask"])) == {0, 1}
  # The stored mask's other values stay ignored; a chosen class is the
  # background.
  raw = tf.constant([[[0], [3], [7], [200]]], tf.uint8)
  np.testing.assert_array_equal(
      segmentation.remap_mask(raw, 0, 8, background=3).numpy().ravel(),
      [1, 0, 1, segmentation.IGNORE])


# ----------------------------------------------------------------------------
# The job.


def read_results(workdir):
  with open(os.path.join(workdir, dense.RESULTS_FILE)) as f:
    return json.load(f)


@pytest.mark.long
def test_end_to_end_resumes_and_refuses_another_backbone(
    tiny_pretrain_workdir, builtin_data_dir, tmp_path):
  workdir = str(tmp_path / "dense")
  config = tiny_config(builtin_data_dir, tiny_pretrain_workdir, total_steps=2)
  first = dense.run(config, workdir)
  assert read_results(workdir) == json.loads(json.dumps(first))
  assert first["start_step"] == 0 and first["steps_trained"] == 2
  assert first["eval_examples"] == 64 and first["pretrained_step"] == 6
  assert first["dataset"] == "detco_shapes"
  assert set(first["stages"]) == set(STAGES)
  for r in first["stages"].values():
    assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_accuracy"] <= 1.0
    assert set(r["iou"]) == set(config.data.class_names)

  # Longer schedule, same workdir: continues from step 2.
  config.total_steps = 4
  second = dense.run(config, workdir)
  assert second["start_step"] == 2 and second["steps_trained"] == 4
  assert read_results(workdir)["steps_trained"] == 4
  # Finished: tested again only, with the same figures.
  third = dense.run(config, workdir)
  assert third["start_step"] == 4 and third["stages"] == second["stages"]

  config.random_init = True
  with pytest.raises(ValueError, match="another --workdir"):
    dense.run(config, workdir)

  # Foreground/background: two classes, named so in the results.
  config.random_init, config.total_steps = False, 2
  config.data.foreground_background = True
  fgbg = dense.run(config, str(tmp_path / "fgbg"))
  assert fgbg["num_classes"] == 2
  for r in fgbg["stages"].values():
    assert set(r["iou"]) == {"background", "foreground"}


@pytest.mark.long
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(
    tiny_pretrain_workdir, builtin_data_dir, tmp_path):
  """Stopped before step 4 (saved at 3), or NaN at step 5 (resumed from 4)."""
  config = tiny_config(builtin_data_dir, tiny_pretrain_workdir, total_steps=6)
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: dense.job(config, workdir), tmp_path, stop_k=2,
      nan_k=5)
  assert straight.results["steps_trained"] == 6


def test_backbone_stays_frozen(tiny_pretrain_workdir, builtin_data_dir):
  config = tiny_config(builtin_data_dir, tiny_pretrain_workdir)
  mesh = sharding.make_mesh()
  backbone = pretrained.load(tiny_pretrain_workdir, mesh=mesh)
  before = jax.device_get(backbone.variables)
  # The same optimiser and shapes as the job's: the compiled step is cached.
  tx = dense.make_optimizer(config, 2)
  stats = {s: {"mean": np.zeros(c, np.float32), "inv_std": np.ones(
      c, np.float32)} for s, c in backbone.channels.items()}
  state = jax.device_put(
      dense.init_state(stats, backbone.channels, 11, tx),
      sharding.replicated(mesh))
  step = dense.make_train_step(backbone, tx, 11, 32, mesh)
  host = next(segmentation.make_train_iterator(config))
  batch = sharding.host_to_global(host, mesh)
  initial = jax.device_get(state.params)
  for _ in range(2):
    state, _ = step(state, backbone.variables, batch)

  # The probe learns; only its own 4 x (kernel, bias) are in its state.
  assert len(jax.tree.leaves(state.params)) == 8
  assert not np.allclose(state.params["res5"]["kernel"],
                         initial["res5"]["kernel"])
  # The backbone's params and BN statistics are bit for bit unchanged (and
  # were not donated: still readable).
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(backbone.variables), before)
  # And no gradient reaches them.
  def loss(variables):
    logits = dense.pixel_logits(backbone, variables, state.params,
                                state.stats, batch["image"], 32, 11)
    return sum(dense.pixel_loss(l, batch["mask"], 11)[0]
               for l in logits.values())
  grads = jax.jit(jax.grad(loss))(backbone.variables)
  assert all(not np.any(g) for g in jax.tree.leaves(jax.device_get(grads)))
