"""A checkpoint file's ResNet: which tensors, which architecture.

`read` takes the file's contents (`safe_pickle`) apart:

1. The state dict: the file itself (torchvision's `torch.save(
   model.state_dict())`), its `"state_dict"` (MoCo's and DetCo's training
   checkpoints, OpenSelfSup's) or its `"model"` (detectron2's `.pkl` and
   `.pth`).
2. The backbone's prefix: the first of `PREFIXES` under which the state dict
   has a ResNet stem (`conv1.weight` in torchvision's names,
   `stem.conv1.weight` in detectron2's). MoCo's query encoder
   (`module.encoder_q.`) comes before anything else; the key encoder, the
   queue and whatever else lies outside the prefix are ignored, and the log
   says what.
3. detectron2's names become torchvision's (`names.torchvision_name`), and
   the heads under the prefix (`fc.*`: torchvision's classifier, MoCo's MLP)
   are dropped.
4. The architecture comes from the tensors: the stem from conv1's kernel
   (7x7: ImageNet's 7x7/2 + max-pool; 3x3: the CIFAR 3x3/1 without pool),
   the width from its output channels, basic or bottleneck blocks from
   `layer1.0.conv3`, and the depth from the blocks per stage. The config may
   name any of them instead.
5. Every tensor is checked against that `models.resnet.ResNet`: a missing,
   unexpected or misshapen one is a `ValueError` that names it.

BN running statistics come from the file. A file without any is refused,
unless the caller will measure them (`require_bn_stats=False`); they are
then left at their init (mean 0, var 1).
"""

import collections
import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from detco_jax.interop import names
from detco_jax.interop import safe_pickle
from detco_jax.models import resnet

# Where checkpoints keep their ResNet, tried in this order: MoCo's and
# DetCo's query encoder (under DistributedDataParallel's "module." or not;
# OpenSelfSup's Sequential adds ".0"), MoCo v3's base encoder, detectron2's
# FPN bottom-up, a bare backbone, SimSiam-style "encoder.", DataParallel's
# "module.", and no prefix.
PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder_q.0.",
            "encoder_q.0.", "module.base_encoder.", "base_encoder.",
            "module.backbone.bottom_up.", "backbone.bottom_up.",
            "module.backbone.", "backbone.", "module.encoder.", "encoder.",
            "module.", "")
# The stem's kernel under each naming scheme.
_ANCHORS = {"torchvision": "conv1.weight", "detectron2": "stem.conv1.weight"}
# Under the prefix, but no part of the backbone: torchvision's classifier and
# MoCo's MLP projection head (MoCo's detectron2 converter makes it
# `stem.fc.*`, which `names.torchvision_name` turns back into `fc.*`).
HEADS = ("fc.",)
# Caffe2-era detectron names (MSRA's ResNets in Detectron's model zoo).
_CAFFE2 = re.compile(r"(res\d+_\d+_branch\w+|res_conv1_bn_\w+|conv1_w)$")
# conv1's kernel side -> the stem.
_STEMS = {7: "imagenet", 3: "cifar"}
# Statistics, which a file may lack (see `read`).
_STATS = (".running_mean", ".running_var")
_COUNT = ".num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class Arch:
  """A `models.resnet.ResNet`'s architecture."""
  depth: int
  width: int
  stem: str

  def __str__(self) -> str:
    return f"ResNet-{self.depth} (width {self.width}, {self.stem} stem)"


@dataclasses.dataclass(frozen=True)
class Imported:
  """The backbone a checkpoint file holds.

  Attributes:
    arch: its architecture.
    variables: `{"params": ..., "batch_stats": ...}` of that ResNet, float32
      numpy arrays.
    bn_stats: whether the BN statistics came from the file (False: they are
      at their init, to be measured).
    container: "torch zip", "torch legacy" or "pickle".
    summary: one line for the log: what was taken from where, what was
      dropped or ignored.
  """
  arch: Arch
  variables: dict[str, Any]
  bn_stats: bool
  container: str
  summary: str


def expected_shapes(arch: Arch) -> "collections.OrderedDict[str, tuple]":
  """torch name -> torch shape of every tensor of `arch`'s state dict."""
  module = resnet.ResNet(depth=arch.depth, width=arch.width, stem=arch.stem)
  # Traced only: the shapes do not depend on the input's size.
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  return names.torchvision_shapes(shapes)


