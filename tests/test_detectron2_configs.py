"""The detectron2 route: configs/detectron2/ and the `.pkl` it loads.

Three groups of checks:

* the export equals, tensor for tensor, what MoCo's converter makes of the
  same backbone (its rules re-stated below, `moco_convert`), on the tiny
  pretraining run and on a ResNet-50;
* every YAML of configs/detectron2/ parses with its `_BASE_` chain, and the
  merged config has the export's input convention and the schedules of the
  DetCo / MoCo / detectron2 configs it comes from;
* where detectron2 is importable, each config builds its model and the
  export loads into it with no backbone tensor missing (skipped otherwise).
"""

import ast
import glob
import importlib.util
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import pytest
import yaml

from configs import detco
from detco_jax import export
from detco_jax import pretrained
from detco_jax.interop import safe_pickle
from tests.moco_convert import moco_convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs", "detectron2")
TRAIN_NET = os.path.join(CONFIG_DIR, "train_net.py")
# What a user runs (the `Base-*.yaml` files are only bases).
LEAVES = sorted(
    os.path.basename(p)
    for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
    if not os.path.basename(p).startswith("Base-"))


# ----------------------------------------------------------------------------
# MoCo's converter.


def assert_export_is_mocos(ours: Mapping[str, Any],
                           moco: Mapping[str, Any]) -> None:
  """Our detectron2 file equals MoCo's converter's but for the known gaps.

  The known gaps: `__author__` ("detco_jax" vs "MOCO"; detectron2 reads
  the value only to tell Caffe2 files apart) and BN's
  `num_batches_tracked`, which MoCo keeps and the export drops (torch's BN
  fills a missing count itself; detectron2's FrozenBN has none).

  Args:
    ours: the export's file, read back.
    moco: `moco_convert` of the same backbone.
  """
  assert set(ours) == set(moco) == {"model", "__author__",
                                    "matching_heuristics"}
  assert ours["matching_heuristics"] is True
  assert moco["matching_heuristics"] is True
  assert (ours["__author__"], moco["__author__"]) == ("detco_jax", "MOCO")
  counts = [k for k in moco["model"] if k.endswith(".num_batches_tracked")]
  assert counts
  # Same names in the same order, once MoCo's batch counts are left out.
  assert list(ours["model"]) == [k for k in moco["model"] if k not in counts]
  for key, value in ours["model"].items():
    want = moco["model"][key]
    assert isinstance(value, np.ndarray), key
    assert (value.dtype, value.shape) == (want.dtype, want.shape), key
    np.testing.assert_array_equal(value, want, err_msg=key)
  for key in counts:
    assert moco["model"][key].dtype == np.int64, key


def export_both(backbone: pretrained.Backbone, folder) -> tuple[dict, dict]:
  """The backbone exported in both formats and read back without torch.

  Args:
    backbone: what to export.
    folder: a pathlib folder for the files.

  Returns:
    (torchvision state dict, detectron2 checkpoint dict).
  """
  tv, d2 = folder / "backbone.pth", folder / "backbone.pkl"
  export.export(backbone, "torchvision", str(tv))
  export.export(backbone, "detectron2", str(d2))
  return (safe_pickle.read_file(str(tv)).obj,
          safe_pickle.read_file(str(d2)).obj)


