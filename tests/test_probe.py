"""What the probes share: the random-init floor's BN statistics on data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_probe
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.eval import features
from detco_jax.eval import probe


@pytest.fixture
def config(tiny_pretrain_workdir, builtin_data_dir):
  c = linear_probe.get_config("tiny")
  c.pretrained = tiny_pretrain_workdir
  c.data.data_dir = builtin_data_dir
  c.random_init = True
  return c


def _maps(backbone, images, train):
  x = features.preprocess(jnp.asarray(images), backbone.config.aug)
  out = backbone.module.apply(backbone.variables, x, train=train,
                              mutable=["batch_stats"] if train else False)
  return out[0] if train else out


@pytest.mark.long
def test_one_batch_calibration_makes_eval_mode_equal_train_mode(config):
  """With one batch's statistics, evaluation-mode BN normalises that batch
  exactly as training-mode BN does: every stage map agrees."""
  mesh = sharding.make_mesh()
  floor = pretrained.for_probe(config, mesh)
  images = next(probe.train_images(config))
  calibrated = probe.calibrate_bn(floor, mesh, [images], num_batches=1)
  assert calibrated.source == "random init 0, BN statistics of 1 batches"
  want = _maps(floor, images, train=True)
  got = _maps(calibrated, images, train=False)
  uncalibrated = _maps(floor, images, train=False)
  for s in want:
    np.testing.assert_allclose(np.asarray(got[s]), np.asarray(want[s]),
                               rtol=1e-4, atol=1e-4)
    # The init's statistics (0 and 1) normalise nothing: far off.
    assert not np.allclose(np.asarray(uncalibrated[s]), np.asarray(want[s]),
                           rtol=1e-2, atol=1e-2)
  # The stem's BN, against NumPy: moments of the first conv's output.
  assert floor.config.model.stem == "cifar"   # 3x3/1 conv, padding 1.
  x = features.preprocess(jnp.asarray(images), floor.config.aug)
  conv = jax.lax.conv_general_dilated(
      x, floor.variables["params"]["conv1"]["kernel"], (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = np.asarray(conv, np.float64)
  stats = calibrated.variables["batch_stats"]["bn1"]
  np.testing.assert_allclose(stats["mean"], conv.mean((0, 1, 2)), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(stats["var"], conv.var((0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  # The parameters are untouched.
  for a, b in zip(jax.tree.leaves(calibrated.variables["params"]),
                  jax.tree.leaves(floor.variables["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_statistics_average_over_batches(config):
  mesh = sharding.make_mesh()
  floor = pretrained.for_probe(config, mesh)
  batches = probe.train_images(config)
  first, second = next(batches), next(batches)
  both = probe.calibrate_bn(floor, mesh, iter([first, second]), 5)
  assert both.source.endswith("BN statistics of 2 batches")  # Ran out at 2.
  one = [probe.calibrate_bn(floor, mesh, [b], 1).variables["batch_stats"]
         for b in (first, second)]
  want = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *one)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w,
                                                       rtol=1e-5, atol=1e-7),
               both.variables["batch_stats"], want)
  with pytest.raises(ValueError, match="fewer examples than one batch"):
    probe.calibrate_bn(floor, mesh, iter([]), 5)


def test_train_images_leave_out_the_padded_batch(config):
  config.batch_size = 96   # 256 train images: 2 full batches, 1 padded.
  batches = list(probe.train_images(config))
  assert [b.shape[0] for b in batches] == [96, 96]
  assert all(b.dtype == np.uint8 for b in batches)


def test_backbone_for_calibrates_only_the_floor(config):
  mesh = sharding.make_mesh()

  def no_images():
    raise AssertionError("images were read")

  config.random_init_bn_batches = 0
  plain = probe.backbone_for(config, mesh, no_images)
  for leaf in jax.tree.leaves(plain.variables["batch_stats"]["bn1"]["mean"]):
    np.testing.assert_array_equal(np.asarray(leaf), 0)
  config.random_init = False
  pretrained_backbone = probe.backbone_for(config, mesh, no_images)
  assert pretrained_backbone.step == 6
  config.random_init, config.random_init_bn_batches = True, 2
  floor = probe.backbone_for(config, mesh,
                             lambda: probe.train_images(config))
  assert floor.source == "random init 0, BN statistics of 2 batches"
  assert not np.allclose(floor.variables["batch_stats"]["bn1"]["var"], 1.0)