def _state_dict(obj: Any, path: str, container: str
                ) -> tuple[Mapping[str, Any], str]:
  """The checkpoint's tensor dict, and where it sits ("" or "['model']")."""
  if isinstance(obj, dict):
    # "blobs": Detectron's Caffe2 files, refused by name below.
    for key in ("state_dict", "model", "blobs"):
      if isinstance(obj.get(key), dict):
        return obj[key], f"[{key!r}]"
    if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
      return obj, ""
    what = f"a dict with keys {sorted(map(str, obj))[:8]}"
  else:
    what = f"a {type(obj).__name__}"
  raise ValueError(
      f"{path}: a {container} file holding {what}, not a state dict: "
      "expected tensors by name, or a dict with 'state_dict' (MoCo, DetCo) "
      "or 'model' (detectron2).")


def _backbone_prefix(keys: set[str], path: str) -> tuple[str, str]:
  """(prefix, naming scheme) of the ResNet among `keys`."""
  for prefix in PREFIXES:
    for scheme, anchor in _ANCHORS.items():
      if prefix + anchor in keys:
        return prefix, scheme
  caffe2 = sorted(k for k in keys if _CAFFE2.match(k))
  if caffe2:
    raise ValueError(
        f"{path} has Caffe2-style names ({caffe2[0]}, ...): Detectron's "
        "MSRA ResNets put the stride in the 1x1 conv and take BGR 0..255 "
        "input, unlike this project's ResNet (torchvision's v1.5); use a "
        "torchvision-layout checkpoint.")
  first = ", ".join(sorted(keys)[:4])
  raise ValueError(
      f"{path} is not a ResNet state dict: no conv1.weight (torchvision "
      "names) or stem.conv1.weight (detectron2 names) at the top or under "
      f"any of {', '.join(p for p in PREFIXES if p)}; its keys: {first}, "
      "...")


def _groups(keys: list[str], prefix: str = "") -> str:
  """Keys summarised by module, e.g. "module.encoder_k.* (320), module.queue".

  A group is the key's first component after `prefix` and any wrapper
  ("module.", detectron2's "stem.").
  """
  counts = collections.Counter()
  for key in keys:
    parts = key[len(prefix):].split(".")
    keep = 1
    while keep < len(parts) and parts[keep - 1] in ("module", "stem"):
      keep += 1
    counts[prefix + ".".join(parts[:keep])
           + (".*" if len(parts) > keep else "")] += 1
  return ", ".join(g if n == 1 else f"{g} ({n})" for g, n in counts.items())


def infer_arch(shapes: Mapping[str, tuple], path: str) -> Arch:
  """The ResNet a torchvision-named state dict's shapes describe.

  Args:
    shapes: torchvision tensor name -> shape.
    path: the file, for messages.

  Returns:
    The architecture.

  Raises:
    ValueError: for a stem or block layout that this project's ResNet does
      not have.
  """
  stem = tuple(shapes["conv1.weight"])
  if (len(stem) != 4 or stem[1] != 3 or stem[2] != stem[3]
      or stem[3] not in _STEMS):
    raise ValueError(
        f"{path}: conv1.weight has shape {list(stem)}, not a ResNet stem's "
        "(a 7x7 conv with max-pool, or the CIFAR 3x3 conv, on 3 channels).")
  bottleneck = "layer1.0.conv3.weight" in shapes
  blocks = tuple(
      len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")})
      for i in range(1, 5))
  for depth, (block, sizes) in resnet.ARCHS.items():
    if tuple(sizes) == blocks and (block.expansion == 4) == bottleneck:
      return Arch(depth, stem[0], _STEMS[stem[3]])
  kind = "bottleneck" if bottleneck else "basic"
  raise ValueError(
      f"{path}: a ResNet of {list(blocks)} {kind} blocks per stage, which "
      "is none of the depths this project builds (10, 18 and 34: basic "
      "blocks [1, 1, 1, 1], [2, 2, 2, 2], [3, 4, 6, 3]; 50: bottleneck "
      "[3, 4, 6, 3]).")


def _target_arch(inferred: Arch, named: Mapping[str, Any]) -> Arch:
  """`inferred`, with what the config names instead."""
  values = {f: named.get(f) for f in ("depth", "width", "stem")}
  if values["depth"] is not None and values["depth"] not in resnet.ARCHS:
    raise ValueError(f"Bad config: the named depth {values['depth']} must be "
                     f"one of {sorted(resnet.ARCHS)}.")
  if values["stem"] not in (None, *_STEMS.values()):
    raise ValueError(f"Bad config: the named stem {values['stem']!r} must be "
                     f"one of {list(_STEMS.values())}.")
  return dataclasses.replace(inferred, **{
      f: v for f, v in values.items() if v is not None})


