"""Tests of the torchvision / detectron2 export (`detco_jax.export`).

The torchvision names and shapes are checked against a table derived here
from torchvision's ResNet-50 architecture (torchvision itself is not a
dependency). With torch installed, `torch.load(weights_only=True)` reads the
file and a functional PyTorch ResNet, written here from the state-dict
names, reproduces the Flax backbone's stage maps.
"""

import collections
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from configs import detco
from detco_jax import export
from detco_jax.interop import names
from detco_jax.interop import safe_pickle
from detco_jax.interop import torch_format
from detco_jax import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torchvision.models.resnet50(): 25,557,032 parameters, of which fc has
# 2048 * 1000 + 1000 = 2,049,000.
RESNET50_PARAMETERS = 25_557_032 - 2_049_000
# 53 convs (stem, 16 blocks x 3, 4 downsample convs) with one weight each
# and 53 BNs with 5 entries each: 53 + 265 = 318, i.e. the 320 keys of
# torchvision's state_dict less fc.weight and fc.bias.
RESNET50_ENTRIES = 318


def _torchvision_resnet50_table() -> "collections.OrderedDict[str, tuple]":
  """torchvision's resnet50 state_dict (no fc): name -> shape, in order."""
  table = collections.OrderedDict()

  def conv(name, out, inp, k):
    table[f"{name}.weight"] = (out, inp, k, k)

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      table[f"{name}.{leaf}"] = (c,)
    table[f"{name}.num_batches_tracked"] = ()

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  inplanes = 64
  for i, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)),
                                       start=1):
    for j in range(blocks):
      p = f"layer{i}.{j}"
      conv(f"{p}.conv1", planes, inplanes, 1)
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2", planes, planes, 3)
      bn(f"{p}.bn2", planes)
      conv(f"{p}.conv3", planes * 4, planes, 1)
      bn(f"{p}.bn3", planes * 4)
      if j == 0:  # Stride 2, or (layer1) 64 -> 256 channels.
        conv(f"{p}.downsample.0", planes * 4, inplanes, 1)
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  return table