def as_moco_checkpoint(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A torchvision state dict under MoCo's query-encoder prefix."""
  return {f"module.encoder_q.{k}": v for k, v in state_dict.items()}


def random_resnet50(width: int = 64) -> pretrained.Backbone:
  """The default config's ResNet-50 with random values, never compiled.

  The variable tree comes from tracing `random_init` (compiling ResNet-50's
  init takes tens of seconds on 2 cores); BN statistics are drawn away from
  their init so that a mix-up of them would show.

  Args:
    width: channels of the first stage's 3x3 convs (64: torchvision's).

  Returns:
    The backbone.
  """
  config = detco.get_config()
  config.model.width = width
  shapes = jax.eval_shape(lambda: pretrained.random_init(config).variables)
  rng = np.random.default_rng(0)

  def draw(path, x):
    low = 0.5 if path[-1].key in ("scale", "var") else -0.5
    return rng.uniform(low, low + 1.0, x.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return pretrained.Backbone(pretrained.resnet_of(config), variables, config,
                             0, f"random ResNet-50 of width {width}")


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory) -> tuple[str, dict, dict]:
  """(detectron2 file, torchvision dict, detectron2 dict) of a ResNet-50."""
  folder = tmp_path_factory.mktemp("r50")
  tv, d2 = export_both(random_resnet50(), folder)
  return str(folder / "backbone.pkl"), tv, d2


def test_moco_rules_restated_on_known_names():
  names = ["conv1.weight", "bn1.running_var", "layer1.0.bn3.bias",
           "layer1.0.downsample.0.weight", "layer4.2.bn2.num_batches_tracked",
           "layer2.0.downsample.1.running_mean", "fc.0.weight"]
  sd = {f"module.encoder_q.{n}": np.zeros(1) for n in names}
  sd["module.encoder_k.conv1.weight"] = np.zeros(1)  # Not taken.
  sd["module.queue"] = np.zeros(1)
  assert list(moco_convert(sd)["model"]) == [
      "stem.conv1.weight", "stem.conv1.norm.running_var",
      "res2.0.conv3.norm.bias", "res2.0.shortcut.weight",
      "res5.2.conv2.norm.num_batches_tracked",
      "res3.0.shortcut.norm.running_mean", "stem.fc.0.weight"]


def test_export_equals_moco_converter_on_the_tiny_run(tiny_pretrain_workdir,
                                                      tmp_path):
  # ResNet-10 of width 8: basic blocks (conv1/bn1, conv2/bn2), which MoCo's
  # substring rules rename as they do bottlenecks.
  tv, d2 = export_both(pretrained.load(tiny_pretrain_workdir), tmp_path)
  assert "layer1.0.conv3.weight" not in tv
  assert_export_is_mocos(d2, moco_convert(as_moco_checkpoint(tv)))


def test_export_equals_moco_converter_on_resnet50(resnet50_files):
  _, tv, d2 = resnet50_files
  assert tv["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
  moco = moco_convert(as_moco_checkpoint(tv))
  assert_export_is_mocos(d2, moco)
  # 53 convs and 53 BNs of 4 tensors each, as detectron2's R50 has them.
  assert len(d2["model"]) == 53 * 5 == len(moco["model"]) - 53


def test_moco_checkpoint_through_the_export(tmp_path):
  """A MoCo training checkpoint: our export vs MoCo's converter on it."""
  torch = pytest.importorskip("torch")
  # Bottleneck names at a quarter of the width: the import replicates the
  # file's tensors on each of the 8 test devices.
  tv, _ = export_both(random_resnet50(width=16), tmp_path)
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           as_moco_checkpoint(tv).items()}
  for k in state:
    if k.endswith("num_batches_tracked"):
      state[k] = torch.tensor(7)  # A real run's count, not 0.
  state["module.encoder_q.fc.0.weight"] = torch.ones(4, 512)  # MLP head.
  state["module.encoder_q.fc.0.bias"] = torch.ones(4)
  state["module.encoder_k.conv1.weight"] = torch.ones(1)
  state["module.queue"] = torch.ones(2, 3)
  path = tmp_path / "moco.pth.tar"
  torch.save({"epoch": 1, "arch": "resnet50", "state_dict": state}, path)
  out = tmp_path / "moco.pkl"
  export.run(str(path), "detectron2", str(out))
  ours = safe_pickle.read_file(str(out)).obj
  moco = moco_convert(torch.load(path, weights_only=True)["state_dict"])
  # MoCo's converter keeps the head, which the export never writes.
  head = {k: moco["model"].pop(k) for k in list(moco["model"])
          if k.startswith("stem.fc.")}
  assert sorted(head) == ["stem.fc.0.bias", "stem.fc.0.weight"]
  assert_export_is_mocos(ours, moco)


def test_torch_bn_fills_the_counts_the_export_drops(resnet50_files):
  """Loading the export leaves no `num_batches_tracked` missing in torch."""
  torch = pytest.importorskip("torch")
  _, _, d2 = resnet50_files
  bn = torch.nn.Sequential()
  bn.add_module("norm", torch.nn.BatchNorm2d(64))
  # A plain dict, as detectron2's name matching hands torch.
  sd = {k.replace("stem.conv1.", ""): torch.from_numpy(v)
        for k, v in d2["model"].items() if k.startswith("stem.conv1.norm.")}
  result = bn.load_state_dict(sd, strict=False)
  assert not result.missing_keys and not result.unexpected_keys


# ----------------------------------------------------------------------------
# The YAML files.


def _decode(value: Any) -> Any:
  """A YAML value as detectron2's yacs reads it: "(1, 2)" is a tuple."""
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, str):
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def _merge(base: dict, child: dict) -> dict:
  """`child` over `base`, recursively (how `_BASE_` merges)."""
  out = dict(base)
  for key, value in child.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = value
  return out