def _check(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
           arch: Arch, how: str, shown: Mapping[str, str], path: str) -> None:
  """Raises for the first missing, unexpected or misshapen tensor."""
  expected = {k: v for k, v in expected.items() if not k.endswith(_COUNT)}
  given = {k: v for k, v in tensors.items() if not k.endswith(_COUNT)}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  for name in [*expected, *unexpected]:
    if name in missing:
      raise ValueError(
          f"{path}: no {shown[name]} (shape {list(expected[name])} in {arch}, "
          f"{how}); {len(missing)} missing in all, e.g. "
          f"{', '.join(shown[k] for k in missing[:3])}.")
    if name in unexpected:
      raise ValueError(
          f"{path}: unexpected key {shown[name]} (shape "
          f"{list(given[name].shape)}), not a tensor of {arch}, {how}; "
          f"{len(unexpected)} unexpected: "
          f"{', '.join(shown[k] for k in unexpected[:3])}.")
    if tuple(given[name].shape) != tuple(expected[name]):
      raise ValueError(
          f"{path}: {shown[name]} has shape {list(given[name].shape)} in the "
          f"file but {list(expected[name])} in {arch}, {how}.")
    if not jnp.issubdtype(given[name].dtype, jnp.floating):
      raise ValueError(f"{path}: {shown[name]} holds {given[name].dtype}, "
                       "not floating-point numbers.")


def _initial_stats(expected: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """BN statistics at their init (mean 0, var 1), by torch name."""
  return {k: (np.zeros if k.endswith("mean") else np.ones)(v, np.float32)
          for k, v in expected.items() if k.endswith(_STATS)}


def read(path: str, named: Mapping[str, Any] | None = None,
         require_bn_stats: bool = True) -> Imported:
  """Reads the ResNet backbone of a torch or detectron2 checkpoint file.

  Args:
    path: the file.
    named: "depth", "width" and "stem" that the config names (None or
      absent: inferred from the tensors); the file must fit them.
    require_bn_stats: refuse a file without BN running statistics; False
      leaves them at their init for the caller to measure.

  Returns:
    The backbone.

  Raises:
    FileNotFoundError: when there is no such file.
    ValueError: naming the file and the key, shape or global at fault: an
      unknown format, a refused global, a truncated file, a non-ResNet
      state dict, a missing, unexpected or misshapen tensor, or no BN
      statistics.
  """
  contents = safe_pickle.read_file(path)
  state_dict, where = _state_dict(contents.obj, path, contents.container)
  prefix, scheme = _backbone_prefix(set(state_dict), path)
  tensors, shown = {}, {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix):]
    name = names.torchvision_name(name) if scheme == "detectron2" else name
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a "
                       "tensor.")
    tensors[name], shown[name] = value, key
  heads = sorted(k for k in tensors if k.startswith(HEADS))
  for head in heads:
    del tensors[head]

  inferred = infer_arch({k: v.shape for k, v in tensors.items()}, path)
  arch = _target_arch(inferred, named or {})
  how = ("named by the config" if arch != inferred
         else "inferred from the file")
  expected = expected_shapes(arch)
  # Names the file does not have are shown as the file would spell them.
  for name in expected:
    shown.setdefault(name, prefix + (names.detectron2_name(name)
                                     if scheme == "detectron2" else name))
  bn_stats = any(k.endswith(_STATS) for k in tensors)
  if not bn_stats:
    if require_bn_stats:
      raise ValueError(
          f"{path} has no BN running statistics (no {shown['bn1.running_mean']}"
          ", ...): the probes can measure them on their training images "
          "with --config.pretrained_file.bn_batches=N (e.g. 10).")
    tensors.update(_initial_stats(expected))
  _check(tensors, expected, arch, how, shown, path)

  variables = names.from_torchvision(tensors)
  outside = [k for k in state_dict if not k.startswith(prefix)]
  # BN's step counters: this ResNet keeps none (the export writes 0).
  counts = sum(k.endswith(_COUNT) for k in tensors)
  dropped = ([f"{counts} num_batches_tracked tensors"] if counts else []) + (
      [f"the heads {_groups([shown[h] for h in heads], prefix)}"]
      if heads else [])
  summary = (
      f"{path} ({contents.container}{', ' + where if where else ''}): took "
      f"{len(tensors) - counts} tensors of {arch} under "
      f"{repr(prefix) if prefix else 'no prefix'} ({scheme} names)"
      + ("" if bn_stats else ", without BN statistics (to be measured)")
      + (f"; dropped {' and '.join(dropped)}" if dropped else "")
      + (f"; ignored {_groups(outside)}" if outside else "") + ".")
  return Imported(arch, variables, bn_stats, contents.container, summary)