def _random_values(shapes, seed=0):
  """Random variables of the tree `shapes`, BN entries included.

  He-normal kernels as at initialisation, but BN scale, bias, mean and var
  away from their initial 1, 0, 0, 1, which would hide a mix-up of them.
  """
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = path[-1].key
    if name == "kernel":
      h, w, _, o = x.shape
      return (rng.standard_normal(x.shape) * np.sqrt(2 / (h * w * o))).astype(
          np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    raise ValueError(f"Unexpected variable {path}.")

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def resnet50():
  """(module, random variables) of the default config's ResNet-50."""
  config = detco.get_config()
  # random_init's variable tree, traced only: compiling ResNet-50's
  # initialisation takes tens of seconds on a 2-core CPU, and its BN
  # entries (1, 0, 0, 1) would not test their mapping anyway.
  shapes = jax.eval_shape(lambda: pretrained.random_init(config).variables)
  module = pretrained.resnet_of(config)
  assert (module.depth, module.width, module.stem) == (50, 64, "imagenet")
  return module, _random_values(shapes)


@pytest.fixture(scope="module")
def resnet50_state_dict(resnet50):
  return names.torchvision_state_dict(resnet50[1])


def test_resnet50_names_and_shapes_match_torchvision(resnet50_state_dict):
  sd = resnet50_state_dict
  expected = _torchvision_resnet50_table()
  assert len(expected) == RESNET50_ENTRIES
  assert list(sd) == list(expected)  # Names and torchvision's order.
  assert {k: v.shape for k, v in sd.items()} == expected
  assert not any(k.startswith("fc.") for k in sd)
  parameters = sum(v.size for k, v in sd.items()
                   if k.endswith((".weight", ".bias")))
  assert parameters == RESNET50_PARAMETERS == 23_508_032
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      assert v.dtype == np.int64 and v.shape == () and v == 0
    else:
      assert v.dtype == np.float32


def test_layout_of_convs_and_batch_norm(resnet50, resnet50_state_dict):
  _, variables = resnet50
  params, stats = variables["params"], variables["batch_stats"]
  sd = resnet50_state_dict
  convs = {
      "conv1.weight": params["conv1"]["kernel"],
      "layer2.0.conv2.weight": params["layer2_0"]["conv2"]["kernel"],
      "layer3.0.downsample.0.weight":
          params["layer3_0"]["downsample_conv"]["kernel"],
  }
  for name, kernel in convs.items():
    kernel = np.asarray(kernel)
    o, i, h, w = sd[name].shape
    assert kernel.shape == (h, w, i, o)  # Flax HWIO vs torch OIHW.
    np.testing.assert_array_equal(sd[name].transpose(2, 3, 1, 0), kernel)
    assert sd[name].flags.c_contiguous
  for torch_name, path in [("bn1", ("bn1",)),
                           ("layer3.1.bn2", ("layer3_1", "bn2")),
                           ("layer4.0.downsample.1",
                            ("layer4_0", "downsample_bn"))]:
    p, s = params, stats
    for key in path:
      p, s = p[key], s[key]
    np.testing.assert_array_equal(sd[f"{torch_name}.weight"], p["scale"])
    np.testing.assert_array_equal(sd[f"{torch_name}.bias"], p["bias"])
    np.testing.assert_array_equal(sd[f"{torch_name}.running_mean"], s["mean"])
    np.testing.assert_array_equal(sd[f"{torch_name}.running_var"], s["var"])


def test_rejects_other_trees(resnet50):
  _, variables = resnet50
  with pytest.raises(ValueError, match="params"):
    names.torchvision_state_dict({"params": variables["params"]})
  encoder = {c: {"backbone": v} for c, v in variables.items()}
  with pytest.raises(ValueError, match="not a module"):
    names.torchvision_state_dict(encoder)


def test_torch_file_format_without_torch(resnet50_state_dict, tmp_path):
  sd = resnet50_state_dict
  path = tmp_path / "r50.pth"
  path.write_bytes(torch_format.torch_bytes(sd, "r50"))
  back = safe_pickle.read_file(str(path)).obj
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v)

  raw = path.read_bytes()
  with zipfile.ZipFile(path) as zf:
    assert zf.testzip() is None
    names = zf.namelist()
    assert names[0] == "r50/data.pkl"
    assert {"r50/byteorder", "r50/version"} <= set(names)
    assert zf.read("r50/byteorder") == b"little"
    assert sum(n.startswith("r50/data/") for n in names) == len(sd)
    for info in zf.infolist():
      # torch's alignment of each record's data (it may memory-map them).
      name_len, extra_len = struct.unpack(
          "<HH", raw[info.header_offset + 26:info.header_offset + 30])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0
      assert info.compress_type == zipfile.ZIP_STORED
    pkl = zf.read("r50/data.pkl")
  # Only globals that torch.load(weights_only=True) allows.
  globals_ = {arg for op, arg, _ in pickletools.genops(pkl)
              if op.name == "GLOBAL"}
  assert globals_ == {"collections OrderedDict",
                      "torch._utils _rebuild_tensor_v2",
                      "torch FloatStorage", "torch LongStorage"}
  assert pkl[:2] == b"\x80\x02"  # Protocol 2, as torch.save writes.