def chain(name: str) -> list[str]:
  """The files of a config's `_BASE_` chain, the config first.

  Args:
    name: a file name in configs/detectron2/.

  Returns:
    Absolute paths, each existing.
  """
  paths = [os.path.join(CONFIG_DIR, name)]
  while True:
    with open(paths[-1], encoding="utf-8") as f:
      base = yaml.safe_load(f).get("_BASE_")
    if base is None:
      return paths
    assert not os.path.isabs(base) and "://" not in base, base
    path = os.path.normpath(os.path.join(os.path.dirname(paths[-1]), base))
    assert os.path.isfile(path), f"{paths[-1]}: _BASE_ {base} not found"
    assert os.path.dirname(path) == CONFIG_DIR, f"{base} is outside"
    assert path not in paths, f"_BASE_ cycle at {path}"
    paths.append(path)


def merged(name: str) -> dict:
  """A config with its bases merged, without `_BASE_`."""
  out = {}
  for path in reversed(chain(name)):
    with open(path, encoding="utf-8") as f:
      out = _merge(out, _decode(yaml.safe_load(f)))
  out.pop("_BASE_", None)
  return out


# What each config is, as its source config (merged with its own bases)
# gives it: DetCo's benchmarks/detection/configs/<source> and MoCo's
# detection/configs/<source> (pascal_voc), both over detectron2's bases.
# (meta architecture, MASK_ON, RESNETS.NORM, MAX_ITER, STEPS,
#  IMS_PER_BATCH, BASE_LR, DATASETS.TRAIN)
COCO = ("coco_2017_train",)
EXPECTED = {
    "coco_R_50_RetinaNet_1x.yaml":  # coco_R_50_RetinaNet_1x_moco.yaml
        ("RetinaNet", None, "SyncBN", 90000, (60000, 80000), 16, 0.01, COCO),
    "coco_R_50_RetinaNet_12k.yaml":  # coco_R_50_RetinaNet_12k_moco.yaml
        ("RetinaNet", None, "SyncBN", 12000, (9000, 11000), 16, 0.01, COCO),
    "coco_R_50_FPN_1x.yaml":  # coco_R_50_FPN_1x_moco.yaml
        ("GeneralizedRCNN", True, "SyncBN", 90000, (60000, 80000), 16, 0.02,
         COCO),
    "coco_R_50_C4_1x.yaml":  # coco_R_50_C4_1x_moco.yaml
        ("GeneralizedRCNN", True, "SyncBN", 90000, (60000, 80000), 16, 0.02,
         COCO),
    "pascal_voc_R_50_C4_24k.yaml":  # MoCo's pascal_voc_R_50_C4_24k_moco.yaml
        ("GeneralizedRCNN", False, "naiveSyncBN", 24000, (18000, 22000), 16,
         0.02, ("voc_2007_trainval", "voc_2012_trainval")),
    "cityscapes_mask_rcnn_R_50_FPN.yaml":  # Cityscapes/mask_rcnn_R_50_FPN_moco
        ("GeneralizedRCNN", True, "SyncBN", 24000, (18000,), 8, 0.01,
         ("cityscapes_fine_instance_seg_train",)),
}
# detectron2's config sections (detectron2/config/defaults.py): the top
# level and MODEL's nodes these configs may touch.
SECTIONS = {"_BASE_", "MODEL", "INPUT", "DATASETS", "DATALOADER", "SOLVER",
            "TEST", "VERSION", "OUTPUT_DIR", "SEED", "CUDNN_BENCHMARK"}
