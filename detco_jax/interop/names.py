"""A Flax ResNet's variables under torchvision's and detectron2's names.

`torchvision_state_dict` maps the variables of a `models.resnet.ResNet` to a
torchvision ResNet state dict (names, OIHW kernels, torch's order);
`detectron2_name` and `detectron2_checkpoint` rename that state dict for
detectron2, as MoCo's `convert-pretrain-to-detectron2.py` does. The way
back: `torchvision_name` undoes `detectron2_name`, `variable_path` names the
Flax variable of a torchvision tensor name, and `from_torchvision` undoes
`torchvision_state_dict`; `torchvision_shapes` lists the names and torch
shapes a ResNet's variables take, to check a file against.
"""

import collections
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

_BLOCK = re.compile(r"layer(\d+)_(\d+)$")
_CONV_OR_BN = re.compile(r"(conv|bn)(\d+)$")
# Flax's shortcut modules and torchvision's `downsample` Sequential.
_SHORTCUT = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# Flax variable name -> torch tensor name, per collection.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# The way back: torch module kind and leaf -> Flax collection and leaf.
_TORCH_LEAVES = {
    ("conv", "weight"): ("params", "kernel"),
    ("bn", "weight"): ("params", "scale"),
    ("bn", "bias"): ("params", "bias"),
    ("bn", "running_mean"): ("batch_stats", "mean"),
    ("bn", "running_var"): ("batch_stats", "var"),
}
_TORCH_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.(.+)")
_FLAX_SHORTCUT = {v: k for k, v in _SHORTCUT.items()}
# torch's state_dict lists a module's parameters, then its buffers.
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var",
               "num_batches_tracked")


def _torch_module(path: Sequence[str]) -> str:
  """torchvision's module name of a Flax ResNet module path.

  Args:
    path: module names, e.g. ("layer2_0", "downsample_conv").

  Returns:
    E.g. "layer2.0.downsample.0".

  Raises:
    ValueError: for a path that is not a module of `models.resnet.ResNet`.
  """
  if len(path) == 1 and path[0] in ("conv1", "bn1"):
    return path[0]
  if len(path) == 2:
    block = _BLOCK.match(path[0])
    if block and (_CONV_OR_BN.match(path[1]) or path[1] in _SHORTCUT):
      sub = _SHORTCUT.get(path[1], path[1])
      return f"layer{block[1]}.{block[2]}.{sub}"
  raise ValueError(
      f"{'/'.join(path)} is not a module of detco_jax.models.resnet.ResNet; "
      "export expects the backbone's variables alone.")


def _order(name: str) -> tuple[int, ...]:
  """Sort key that puts tensor names in torchvision's state_dict order."""
  *module, leaf = name.split(".")
  if module[0].startswith("layer"):
    key = [1, int(module[0][len("layer"):]), int(module[1])]
    sub = module[2:]
  else:
    key = [0, 0, 0]
    sub = module
  if sub[0] == "downsample":
    # After all convs and BNs of the block, as torchvision registers it.
    key += [1000, int(sub[1])]
  else:
    kind, index = _CONV_OR_BN.match(sub[0]).groups()
    key += [int(index), 0 if kind == "conv" else 1]
  return tuple(key) + (_LEAF_ORDER.index(leaf),)


def _torch_entries(variables: Mapping[str, Any]
                   ) -> Iterator[tuple[str, str, Any]]:
  """(torch name, Flax leaf name, value) of each variable of a ResNet tree.

  Raises:
    ValueError: when the tree is not a `models.resnet.ResNet`'s.
  """
  if set(variables) != {"params", "batch_stats"}:
    raise ValueError("Expected {'params', 'batch_stats'} of the ResNet, got "
                     f"{sorted(variables)}.")
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(variables[collection])
    for path, value in flat.items():
      module = _torch_module(path[:-1])
      leaf = _LEAVES.get((collection, path[-1]))
      if leaf is None:
        raise ValueError(f"Unexpected variable {collection}/{'/'.join(path)}.")
      yield f"{module}.{leaf}", path[-1], value


def _with_batch_counts(tensors: dict[str, Any], count: Any
                       ) -> "collections.OrderedDict[str, Any]":
  """`tensors` with each BN's `num_batches_tracked`, in torch's order.

  Raises:
    ValueError: when a BN lacks its statistics.
  """
  modules = {name.rpartition(".")[0] for name in tensors}
  bns = {m for m in modules
         if m.rpartition(".")[2].startswith("bn") or m.endswith("downsample.1")}
  out = dict(tensors)
  for module in bns:
    missing = [f"{module}.{leaf}" for leaf in _LEAF_ORDER[1:4]
               if f"{module}.{leaf}" not in out]
    if missing:
      raise ValueError(f"Batch norm {module} lacks {missing}.")
    out[f"{module}.num_batches_tracked"] = count
  return collections.OrderedDict(
      (name, out[name]) for name in sorted(out, key=_order))


def torchvision_state_dict(
    variables: Mapping[str, Any]) -> "collections.OrderedDict[str, np.ndarray]":
  """The ResNet's variables as a torchvision ResNet state dict (no `fc`).

  Convolution kernels go from Flax's HWIO to torch's OIHW; batch norm's
  scale, bias, mean and var become weight, bias, running_mean and
  running_var, and each BN gets torch's `num_batches_tracked` buffer (an
  int64 scalar 0: it only matters to BN with `momentum=None`, and the
  pretraining run's count is not the torch model's).

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of a
      `models.resnet.ResNet` (e.g. `pretrained.Backbone.variables`); arrays
      may be jax or numpy.

  Returns:
    Tensor name -> float32 (int64 for `num_batches_tracked`) numpy array, in
    torchvision's state_dict order.

  Raises:
    ValueError: when the tree is not such a ResNet's, or a BN lacks its
      statistics.
  """
  out = {}
  # One transfer for the whole tree rather than one per array.
  for name, leaf, value in _torch_entries(jax.device_get(dict(variables))):
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
      # HWIO -> OIHW, stored C-contiguous like torch's tensors.
      value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    out[name] = value
  return _with_batch_counts(out, np.array(0, np.int64))