def test_detectron2_checkpoint(resnet50_state_dict, tmp_path):
  sd = resnet50_state_dict
  ckpt = names.detectron2_checkpoint(sd)
  assert set(ckpt) == {"model", "__author__", "matching_heuristics"}
  assert ckpt["__author__"] == "detco_jax"
  assert ckpt["matching_heuristics"] is True
  model = ckpt["model"]
  # 318 less the 53 num_batches_tracked.
  assert len(model) == RESNET50_ENTRIES - 53
  renames = {
      "conv1.weight": "stem.conv1.weight",
      "bn1.running_var": "stem.conv1.norm.running_var",
      "layer1.0.conv1.weight": "res2.0.conv1.weight",
      "layer1.0.bn3.bias": "res2.0.conv3.norm.bias",
      "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
      "layer2.0.downsample.1.running_mean": "res3.0.shortcut.norm.running_mean",
      "layer4.2.bn2.weight": "res5.2.conv2.norm.weight",
  }
  for old, new in renames.items():
    assert names.detectron2_name(old) == new
    np.testing.assert_array_equal(model[new], sd[old])
  for name, value in model.items():
    assert name.split(".")[0] in ("stem", "res2", "res3", "res4", "res5")
    assert not any(s in name for s in ("layer", "bn", "downsample",
                                       "num_batches_tracked")), name
    assert isinstance(value, np.ndarray) and value.dtype == np.float32

  path = tmp_path / "r50.pkl"
  path.write_bytes(pickle.dumps(ckpt, protocol=2))
  with open(path, "rb") as f:
    back = pickle.load(f)
  assert back.keys() == ckpt.keys() and back["model"].keys() == model.keys()
  for k, v in model.items():
    assert isinstance(back["model"][k], np.ndarray)
    np.testing.assert_array_equal(back["model"][k], v)


def test_cli_end_to_end(tiny_pretrain_workdir, tmp_path, caplog):
  workdir = tiny_pretrain_workdir
  # The command line, at the first checkpoint (the fixture saves 3 and 6).
  out = tmp_path / "tv" / "resnet10.pth"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "detco_jax.export", f"--workdir={workdir}",
       "--step=3", "--format=torchvision", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step3 = pretrained.load(workdir, step=3)
  assert step3.step == 3
  expected = names.torchvision_state_dict(step3.variables)
  back = safe_pickle.read_file(str(out)).obj
  assert list(back) == list(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v)

  # In process, the latest checkpoint, detectron2's format.
  out = tmp_path / "d2" / "resnet10.pkl"
  summary = export.run(workdir, "detectron2", str(out))
  assert summary["step"] == 6
  assert "cifar" in caplog.text  # The stem warning.
  latest = names.torchvision_state_dict(pretrained.load(workdir).variables)
  with open(out, "rb") as f:
    ckpt = pickle.load(f)
  assert ckpt["__author__"] == "detco_jax"
  bns = sum(k.endswith("num_batches_tracked") for k in latest)
  assert summary["tensors"] == len(ckpt["model"]) == len(latest) - bns
  for k, v in latest.items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(ckpt["model"][names.detectron2_name(k)],
                                    v)
  # --step was honoured: training moved the weights between 3 and 6.
  assert not np.array_equal(latest["conv1.weight"], expected["conv1.weight"])

  with pytest.raises(ValueError, match="format"):
    export.run(workdir, "onnx", str(tmp_path / "x"))


def test_the_log_names_the_step_once_and_the_inputs_alike(
    tiny_pretrain_workdir, tmp_path, caplog):
  caplog.set_level("INFO")

  def wrote():
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("Wrote ")]
    caplog.clear()
    return line

  # A workdir's config.json and a file's settings spell the same inputs
  # differently (lists and 1, tuples and 1.0): the log does not.
  tv, d2 = tmp_path / "r10.pth", tmp_path / "r10.pkl"
  export.run(tiny_pretrain_workdir, "torchvision", str(tv))
  from_workdir = wrote()
  export.run(str(tv), "detectron2", str(d2))
  from_file = wrote()
  inputs = ("Inputs: RGB images in 0..1, normalised with mean (0.485, 0.456, "
            "0.406) and std (0.229, 0.224, 0.225).")
  assert f" from {tiny_pretrain_workdir} step 6. {inputs} " in from_workdir
  assert from_workdir.count("step 6") == 1
  assert f" from {tv} (ResNet-10 " in from_file and inputs in from_file
  assert from_workdir.endswith(
      f"Open it with: model.load_state_dict(torch.load('{tv}', "
      "weights_only=True), strict=False)")
  assert from_file.endswith(f"Open it with: MODEL.WEIGHTS {d2} with "
                            "MODEL.RESNETS.STRIDE_IN_1X1 False "
                            "(docs/checkpoints.md)")
  assert export.normalisation(
      {"mean": [103.53, 116.28, 123.675], "std": [1, 1, 1],
       "pixel_range": 255.0, "channels": "BGR"}) == (
           "Inputs: BGR images in 0..255, normalised with mean (103.53, "
           "116.28, 123.675) and std (1, 1, 1).")


