"""Every job that takes `--config.pretrained` runs from a checkpoint file
written by torch: the linear probe, kNN, the dense probe, the attention maps
and the detection transfer, at the tests' tiny scale (a ResNet-10 of width
8 with the CIFAR stem, as the tiny pretraining run has)."""

import os

import numpy as np
import pytest

from configs import dense_probe
from configs import detection as detection_config
from configs import linear_probe
from detco_jax import sharding
from detco_jax.eval import attention
from detco_jax.eval import dense
from detco_jax.eval import detection
from detco_jax.eval import knn
from detco_jax.eval import linear
from detco_jax.eval import probe


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
  """A torchvision-layout ResNet-10 state dict saved by torch.save."""
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.trained_like(10, width=8, stem="cifar")
  path = tmp_path_factory.mktemp("torch") / "resnet10.pth"
  torch.save(model.state_dict(), path)
  return str(path)


def _source(path):
  return f"{path} (ResNet-10 (width 8, cifar stem))"


def _tiny(config_module, torch_file, data_dir, **overrides):
  """A job's tiny config on the built-in data, from `torch_file`."""
  c = config_module.get_config("tiny")
  c.pretrained, c.data.data_dir = torch_file, data_dir
  c.update(overrides)
  return c


@pytest.fixture
def probe_config(torch_file, builtin_data_dir):
  return _tiny(linear_probe, torch_file, builtin_data_dir)


@pytest.mark.long
def test_linear_probe_and_knn(probe_config, tmp_path):
  results = linear.run(probe_config, str(tmp_path / "linear"))
  assert results["pretrained"] == probe_config.pretrained
  assert results["backbone"] == _source(probe_config.pretrained)
  assert results["pretrained_step"] == 0 and results["steps"] == 8
  for r in results["stages"].values():
    assert 0 <= r["top1"] <= r["top5"] <= 1
  results = knn.run(probe_config, str(tmp_path / "knn"))
  assert results["backbone"] == _source(probe_config.pretrained)
  assert 0 <= results["knn_top1"] <= 1 and results["num_test"] == 64


@pytest.mark.long
def test_a_file_without_bn_statistics_is_probed_after_measuring_them(
    probe_config, tmp_path):
  torch = pytest.importorskip("torch")
  state = torch.load(probe_config.pretrained, weights_only=True)
  path = tmp_path / "no_stats.pth"
  torch.save({k: v for k, v in state.items()
              if "running" not in k and "batches" not in k}, path)
  probe_config.pretrained = str(path)
  with pytest.raises(ValueError, match="has no BN running statistics"):
    knn.run(probe_config, str(tmp_path / "refused"))
  probe_config.pretrained_file.bn_batches = 2
  backbone = probe.backbone_for(probe_config, sharding.make_mesh(),
                                lambda: probe.train_images(probe_config))
  assert backbone.source == f"{_source(path)}, BN statistics of 2 batches"
  variances = [np.asarray(v) for k, v in _leaves(backbone.variables)
               if k.endswith("var")]
  assert variances and all((v != 1).any() for v in variances)
  results = knn.run(probe_config, str(tmp_path / "knn"))
  assert results["backbone"] == backbone.source


def _leaves(variables):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return [("/".join(k), v) for k, v in traverse_util.flatten_dict(
      variables["batch_stats"]).items()]


@pytest.mark.long
def test_dense_probe(torch_file, builtin_data_dir, tmp_path):
  config = _tiny(dense_probe, torch_file, builtin_data_dir, total_steps=2)
  results = dense.run(config, str(tmp_path / "dense"))
  assert results["backbone"] == _source(torch_file)
  assert results["steps_trained"] == 2
  for r in results["stages"].values():
    assert 0.0 <= r["miou"] <= 1.0


@pytest.mark.long
def test_attention_maps(torch_file, builtin_data_dir, tmp_path):
  config = _tiny(linear_probe, None, builtin_data_dir)
  out = str(tmp_path / "attention")
  with pytest.raises(ValueError, match="No run names a dataset"):
    attention.run([f"torch:{torch_file}"], out, num_images=2)
  results = attention.run([f"torch:{torch_file}", "floor:random"], out,
                          num_images=3, ratio_images=20, config=config)
  assert list(results["results"]) == ["torch", "floor"]
  assert results["images"].shape == (3, 32, 32, 3)
  assert set(results["ratios"]) == {"torch", "floor"}
  with np.load(os.path.join(out, "attention_maps.npz")) as npz:
    for stage, side in zip(attention.STAGES, (32, 16, 8, 4)):
      assert npz[f"torch/{stage}/raw"].shape == (3, side, side)
  with pytest.raises(ValueError, match="is a checkpoint file: drop the step"):
    attention.run([f"torch:{torch_file}@3"], out, config=config)


@pytest.mark.long
def test_detection_transfer(torch_file, builtin_data_dir, tmp_path):
  config = _tiny(detection_config, torch_file, builtin_data_dir,
                 total_steps=2)
  results = detection.run(config, str(tmp_path / "detection"))
  assert results["backbone"] == _source(torch_file)
  assert results["steps"] == 2
  assert all(0 <= results[k] <= 1 for k in ("AP", "AP50", "AP75"))