def torchvision_shapes(
    variables: Mapping[str, Any]) -> "collections.OrderedDict[str, tuple]":
  """The torch names and shapes of a ResNet's variables, in torch's order.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of a
      `models.resnet.ResNet`, as arrays or `jax.ShapeDtypeStruct`s (e.g.
      from `jax.eval_shape` of its `init`).

  Returns:
    What `torchvision_state_dict` would give, as name -> shape (OIHW for
    kernels, () for `num_batches_tracked`).
  """
  out = {}
  for name, leaf, value in _torch_entries(variables):
    shape = tuple(value.shape)
    out[name] = (shape[3], shape[2], shape[0], shape[1]) if (
        leaf == "kernel") else shape
  return _with_batch_counts(out, ())


def variable_path(name: str) -> tuple[str, ...] | None:
  """The Flax variable of a torchvision ResNet tensor name.

  The inverse of `torchvision_state_dict`'s naming.

  Args:
    name: e.g. "layer2.0.downsample.1.running_mean".

  Returns:
    (collection, *module path, leaf), e.g. ("batch_stats", "layer2_0",
    "downsample_bn", "mean"); None for a name that is no variable of a
    `models.resnet.ResNet` (`num_batches_tracked` included: the model keeps
    no such count).
  """
  module, _, leaf = name.rpartition(".")
  if module in ("conv1", "bn1"):
    path = (module,)
  else:
    block = _TORCH_BLOCK.fullmatch(module)
    if not block:
      return None
    sub = _FLAX_SHORTCUT.get(block[3], block[3])
    if not (_CONV_OR_BN.fullmatch(sub) or sub in _SHORTCUT):
      return None
    path = (f"layer{block[1]}_{block[2]}", sub)
  kind = "conv" if "conv" in path[-1] else "bn"
  found = _TORCH_LEAVES.get((kind, leaf))
  return None if found is None else (found[0], *path, found[1])


def from_torchvision(
    state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The ResNet's variables of a torchvision ResNet state dict (no `fc`).

  The inverse of `torchvision_state_dict`: OIHW kernels become HWIO, BN's
  weight, bias, running_mean and running_var its scale, bias, mean and var
  (float32); `num_batches_tracked` is dropped.

  Args:
    state_dict: torchvision tensor name -> array.

  Returns:
    `{"params": ..., "batch_stats": ...}` as nested dicts of numpy arrays
    (no "batch_stats" when the state dict has no running statistics).

  Raises:
    ValueError: naming a tensor that is no variable of the ResNet.
  """
  flat = {}
  for name, value in state_dict.items():
    if name.endswith(".num_batches_tracked"):
      continue
    path = variable_path(name)
    if path is None:
      raise ValueError(f"{name} is not a tensor of a torchvision ResNet.")
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def detectron2_name(name: str) -> str:
  """detectron2's ResNet name of a torchvision ResNet tensor name.

  The renaming of MoCo's `convert-pretrain-to-detectron2.py`: the stem gets
  a `stem.` prefix, `layerN` is `res{N+1}`, `bnK` is `convK.norm` and the
  downsample conv and BN are `shortcut` and `shortcut.norm`.

  Args:
    name: e.g. "layer1.0.downsample.1.running_mean".

  Returns:
    E.g. "res2.0.shortcut.norm.running_mean".
  """
  if not name.startswith("layer"):
    name = "stem." + name
  name = re.sub(r"\blayer(\d)", lambda m: f"res{int(m[1]) + 1}", name)
  name = re.sub(r"\bbn(\d)", r"conv\1.norm", name)
  name = name.replace("downsample.0", "shortcut")
  return name.replace("downsample.1", "shortcut.norm")


def torchvision_name(name: str) -> str:
  """torchvision's ResNet name of a detectron2 ResNet tensor name.

  The inverse of `detectron2_name`. A name outside detectron2's ResNet comes
  back with only its `stem.` prefix removed: MoCo's converter renames the
  MLP head `fc.0.weight` to `stem.fc.0.weight`, and this makes it `fc.*`
  again.

  Args:
    name: e.g. "res3.0.shortcut.norm.running_mean".

  Returns:
    E.g. "layer2.0.downsample.1.running_mean".
  """
  name = name.replace("shortcut.norm", "downsample.1")
  name = name.replace("shortcut", "downsample.0")
  name = re.sub(r"\bconv(\d)\.norm", r"bn\1", name)
  name = re.sub(r"^res(\d)", lambda m: f"layer{int(m[1]) - 1}", name)
  return name[len("stem."):] if name.startswith("stem.") else name


def detectron2_checkpoint(
    state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A detectron2 checkpoint dict of a torchvision ResNet state dict.

  Args:
    state_dict: from `torchvision_state_dict`.

  Returns:
    `{"model": {detectron2 name: np.ndarray}, "__author__": "detco_jax",
    "matching_heuristics": True}`; `num_batches_tracked` is dropped
    (detectron2's frozen BN has no such buffer).
  """
  model = {detectron2_name(k): np.asarray(v) for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked")}
  # matching_heuristics lets detectron2 match names to its model loosely, as
  # it does for MoCo's and DetCo's released files.
  return {"model": model, "__author__": "detco_jax",
          "matching_heuristics": True}