# ----------------------------------------------------------------------------
# With torch.


def _torch_stage_maps(sd, x):
  """ResNet stage maps computed from a torchvision-named state dict.

  torchvision's architecture in functional form: eval-mode BN, the stride
  of a bottleneck in its 3x3 conv (v1.5), a downsample on the first block
  of each layer where it exists, the 7x7/2 + max-pool stem when conv1 is
  7x7 and the 3x3/1 "cifar" stem otherwise.
  """
  import torch  # pylint: disable=g-import-not-at-top
  f = torch.nn.functional

  def bn(name, y):
    return f.batch_norm(y, sd[f"{name}.running_mean"],
                        sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-5)

  def conv(name, y, stride=1):
    w = sd[f"{name}.weight"]
    return f.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2)

  imagenet = sd["conv1.weight"].shape[-1] == 7
  y = f.relu(bn("bn1", conv("conv1", x, 2 if imagenet else 1)))
  if imagenet:
    y = f.max_pool2d(y, 3, 2, 1)
  bottleneck = "layer1.0.conv3.weight" in sd
  maps = {}
  for i in range(1, 5):
    j = 0
    while f"layer{i}.{j}.conv1.weight" in sd:
      p = f"layer{i}.{j}"
      stride = 2 if i > 1 and j == 0 else 1
      if bottleneck:
        h = f.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", y)))
        h = f.relu(bn(f"{p}.bn2", conv(f"{p}.conv2", h, stride)))
        h = bn(f"{p}.bn3", conv(f"{p}.conv3", h))
      else:
        h = f.relu(bn(f"{p}.bn1", conv(f"{p}.conv1", y, stride)))
        h = bn(f"{p}.bn2", conv(f"{p}.conv2", h))
      if f"{p}.downsample.0.weight" in sd:
        y = bn(f"{p}.downsample.1", conv(f"{p}.downsample.0", y, stride))
      y = f.relu(h + y)
      j += 1
    maps[f"res{i + 1}"] = y
  return maps


@pytest.mark.long
def test_torch_load_reads_the_export(resnet50_state_dict, tmp_path):
  torch = pytest.importorskip("torch")
  sd = resnet50_state_dict
  path = tmp_path / "resnet50.pth"
  path.write_bytes(torch_format.torch_bytes(sd, "resnet50"))
  for kwargs in ({}, {"mmap": True}):
    loaded = torch.load(str(path), weights_only=True, **kwargs)
    assert type(loaded) is collections.OrderedDict
    assert list(loaded) == list(sd)
    for k, v in sd.items():
      t = loaded[k]
      assert isinstance(t, torch.Tensor) and not t.requires_grad
      assert t.dtype == (torch.int64 if v.dtype == np.int64 else torch.float32)
      np.testing.assert_array_equal(t.numpy(), v)


@pytest.mark.parametrize(
    "which", ["tiny_cifar_resnet10",
              pytest.param("resnet50_64px", marks=pytest.mark.long)])
def test_torch_forward_matches_flax(which, request, tmp_path):
  torch = pytest.importorskip("torch")
  if which == "resnet50_64px":
    module, variables = request.getfixturevalue("resnet50")
    size = 64
  else:
    backbone = pretrained.load(request.getfixturevalue("tiny_pretrain_workdir"))
    module, variables = backbone.module, jax.device_get(backbone.variables)
    size = backbone.config.views.global_size
  path = tmp_path / "backbone.pth"
  export.export(pretrained.Backbone(module, variables, detco.get_config(), 0,
                                    which), "torchvision", str(path))
  sd = torch.load(str(path), weights_only=True)

  x = np.random.default_rng(1).standard_normal((2, size, size, 3),
                                               dtype=np.float32)
  want = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    got = _torch_stage_maps(sd, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  assert set(got) == set(want)
  for stage, w in want.items():
    w = np.asarray(w)
    g = got[stage].numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC.
    assert g.shape == w.shape, stage
    scale = np.abs(w).max()
    assert scale > 0, stage
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=stage)