MODEL_NODES = {
    "META_ARCHITECTURE", "WEIGHTS", "MASK_ON", "KEYPOINT_ON", "PIXEL_MEAN",
    "PIXEL_STD", "BACKBONE", "RESNETS", "FPN", "ANCHOR_GENERATOR", "RPN",
    "ROI_HEADS", "ROI_BOX_HEAD", "ROI_MASK_HEAD", "RETINANET"}


def test_the_configs_are_there():
  assert sorted(EXPECTED) == LEAVES
  bases = {os.path.basename(p) for name in LEAVES for p in chain(name)[1:]
           if os.path.basename(p).startswith("Base-")}
  assert bases == {os.path.basename(p) for p in glob.glob(
      os.path.join(CONFIG_DIR, "Base-*.yaml"))}


@pytest.mark.parametrize("name", sorted(
    os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_each_file_parses_in_known_sections(name):
  path = os.path.join(CONFIG_DIR, name)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("# "), "a comment header says what it is"
  config = yaml.safe_load(text)  # No python/ tags: safe to load.
  assert set(config) <= SECTIONS, sorted(set(config) - SECTIONS)
  assert set(config.get("MODEL", {})) <= MODEL_NODES
  chain(name)  # Every base exists.


@pytest.mark.parametrize("name", LEAVES)
def test_merged_config_matches_export_and_source(name):
  c = merged(name)
  model = c["MODEL"]
  # The export's input convention, from the project's own constants: the
  # pretraining config's and a checkpoint file's default (0..1 RGB).
  aug = detco.get_config().aug
  assert tuple(aug.mean) == tuple(pretrained.FILE_DEFAULTS["mean"])
  assert tuple(aug.std) == tuple(pretrained.FILE_DEFAULTS["std"])
  assert pretrained.FILE_DEFAULTS["channels"] == "RGB"
  assert pretrained.FILE_DEFAULTS["pixel_range"] == 1.0
  np.testing.assert_allclose(model["PIXEL_MEAN"], 255 * np.array(aug.mean),
                             rtol=1e-12)
  np.testing.assert_allclose(model["PIXEL_STD"], 255 * np.array(aug.std),
                             rtol=1e-12)
  assert c["INPUT"]["FORMAT"] == "RGB"
  assert model["RESNETS"]["STRIDE_IN_1X1"] is False
  assert model["RESNETS"].get("DEPTH", 50) == 50  # detectron2's default.
  assert model["BACKBONE"]["FREEZE_AT"] == 0  # Every source trains all.
  assert model["WEIGHTS"] == "r50_detco.pkl"
  assert c["TEST"]["PRECISE_BN"]["ENABLED"] is True
  assert c["VERSION"] == 2  # No version guess in detectron2.

  arch, mask_on, norm, max_iter, steps, batch, lr, train = EXPECTED[name]
  assert model["META_ARCHITECTURE"] == arch
  assert model.get("MASK_ON") == mask_on
  assert model["RESNETS"]["NORM"] == norm
  if "fpn" in model.get("BACKBONE", {}).get("NAME", ""):
    assert model["FPN"]["NORM"] == "SyncBN"
  solver = c["SOLVER"]
  assert (solver["MAX_ITER"], solver["STEPS"]) == (max_iter, steps)
  assert (solver["IMS_PER_BATCH"], solver["BASE_LR"]) == (batch, lr)
  assert c["DATASETS"]["TRAIN"] == train


def test_retinanet_anchor_sizes_are_detectrons():
  # detectron2's Base-RetinaNet.yaml builds them with a YAML eval tag.
  sizes = merged("coco_R_50_RetinaNet_1x.yaml")["MODEL"]["ANCHOR_GENERATOR"]
  want = [[x, x * 2**(1.0 / 3), x * 2**(2.0 / 3)]
          for x in [32, 64, 128, 256, 512]]
  assert sizes["SIZES"] == want


def test_c4_configs_name_the_head_train_net_registers():
  with open(TRAIN_NET, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  registered = {
      node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
      and any("ROI_HEADS_REGISTRY" in ast.unparse(d)
              for d in node.decorator_list)}
  assert registered == {"Res5ROIHeadsExtraNorm"}
  heads = {merged(n)["MODEL"].get("ROI_HEADS", {}).get("NAME") for n in LEAVES
           if "_C4_" in n}
  assert heads == registered


# ----------------------------------------------------------------------------
# With detectron2 (not installed by this project).


def _register_head() -> None:
  """Imports train_net.py once, which registers the C4 head."""
  if "detco_detectron2_train_net" in globals():
    return
  spec = importlib.util.spec_from_file_location("detco_detectron2_train_net",
                                                TRAIN_NET)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  globals()["detco_detectron2_train_net"] = module


@pytest.mark.parametrize("name", LEAVES)
def test_detectron2_builds_each_model_and_loads_the_export(name,
                                                           resnet50_files):
  pytest.importorskip("detectron2")
  # pylint: disable=g-import-not-at-top
  from detectron2.checkpoint import DetectionCheckpointer
  from detectron2.config import get_cfg
  from detectron2.modeling import build_model
  # pylint: enable=g-import-not-at-top
  _register_head()
  cfg = get_cfg()
  cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
  cfg.MODEL.DEVICE = "cpu"
  model = build_model(cfg)
  checkpointer = DetectionCheckpointer(model)
  path = resnet50_files[0]
  incompatible = checkpointer._load_model(  # pylint: disable=protected-access
      checkpointer._load_file(path))  # pylint: disable=protected-access
  backbone = [k for k in model.state_dict()
              if re.search(r"(^|\.)(stem|res[2-5])\.", k)
              and ".res5.norm." not in k  # The C4 head's new norm.
              and not k.endswith("num_batches_tracked")]
  assert len(backbone) == 53 * 5
  assert not set(backbone) & set(incompatible.missing_keys)
  assert not incompatible.unexpected_keys
  assert not incompatible.incorrect_shapes


def _training_inputs(cfg, torch):
  """Two small images with two boxes each (and masks where the model has a
  mask head), as detectron2's DatasetMapper hands them to a model."""
  # pylint: disable=g-import-not-at-top
  from detectron2.structures import BitMasks, Boxes, Instances
  # pylint: enable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  inputs = []
  for h, w in ((224, 288), (256, 192)):
    instances = Instances((h, w))
    boxes = torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 40.0, 180.0,
                                                       190.0]])
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([0, 1])
    if cfg.MODEL.MASK_ON:
      masks = torch.zeros((2, h, w), dtype=torch.bool)
      for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        mask[y1:y2, x1:x2] = True
      instances.gt_masks = BitMasks(masks)
    image = torch.rand((3, h, w), generator=generator) * 255
    inputs.append({"image": image, "instances": instances, "height": h,
                   "width": w})
  return inputs


