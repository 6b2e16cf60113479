"""Released checkpoints in: reading torch and detectron2 files safely
(`interop.safe_pickle`), finding their ResNet (`interop.backbone_file`),
and the backbone it gives (`pretrained.load_file`).

Files are written by torch itself where torch is installed (as CI installs
it), by `pickle` for detectron2's format, and by hand for damaged and
malicious ones.
"""

import collections
import copyreg
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from configs import dense_probe
from configs import detco
from configs import detection as detection_config
from configs import linear_probe
from detco_jax import export
from detco_jax import pretrained
from detco_jax.eval import features
from detco_jax.interop import backbone_file
from detco_jax.interop import names
from detco_jax.interop import safe_pickle
from detco_jax.interop import torch_format
from tests.moco_convert import moco_convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(variables):
  return {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(dict(variables))).items()}


def assert_same_variables(got, want):
  """Bit for bit: the same variables, dtypes and values."""
  got, want = _flat(got), _flat(want)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_reads_torch_zip_and_legacy_files_exactly(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  a = torch.randn(3, 4)
  tensors = collections.OrderedDict(
      f32=a, f64=torch.randn(2, dtype=torch.float64),
      f16=torch.randn(5).half(), bf16=torch.randn(5).bfloat16(),
      i64=torch.tensor(7), u8=torch.arange(4, dtype=torch.uint8),
      bool=torch.tensor([True, False]),
      transposed=a.t(),          # A view with strides (1, 4).
      row=a[2],                  # A view at storage offset 8.
      strided=a[:, ::2],
      empty=torch.zeros(0, 3),
      param=torch.nn.Parameter(torch.randn(2, 2)))
  checkpoint = {"state_dict": tensors, "epoch": 200, "arch": "resnet50",
                "optimizer": {"state": {0: {"momentum_buffer": a * 2}},
                              "param_groups": [{"lr": 0.03, "params": [0]}]}}
  for zip_format, container in [(True, "torch zip"),
                                (False, "torch legacy")]:
    path = tmp_path / f"{container.replace(' ', '_')}.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    contents = safe_pickle.read_file(str(path))
    assert contents.container == container
    got = contents.obj
    assert (got["epoch"], got["arch"]) == (200, "resnet50")
    assert got["optimizer"]["param_groups"] == [{"lr": 0.03, "params": [0]}]
    np.testing.assert_array_equal(
        got["optimizer"]["state"][0]["momentum_buffer"], (a * 2).numpy())
    assert type(got["state_dict"]) is collections.OrderedDict
    assert list(got["state_dict"]) == list(tensors)
    for name, t in tensors.items():
      array = got["state_dict"][name]
      want = t.detach()
      if t.dtype == torch.bfloat16:
        assert array.dtype == ml_dtypes.bfloat16
        array, want = array.astype(np.float32), want.float()
      assert array.flags.c_contiguous, name
      assert array.dtype == want.numpy().dtype, name
      np.testing.assert_array_equal(array, want.numpy(), err_msg=name)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reads_detectron2_pickles_of_every_protocol(protocol, tmp_path):
  rng = np.random.default_rng(0)
  model = {"stem.conv1.weight": rng.standard_normal((4, 3, 3, 3),
                                                    dtype=np.float32),
           "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
           "count": np.array(5, np.int64),
           "half": rng.standard_normal(3).astype(np.float16)}
  path = tmp_path / "model.pkl"
  path.write_bytes(pickle.dumps(
      {"model": model, "__author__": "MOCO", "matching_heuristics": True,
       "scalar": np.float32(1.5)}, protocol=protocol))
  contents = safe_pickle.read_file(str(path))
  assert contents.container == "pickle"
  assert contents.obj["__author__"] == "MOCO"
  assert contents.obj["scalar"] == np.float32(1.5)
  for k, v in model.items():
    assert contents.obj["model"][k].dtype == v.dtype
    np.testing.assert_array_equal(contents.obj["model"][k], v)


class _Marker:
  """Pickles as `os.system("touch MARKER")`: a file that runs code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Eval:

  def __reduce__(self):
    return (eval, ("__import__('os').getpid()",))


def _zip_with(data_pkl: bytes) -> bytes:
  """A torch zip file (the project's writer) whose data.pkl is replaced."""
  valid = torch_format.torch_bytes({"w": np.ones(2, np.float32)}, "archive")
  out = io.BytesIO()
  with zipfile.ZipFile(io.BytesIO(valid)) as src, zipfile.ZipFile(
      out, "w") as dst:
    for info in src.infolist():
      data = data_pkl if info.filename == "archive/data.pkl" else src.read(
          info)
      dst.writestr(info.filename, data)
  return out.getvalue()


def _malicious_files(marker):
  evil = {"state_dict": {"conv1.weight": np.ones(3), "x": _Marker(marker)}}
  legacy = b"".join(pickle.dumps(x, protocol=2) for x in (
      safe_pickle.LEGACY_MAGIC, safe_pickle.LEGACY_PROTOCOL,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
      evil, []))
  return {
      "pickle_protocol_2": (pickle.dumps(evil, protocol=2), "posix.system"),
      "pickle_protocol_5": (pickle.dumps(evil, protocol=5), "posix.system"),
      "torch_zip": (_zip_with(pickle.dumps(evil, protocol=2)),
                    "posix.system"),
      "torch_legacy": (legacy, "posix.system"),
      "builtins_eval": (pickle.dumps({"model": _Eval()}, protocol=2),
                        "__builtin__.eval"),  # Protocol 2 spelling.
  }


@pytest.mark.parametrize("kind", ["pickle_protocol_2", "pickle_protocol_5",
                                  "torch_zip", "torch_legacy",
                                  "builtins_eval"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(
    kind, tmp_path):
  marker = tmp_path / "ran"
  data, global_name = _malicious_files(marker)[kind]
  # The file does what it says when unpickled the usual way (never on a
  # file of this kind outside such a test).
  if kind.startswith("pickle"):
    pickle.loads(data)
    assert marker.exists()
    marker.unlink()
  path = tmp_path / "model.pth"
  path.write_bytes(data)
  with pytest.raises(safe_pickle.RefusedGlobalError) as error:
    safe_pickle.read_file(str(path))
  assert str(error.value).startswith(
      f"Refusing to load '{global_name}' from {path}: not a tensor file "
      "global")
  assert "\n" not in str(error.value)
  assert not marker.exists()
  # Through every consumer, the same refusal.
  with pytest.raises(ValueError, match="Refusing to load"):
    pretrained.load_file(str(path))


def test_extension_codes_and_object_arrays_are_refused_too(tmp_path):
  marker = tmp_path / "ran"
  # copyreg's extension registry: an EXT1 opcode instead of a GLOBAL,
  # resolved through the registry of the process that reads it.
  path = tmp_path / "ext.pkl"
  copyreg.add_extension("posix", "system", 0xF1)
  try:
    path.write_bytes(pickle.dumps({"x": _Marker(marker)}, protocol=2))
    assert pickle.EXT1 + bytes([0xF1]) in path.read_bytes()
    with pytest.raises(safe_pickle.RefusedGlobalError, match="posix.system"):
      safe_pickle.read_file(str(path))
  finally:
    copyreg.remove_extension("posix", "system", 0xF1)
  # An object array would unpickle its elements; its dtype is refused.
  path.write_bytes(pickle.dumps({"model": np.array([1, "a"], object)}))
  with pytest.raises(safe_pickle.RefusedGlobalError,
                     match="numpy dtype 'O8'.*Python objects"):
    safe_pickle.read_file(str(path))
  assert not marker.exists()


def _corrupt_variants(tmp_path):
  torch_zip = torch_format.torch_bytes({"a": np.arange(64, dtype=np.float32)})
  legacy = b"".join(pickle.dumps(x, protocol=2) for x in (
      safe_pickle.LEGACY_MAGIC, safe_pickle.LEGACY_PROTOCOL,
      {"protocol_version": 1001, "little_endian": True}))
  d2 = pickle.dumps({"model": {"a": np.arange(64, dtype=np.float32)}})
  return {"zip_head": torch_zip[:len(torch_zip) // 2],
          "zip_tail": torch_zip[:-30],
          "legacy": legacy[:len(legacy) - 5],
          "pickle": d2[:len(d2) - 40]}


@pytest.mark.parametrize("kind", ["zip_head", "zip_tail", "legacy",
                                  "pickle"])
def test_a_truncated_file_is_one_line_naming_it(kind, tmp_path):
  path = tmp_path / "cut.pth"
  path.write_bytes(_corrupt_variants(tmp_path)[kind])
  with pytest.raises(safe_pickle.CorruptFileError) as error:
    pretrained.load_file(str(path))
  message = str(error.value)
  assert message.startswith(f"{path}: truncated or corrupt file (")
  assert "\n" not in message


def test_truncated_storage_of_a_torch_written_file(tmp_path):
  torch = pytest.importorskip("torch")
  for zip_format in (True, False):
    path = tmp_path / f"full_{zip_format}.pth"
    torch.save({"a": torch.arange(1000.0)}, path,
               _use_new_zipfile_serialization=zip_format)
    raw = path.read_bytes()
    cut = tmp_path / "cut.pth"
    # The legacy format ends with the storage's bytes; the zip format with
    # its directory (cut into the storage record instead).
    cut.write_bytes(raw[:-100] if not zip_format else raw[:len(raw) - 2000])
    with pytest.raises(safe_pickle.CorruptFileError,
                       match=f"{cut}: truncated or corrupt file"):
      safe_pickle.read_file(str(cut))


def test_unknown_formats_say_what_the_file_is(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not a checkpoint")
  with pytest.raises(ValueError, match=(
      "notes.pth is not a checkpoint this project reads.*starts with "
      "b'not a ch'")):
    pretrained.load_file(str(text))
  script = tmp_path / "script.pt"
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as zf:
    zf.writestr("model/code/__torch__.py", "")
    zf.writestr("model/constants.pkl", b"")
  script.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="TorchScript archive"):
    pretrained.load_file(str(script))
  old = tmp_path / "old.pth"
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tf:
    info = tarfile.TarInfo("sys_info")
    info.size = 4
    tf.addfile(info, io.BytesIO(b"abcd"))
  old.write_bytes(buffer.getvalue())
  with pytest.raises(ValueError, match="tar format of torch < 0.4"):
    pretrained.load_file(str(old))
  with pytest.raises(FileNotFoundError):
    safe_pickle.read_file(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------
# Names both ways.


def test_torchvision_names_invert_detectron2s():
  pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  for depth in (18, 50):
    state_dict = torch_resnet.ResNet(depth, 8).state_dict()
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("fc")}
    for name in backbone:
      assert names.torchvision_name(names.detectron2_name(name)) == name
    converted = moco_convert({"module.encoder_q." + k: v.numpy()
                                for k, v in state_dict.items()})["model"]
    # MoCo's converter gives every backbone tensor detectron2's name, and
    # its head `stem.fc.*`; going back gives torchvision's names.
    assert sorted(names.torchvision_name(k) for k in converted) == sorted(
        state_dict)
    assert sorted(converted) == sorted(
        [names.detectron2_name(k) for k in backbone]
        + ["stem.fc.weight", "stem.fc.bias"])


def test_variable_paths_of_torchvision_names():
  assert names.variable_path("conv1.weight") == ("params", "conv1", "kernel")
  assert names.variable_path("bn1.running_var") == ("batch_stats", "bn1",
                                                     "var")
  assert names.variable_path("layer3.1.bn2.weight") == (
      "params", "layer3_1", "bn2", "scale")
  assert names.variable_path("layer2.0.downsample.0.weight") == (
      "params", "layer2_0", "downsample_conv", "kernel")
  assert names.variable_path("layer2.0.downsample.1.running_mean") == (
      "batch_stats", "layer2_0", "downsample_bn", "mean")
  for other in ("fc.weight", "layer1.0.conv1.bias", "bn1.num_batches_tracked",
                "layer1.0.downsample.2.weight", "encoder.conv1.weight",
                "layer1.0.relu.weight"):
    assert names.variable_path(other) is None, other


# ----------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_a_run_exported_and_imported_is_its_query_backbone(
    fmt, tiny_pretrain_workdir, tmp_path):
  run = pretrained.load(tiny_pretrain_workdir)
  path = tmp_path / ("backbone.pth" if fmt == "torchvision" else
                     "backbone.pkl")
  export.run(tiny_pretrain_workdir, fmt, str(path))
  back = pretrained.load_file(str(path))
  assert_same_variables(back.variables, run.variables)
  m, c = back.module, run.config.model
  assert (m.depth, m.width, m.stem) == (c.depth, c.width, c.stem)
  assert back.source == f"{path} (ResNet-10 (width 8, cifar stem))"
  # Placed like a workdir's backbone: replicated over the mesh.
  for got, want in zip(jax.tree.leaves(back.variables),
                       jax.tree.leaves(run.variables)):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def _moco_checkpoint(model):
  """MoCo v2's training checkpoint around `model` (its query encoder)."""
  import torch  # pylint: disable=g-import-not-at-top
  state = collections.OrderedDict()
  for k, v in model.state_dict().items():
    if k.startswith("fc."):  # MoCo v2's MLP head replaces fc.
      continue
    state[f"module.encoder_q.{k}"] = v
  out = model.fc.out_features
  state["module.encoder_q.fc.0.weight"] = torch.randn(out, out)
  state["module.encoder_q.fc.0.bias"] = torch.randn(out)
  state["module.encoder_q.fc.2.weight"] = torch.randn(8, out)
  state["module.encoder_q.fc.2.bias"] = torch.randn(8)
  for k, v in list(state.items()):
    state[k.replace("encoder_q", "encoder_k")] = v + 1
  state["module.queue"] = torch.randn(8, 16)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  return {"epoch": 200, "arch": "resnet18", "state_dict": state,
          "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}


def _backbone_tensors(model):
  return {k: v.numpy() for k, v in model.state_dict().items()
          if not k.startswith("fc.")}


@pytest.mark.parametrize("layout", [
    "torchvision_zip",
    # The quick tier keeps one layout; the full suite checks all four.
    pytest.param("torchvision_legacy", marks=pytest.mark.long),
    pytest.param("moco", marks=pytest.mark.long),
    pytest.param("detectron2", marks=pytest.mark.long)])
def test_a_file_imported_then_exported_is_the_file_bit_for_bit(
    layout, tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.trained_like(18, width=16)
  original = _backbone_tensors(model)
  path = tmp_path / "in.pth"
  if layout == "torchvision_zip":
    torch.save(model.state_dict(), path)
  elif layout == "torchvision_legacy":
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
  else:
    moco = _moco_checkpoint(model)
    torch.save(moco, path)
    if layout == "detectron2":
      path = tmp_path / "in.pkl"
      path.write_bytes(pickle.dumps(moco_convert(moco["state_dict"])))
  backbone = pretrained.load_file(str(path))
  assert (backbone.module.depth, backbone.module.width,
          backbone.module.stem) == (18, 16, "imagenet")

  tv, d2 = tmp_path / "out.pth", tmp_path / "out.pkl"
  export.run(str(path), "torchvision", str(tv))
  export.run(str(path), "detectron2", str(d2))
  written = torch.load(tv, weights_only=True)
  assert list(written) == list(original)  # torchvision's order.
  with open(d2, "rb") as f:
    converted = pickle.load(f)["model"]  # The project's own file.
  for name, want in original.items():
    if name.endswith("num_batches_tracked"):
      # The model keeps no count: the export writes torch's 0.
      assert written[name].item() == 0 and want > 0
      continue
    got = written[name].numpy()
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(converted[names.detectron2_name(name)],
                                  want, err_msg=name)


# ----------------------------------------------------------------------------
# Torch's numbers.


@pytest.mark.parametrize("depth", [
    18, pytest.param(50, marks=pytest.mark.long)])
def test_stage_maps_equal_torchs_forward(depth, tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.trained_like(depth, seed=depth)
  path = tmp_path / f"resnet{depth}.pth"
  # One written in each of torch's formats.
  torch.save(model.state_dict(), path,
             _use_new_zipfile_serialization=depth == 50)
  backbone = pretrained.load_file(str(path))
  m = backbone.module
  assert (m.depth, m.width, m.stem) == (depth, 64, "imagenet")

  images = np.random.default_rng(depth).integers(0, 256, (2, 64, 64, 3),
                                                 dtype=np.uint8)
  want = jax.jit(lambda v, x: features.stage_maps(backbone, v, x))(
      backbone.variables, images)
  # torchvision's transform: ToTensor (/255) then Normalize.
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  with torch.no_grad():
    got = model.stages((x - mean) / std)
  for stage, w in want.items():
    g = got[stage].permute(0, 2, 3, 1).numpy()
    w = np.asarray(w)
    assert g.shape == w.shape, stage
    scale = np.abs(g).max()
    assert scale > 0, stage
    np.testing.assert_allclose(w, g, rtol=1e-4, atol=1e-4 * scale,
                               err_msg=stage)


# ----------------------------------------------------------------------------
# Architecture, logs and errors.


@pytest.mark.parametrize("depth,width,stem", [
    (10, 8, "cifar"), (18, 16, "imagenet"), (34, 8, "imagenet"),
    (50, 16, "cifar")])
def test_architecture_is_inferred_from_the_tensors(depth, width, stem,
                                                   tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  path = tmp_path / "model.pth"
  torch.save(torch_resnet.ResNet(depth, width, stem).state_dict(), path)
  imported = backbone_file.read(str(path))
  assert imported.arch == backbone_file.Arch(depth, width, stem)
  # The config may name what the file has.
  named = {"depth": depth, "width": width, "stem": stem}
  assert backbone_file.read(str(path), named).arch == imported.arch


def test_moco_checkpoint_takes_the_query_encoder_and_says_so(tmp_path,
                                                             caplog):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.ResNet(10, 8, "cifar").eval()
  path = tmp_path / "checkpoint_0199.pth.tar"
  torch.save(_moco_checkpoint(model), path)
  caplog.set_level("INFO")
  backbone = pretrained.load_file(str(path))
  want = {k: v for k, v in _backbone_tensors(model).items()
          if not k.endswith("num_batches_tracked")}
  got = names.torchvision_state_dict(backbone.variables)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  log = caplog.text
  assert (f"{path} (torch zip, ['state_dict']): took 60 tensors of ResNet-10 "
          "(width 8, cifar stem) under 'module.encoder_q.' (torchvision "
          "names); dropped 12 num_batches_tracked tensors and the heads "
          "module.encoder_q.fc.* (4); ignored module.encoder_k.* (76), "
          "module.queue, module.queue_ptr.") in log


def _save_state(torch_module, tmp_path, edit, name="edited.pth"):
  """torch.save of a state dict after `edit(state_dict)`."""
  import torch  # pylint: disable=g-import-not-at-top
  state = torch_module.state_dict()
  edit(state)
  path = tmp_path / name
  torch.save(state, path)
  return str(path)


def test_each_bad_file_is_one_line_naming_key_and_shapes(tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.ResNet(18, 8)

  def fails(path, pattern, **settings):
    with pytest.raises(ValueError) as error:
      pretrained.load_file(path, settings)
    assert "\n" not in str(error.value)
    assert path in str(error.value)
    assert re.search(pattern, str(error.value)), str(error.value)

  plain = _save_state(model, tmp_path, lambda s: None, "plain.pth")
  # The architecture the config names does not fit: the first key, both
  # shapes.
  fails(plain, r"layer1\.0\.conv1\.weight has shape \[8, 8, 3, 3\] in the "
        r"file but \[8, 8, 1, 1\] in ResNet-50 \(width 8, imagenet stem\), "
        r"named by the config\.", depth=50)
  fails(plain, r"conv1\.weight has shape \[8, 3, 7, 7\] in the file but "
        r"\[8, 3, 3, 3\] in ResNet-18 \(width 8, cifar stem\)", stem="cifar")
  fails(plain, r"no layer1\.2\.conv1\.weight \(shape \[8, 8, 3, 3\] in "
        r"ResNet-34 .*named by the config\); 80 missing in all", depth=34)
  # Missing and unexpected keys, a bad shape, a non-float tensor.
  fails(_save_state(model, tmp_path,
                    lambda s: s.pop("layer3.0.bn2.running_var")),
        r"no layer3\.0\.bn2\.running_var \(shape \[32\] in ResNet-18 "
        r"\(width 8, imagenet stem\), inferred from the file\)")
  fails(_save_state(model, tmp_path, lambda s: s.update(
      {"layer2.1.extra.weight": torch.ones(3)})),
        r"unexpected key layer2\.1\.extra\.weight \(shape \[3\]\), not a "
        r"tensor of ResNet-18")
  fails(_save_state(model, tmp_path, lambda s: s.update(
      {"layer2.1.conv2.weight": torch.ones(16, 16, 5, 5)})),
        r"layer2\.1\.conv2\.weight has shape \[16, 16, 5, 5\] in the file "
        r"but \[16, 16, 3, 3\] in ResNet-18")
  fails(_save_state(model, tmp_path, lambda s: s.update(
      {"layer4.0.bn1.weight": torch.ones(64, dtype=torch.int32)})),
        r"layer4\.0\.bn1\.weight holds int32, not floating-point")
  # Not a ResNet: another network, a stem of another kind, a depth the
  # project does not build, Caffe2's names, no state dict.
  other = tmp_path / "vit.pth"
  torch.save({"cls_token": torch.zeros(1, 1, 8),
              "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, other)
  fails(str(other), r"is not a ResNet state dict: no conv1\.weight .*its "
        r"keys: blocks\.0\.attn\.qkv\.weight, cls_token")
  fails(_save_state(model, tmp_path, lambda s: s.update(
      {"conv1.weight": torch.ones(8, 3, 5, 5)})),
        r"conv1\.weight has shape \[8, 3, 5, 5\], not a ResNet stem's")
  fails(_save_state(model, tmp_path, lambda s: [
      s.pop(k) for k in list(s) if k.startswith("layer4.1.")]),
        r"a ResNet of \[2, 2, 2, 1\] basic blocks per stage, which is none "
        r"of the depths")
  caffe2 = tmp_path / "R-50.pkl"
  caffe2.write_bytes(pickle.dumps({"blobs": {
      "conv1_w": np.ones((64, 3, 7, 7), np.float32),
      "res2_0_branch2a_w": np.ones((64, 64, 1, 1), np.float32)}}))
  fails(str(caffe2), r"has Caffe2-style names \(conv1_w, \.\.\.\)")
  listing = tmp_path / "list.pkl"
  listing.write_bytes(pickle.dumps([np.ones(3)]))
  fails(str(listing), r"a pickle file holding a list, not a state dict")
  # Bad settings.
  with pytest.raises(ValueError, match="channels must be 'RGB' or 'BGR'"):
    pretrained.load_file(plain, {"channels": "rgb"})
  with pytest.raises(ValueError, match="pretrained_file.colour is no"):
    pretrained.file_settings({"colour": 1})


def test_a_file_without_bn_statistics_is_refused_unless_measured(tmp_path):
  pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  model = torch_resnet.ResNet(10, 8, "cifar")
  path = _save_state(model, tmp_path, lambda s: [
      s.pop(k) for k in list(s) if "running" in k or "batches" in k])
  with pytest.raises(ValueError, match=(
      r"has no BN running statistics \(no bn1\.running_mean, \.\.\.\): "
      r"the probes can measure them .*pretrained_file\.bn_batches=N")):
    pretrained.load_file(path)
  # Told to measure them, the loader leaves them at their init.
  backbone = pretrained.load_file(path, {"bn_batches": 2})
  stats = _flat(backbone.variables["batch_stats"])
  assert stats and all((v == (0 if k.endswith("mean") else 1)).all()
                       for k, v in stats.items())


def test_a_step_for_a_file_is_an_error(tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet  # pylint: disable=g-import-not-at-top
  path = tmp_path / "r10.pth"
  torch.save(torch_resnet.ResNet(10, 8, "cifar").state_dict(), path)
  config = linear_probe.get_config("tiny")
  config.pretrained, config.pretrained_step = str(path), 3
  with pytest.raises(ValueError, match="is a checkpoint file: drop the step"):
    pretrained.for_probe(config)
  with pytest.raises(ValueError, match="is a checkpoint file: drop the step"):
    export.run(str(path), "torchvision", str(tmp_path / "x.pth"), step=3)
  assert not (tmp_path / "x.pth").exists()
  with pytest.raises(FileNotFoundError,
                     match="neither a checkpoint file nor a pretraining"):
    export.run(str(tmp_path / "nothing.pth"), "torchvision",
               str(tmp_path / "x.pth"))
  # With random_init, only the architecture is taken from the file.
  config.pretrained_step, config.random_init = None, True
  floor = pretrained.for_probe(config)
  assert floor.source == "random init 0"
  assert (floor.module.depth, floor.module.width, floor.module.stem) == (
      10, 8, "cifar")


# ----------------------------------------------------------------------------
# Normalisation and config.


def test_input_conventions_of_file_backbones():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3),
                                             dtype=np.uint8)
  arch = backbone_file.Arch(10, 8, "cifar")
  torchvision = pretrained.file_config(arch, pretrained.file_settings()).aug
  # torchvision's ToTensor + Normalize...
  mean, std = np.float32([0.485, 0.456, 0.406]), np.float32(
      [0.229, 0.224, 0.225])
  want = (images.astype(np.float32) / np.float32(255) - mean) / std
  got = np.asarray(features.preprocess(images, torchvision))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # ... and bit for bit what a pretraining run's ImageNet config gives.
  np.testing.assert_array_equal(
      got, features.preprocess(images, detco.get_config().aug))
  # Caffe2's convention: BGR in 0..255, minus a BGR mean.
  caffe2 = pretrained.file_config(arch, pretrained.file_settings(dict(
      mean=(103.53, 116.28, 123.675), std=(1.0, 1.0, 1.0),
      pixel_range=255.0, channels="BGR"))).aug
  want = images[..., ::-1].astype(np.float32) - np.float32(
      [103.53, 116.28, 123.675])
  np.testing.assert_allclose(features.preprocess(images, caffe2), want,
                             rtol=1e-6)


def test_probe_configs_default_to_torchvisions_convention():
  defaults = dict(pretrained.FILE_DEFAULTS)
  for config in (linear_probe.get_config(), dense_probe.get_config()):
    assert config.pretrained_file.to_dict() == defaults
  # Detection trains BN: there is nothing to measure.
  del defaults["bn_batches"]
  assert detection_config.get_config().pretrained_file.to_dict() == defaults


# ----------------------------------------------------------------------------
# Command line.


def test_export_cli_a_bad_file_is_one_line_and_exit_1(tmp_path):
  marker = tmp_path / "ran"
  bad = tmp_path / "moco.pth.tar"
  bad.write_bytes(_malicious_files(marker)["torch_zip"][0])
  out = tmp_path / "out.pkl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-m", "detco_jax.export", f"--pretrained={bad}",
       "--format=detectron2", f"--out={out}"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"Error: Refusing to load "
                         f"'posix.system' from {bad}: not a tensor file "
                         "global"), last
  assert not out.exists() and not marker.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["moco.pth.tar"]
