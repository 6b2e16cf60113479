"""The detection-transfer job (detco_jax/eval/detection.py) in real loops."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from configs import detection as detection_config
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import detection as detection_data
from detco_jax.eval import coco
from detco_jax.eval import detection
from tests import jobcheck


@pytest.fixture
def config(tiny_pretrain_workdir, builtin_data_dir):
  c = detection_config.get_config("tiny")
  c.pretrained = tiny_pretrain_workdir
  c.data.data_dir = builtin_data_dir
  return c


def recomputed_ap(workdir: str, split: str) -> list[float]:
  """pycocotools' six box APs from the two files the job wrote."""
  gt_path, dets_path = coco.paths(workdir, split)
  gt = coco_api.COCO(str(gt_path))
  evaluator = cocoeval.COCOeval(gt, gt.loadRes(str(dets_path)), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  return [float(v) for v in evaluator.stats[:6]]


@pytest.mark.long
def test_overfits_16_images_and_reports_pycocotools_ap(config, tmp_path):
  # 16 training images, seen without augmentation, are also the test set.
  config.data.train_split = config.data.eval_split = "train[:16]"
  config.views.min_sizes, config.views.flip_prob = (32,), 0.0
  # The GN head fits 16 images in 200 steps; detectron2's, without a norm,
  # starts slower than this budget (docs/results.md).
  config.model.norm = "gn"
  config.batch_size = config.eval_batch_size = 16
  config.total_steps, config.warmup_steps, config.lr = 200, 20, 0.05
  config.log_every, config.checkpoint_every = 50, 1000
  workdir = str(tmp_path / "fit")
  results = detection.run(config, workdir)

  assert results["AP50"] >= 0.9, results
  assert results["steps"] == 200 and results["eval_images"] == 16
  saved = json.load(open(os.path.join(workdir, detection.RESULTS_FILE)))
  assert saved == json.loads(json.dumps(results))
  # The AP the job reports is pycocotools' on the files it wrote.
  names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
  np.testing.assert_allclose([results[n] for n in names],
                             recomputed_ap(workdir, "train[:16]"))
  dets = json.load(open(coco.paths(workdir, "train[:16]")[1]))
  assert dets and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
  picture = Image.open(os.path.join(workdir, detection.PICTURE_FILE))
  assert picture.size[0] > 2 * 32 and picture.size[1] > 2 * 32


@pytest.mark.long
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(config,
                                                                tmp_path):
  """Stopped before step 5 (saved at 4), or NaN at step 5 (resumed from 3)."""
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: detection.job(config, workdir), tmp_path, stop_k=3,
      nan_k=5)
  assert straight.results["steps"] == 6


def train_two_steps(config, devices):
  """The job's state after two train steps on the same batch."""
  mesh = sharding.make_mesh(devices)
  backbone = pretrained.for_probe(config, mesh)
  detector = detection.build(config, backbone,
                             len(detection_data.class_names(config)), mesh)
  step = detector.train_step
  state = detection.create_state(detector.model, backbone, detector.tx,
                                 detector.anchors, mesh, config.seed,
                                 detection.initial_loss_normalizer(config))
  host = next(detection_data.make_train_iterator(config))
  batch = sharding.host_to_global(
      {k: host[k] for k in ("image", "boxes", "labels", "valid")}, mesh)
  losses = []
  for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_eight_devices_equal_one_device(config):
  state8, loss8 = train_two_steps(config, jax.devices())
  state1, loss1 = train_two_steps(config, jax.devices()[:1])
  # The same programs on the same batch; 8 devices sum the batch's
  # gradients and SyncBN statistics in 8 partial sums, one device in one,
  # so only float32 rounding (~1e-7 relative) separates them, amplified a
  # little by one SGD step. The absolute tolerance is 1e-5 of weights of
  # order 1e-2: on an AMD EPYC CPU a few of 36,864 head weights differed by
  # 1.3e-6 (XLA's CPU reductions order their sums differently there).
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params),
                  jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.batch_stats),
                  jax.tree.leaves(state1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_anchor_sizes_say_how_many(config):
  config.model.anchor_sizes = (8, 16)
  with pytest.raises(ValueError, match="3 pyramid levels"):
    detection.make_anchors(config, "cifar")


def test_weight_decay_spares_only_the_norm_layers(config, tmp_path):
  backbone = pretrained.random_init(pretrained.load_config(config.pretrained))
  model = detection.build_model(config, backbone, 10)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), train=False))
  flat = jax.tree_util.tree_flatten_with_path(
      detection._decay_mask(shapes["params"]))[0]  # pylint: disable=protected-access
  decayed = {"/".join(k.key for k in path): d for path, d in flat}
  norms = {n for n in decayed
           if any(p.startswith("bn") or p.endswith("_bn") or "norm" in p
                  for p in n.split("/")[:-1])}
  assert norms and all(not decayed[n] for n in norms)
  assert all(decayed[n] for n in set(decayed) - norms)
  assert decayed["head/cls_score/kernel"] and not decayed[
      "backbone/layer1_0/bn1/scale"]