@pytest.mark.parametrize("name", LEAVES)
def test_detectron2_trains_one_iteration_from_the_export(name, resnet50_files):
  """Each shipped config's model, started from the export, takes one SGD
  step on two images: finite losses, and the backbone's weights move."""
  pytest.importorskip("detectron2")
  torch = pytest.importorskip("torch")
  # pylint: disable=g-import-not-at-top
  from detectron2.checkpoint import DetectionCheckpointer
  from detectron2.config import get_cfg
  from detectron2.modeling import build_model
  from detectron2.utils.events import EventStorage
  # pylint: enable=g-import-not-at-top
  _register_head()
  cfg = get_cfg()
  cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
  cfg.MODEL.DEVICE = "cpu"
  torch.manual_seed(0)
  model = build_model(cfg)
  DetectionCheckpointer(model).load(resnet50_files[0])
  model.train()
  stem = next(p for n, p in model.named_parameters() if "stem.conv1" in n)
  before = stem.detach().clone()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  with EventStorage():  # Where detectron2's trainer logs the losses.
    losses = model(_training_inputs(cfg, torch))
  total = sum(losses.values())
  assert all(torch.isfinite(v) for v in losses.values()), losses
  optimizer.zero_grad()
  total.backward()
  optimizer.step()
  assert not torch.equal(stem.detach(), before)
