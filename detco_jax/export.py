r"""Exports a pretrained backbone for torchvision or detectron2.

  python -m detco_jax.export --workdir=PRETRAIN_WORKDIR [--step=N] \
      --format={torchvision,detectron2} --out=FILE

writes the query encoder's ResNet of a pretraining checkpoint (the latest
complete one unless `--step` is given):

* `torchvision`: a file that `torch.load(FILE, weights_only=True)` reads as
  an `OrderedDict` of tensors named and laid out like torchvision's ResNet
  (`conv1.weight`, `bn1.running_var`, `layer2.0.downsample.0.weight`, ...;
  no `fc.*`), so that

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load(FILE, weights_only=True), strict=False)

  leaves only `fc.weight` and `fc.bias` missing. It is written in torch's
  own zip serialisation format without importing torch, which this project
  does not depend on.
* `detectron2`: a pickle of `{"model": {name: np.ndarray}, "__author__":
  "detco_jax", "matching_heuristics": True}` with detectron2's ResNet names
  (`stem.conv1.norm.weight`, `res3.0.shortcut.weight`, ...), as MoCo's
  `convert-pretrain-to-detectron2.py` makes them; give it a `.pkl` name
  (detectron2 reads `.pkl` files as such) and use it as
  `MODEL.WEIGHTS` with `MODEL.RESNETS.STRIDE_IN_1X1 False` (the stride of
  a bottleneck is in its 3x3 conv, as in torchvision) and
  `MODEL.PIXEL_MEAN`/`PIXEL_STD` of the pretraining normalisation (in
  0..255 and RGB order, `INPUT.FORMAT "RGB"`), as for MoCo's weights.

The weights expect images normalised as in pretraining (`config.aug.mean`
and `std`; ImageNet's by default). A backbone with the "cifar" stem
(3x3/1 conv1, no max-pool) exports under the same names, but torchvision's
and detectron2's ResNets have the ImageNet stem (7x7/2 conv1 + max-pool):
such a file loads only into a model whose stem was changed to match, and a
warning says so. Likewise `model.width != 64` gives shapes that no stock
torchvision ResNet has (torchvision's "wide" ResNets widen only the inner
bottleneck convs).

The export runs in a single process; on a multi-host job run it once, on
one host that can read the workdir.
"""

import collections
import io
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import traverse_util

from detco_jax import pretrained

FORMATS = ("torchvision", "detectron2")

# ----------------------------------------------------------------------------
# Names and layouts.

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
  if set(variables) != {"params", "batch_stats"}:
    raise ValueError("Expected {'params', 'batch_stats'} of the ResNet, got "
                     f"{sorted(variables)}.")
  # One transfer for the whole tree rather than one per array.
  host = jax.device_get(dict(variables))
  out = {}
  bns = set()
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(host[collection])
    for path, value in flat.items():
      module = _torch_module(path[:-1])
      leaf = _LEAVES.get((collection, path[-1]))
      if leaf is None:
        raise ValueError(f"Unexpected variable {collection}/{'/'.join(path)}.")
      value = np.asarray(value, np.float32)
      if path[-1] == "kernel":
        # HWIO -> OIHW, stored C-contiguous like torch's tensors.
        value = np.ascontiguousarray(value.transpose(3, 2, 0, 1))
      if path[-1] == "scale":
        bns.add(module)
      out[f"{module}.{leaf}"] = value
  for module in bns:
    missing = [f"{module}.{leaf}" for leaf in _LEAF_ORDER[1:4]
               if f"{module}.{leaf}" not in out]
    if missing:
      raise ValueError(f"Batch norm {module} lacks {missing}.")
    out[f"{module}.num_batches_tracked"] = np.array(0, np.int64)
  return collections.OrderedDict(
      (name, out[name]) for name in sorted(out, key=_order))


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


# ----------------------------------------------------------------------------
# torch's file format, without torch.
#
# torch.save writes a zip archive `<archive>/data.pkl`, `<archive>/data/<key>`
# (each storage's raw little-endian bytes), `<archive>/version`,
# `<archive>/byteorder` ... The pickle refers to storages by persistent id
# ("storage", torch.<Type>Storage, key, "cpu", numel) and rebuilds each tensor
# with torch._utils._rebuild_tensor_v2, both of which
# `torch.load(weights_only=True)` accepts. The pickle is written opcode by
# opcode because `pickle.Pickler` refuses to emit a reference to a global it
# cannot import (torch), and stand-in classes would have to shadow the real
# `torch` module whenever torch is imported in the same process.

_STORAGES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
# torch aligns every record's data to 64 bytes (it may memory-map them).
_ALIGNMENT = 64
# The archive format version that torch.save (2.x) writes.
_FORMAT_VERSION = b"3\n"


class _PickleWriter:
  """The handful of protocol-2 pickle opcodes a tensor state dict needs."""

  def __init__(self):
    self._parts = [pickle.PROTO + bytes([2])]

  def global_(self, module: str, name: str) -> None:
    self._parts.append(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))

  def str_(self, s: str) -> None:
    data = s.encode("utf-8")
    self._parts.append(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

  def int_(self, v: int) -> None:
    if 0 <= v < 256:
      self._parts.append(pickle.BININT1 + bytes([v]))
    elif -2**31 <= v < 2**31:
      self._parts.append(pickle.BININT + struct.pack("<i", v))
    else:
      data = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
      self._parts.append(pickle.LONG1 + bytes([len(data)]) + data)

  def ints_(self, values: Sequence[int]) -> None:
    """A tuple of ints (a size or a stride)."""
    self.op(pickle.MARK)
    for v in values:
      self.int_(v)
    self.op(pickle.TUPLE)

  def op(self, opcode: bytes) -> None:
    self._parts.append(opcode)

  def empty_ordered_dict(self) -> None:
    self.global_("collections", "OrderedDict")
    self.op(pickle.EMPTY_TUPLE)
    self.op(pickle.REDUCE)

  def getvalue(self) -> bytes:
    return b"".join(self._parts + [pickle.STOP])


def _tensor_pickle(state_dict: Mapping[str, np.ndarray]
                   ) -> tuple[bytes, list[np.ndarray]]:
  """data.pkl of an OrderedDict of tensors, and the storages it refers to."""
  w = _PickleWriter()
  w.empty_ordered_dict()
  w.op(pickle.MARK)
  storages = []
  for name, value in state_dict.items():
    # (Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.)
    value = np.asarray(value)
    value = value if value.flags.c_contiguous else value.copy(order="C")
    storage_type = _STORAGES.get(value.dtype.newbyteorder("="))
    if storage_type is None:
      raise ValueError(f"{name}: no torch storage type for {value.dtype}.")
    # The file says "little" in its byteorder record.
    value = value.astype(value.dtype.newbyteorder("<"), copy=False)
    key = str(len(storages))
    storages.append(value)
    w.str_(name)
    # _rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    #                    backward_hooks)
    w.global_("torch._utils", "_rebuild_tensor_v2")
    w.op(pickle.MARK)
    w.op(pickle.MARK)
    w.str_("storage")
    w.global_("torch", storage_type)
    w.str_(key)
    w.str_("cpu")
    w.int_(value.size)
    w.op(pickle.TUPLE)
    w.op(pickle.BINPERSID)
    w.int_(0)
    w.ints_(value.shape)
    w.ints_([s // value.itemsize for s in value.strides])
    w.op(pickle.NEWFALSE)
    w.empty_ordered_dict()
    w.op(pickle.TUPLE)
    w.op(pickle.REDUCE)
  w.op(pickle.SETITEMS)
  return w.getvalue(), storages


class _Appender:
  """A write-only, unseekable byte sink that knows its length.

  zipfile then follows each record with a data descriptor, as torch's
  writer (miniz) does: torch's optional offset calculation
  (`torch.utils.serialization.config.load.calculate_storage_offsets`)
  assumes that layout.
  """

  def __init__(self):
    self._parts = []
    self._size = 0

  def write(self, data: bytes) -> int:
    self._parts.append(bytes(data))
    self._size += len(data)
    return len(data)

  def tell(self) -> int:
    return self._size

  def flush(self) -> None:
    pass

  def getvalue(self) -> bytes:
    return b"".join(self._parts)


def _write_aligned(zf: zipfile.ZipFile, sink: _Appender, name: str,
                   data: bytes) -> None:
  """Stores `data` uncompressed, starting at a multiple of `_ALIGNMENT`."""
  # A local file header is 30 bytes + the name + the extra field; the
  # extra field (id "FB" like torch's, then its length) pads the data start.
  start = sink.tell() + 30 + len(name.encode("utf-8")) + 4
  pad = -start % _ALIGNMENT
  info = zipfile.ZipInfo(name)
  info.compress_type = zipfile.ZIP_STORED
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(info, data)


def torch_bytes(state_dict: Mapping[str, np.ndarray],
                archive: str = "archive") -> bytes:
  """A state dict serialised as `torch.save` would, without torch.

  Args:
    state_dict: name -> numpy array (float16/32/64, int32/64, uint8, bool).
    archive: the archive's top-level folder (torch uses the file's stem; any
      name loads).

  Returns:
    The file's bytes, which `torch.load(..., weights_only=True)` reads as an
    `OrderedDict` of CPU tensors.
  """
  pkl, storages = _tensor_pickle(state_dict)
  sink = _Appender()
  with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:
    records = [("data.pkl", pkl), (".format_version", b"1"),
               (".storage_alignment", str(_ALIGNMENT).encode()),
               ("byteorder", b"little")]
    records += [(f"data/{i}", s.tobytes()) for i, s in enumerate(storages)]
    records.append(("version", _FORMAT_VERSION))
    for name, data in records:
      _write_aligned(zf, sink, f"{archive}/{name}", data)
  return sink.getvalue()


def read_torch_file(path: str) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a tensor state dict saved by torch (or `torch_bytes`) into numpy.

  For checking files where torch is not installed. Only plain CPU tensors
  in an OrderedDict or dict are understood; no other global is resolved, so
  reading an untrusted file runs no code.

  Args:
    path: the file.

  Returns:
    Tensor name -> numpy array.

  Raises:
    pickle.UnpicklingError: for anything but such a state dict.
  """
  with zipfile.ZipFile(io.BytesIO(epath.Path(path).read_bytes())) as zf:
    pkl_name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
    archive = pkl_name[:-len("/data.pkl")]
    dtypes = {f"torch.{v}": k for k, v in _STORAGES.items()}

    def rebuild(storage, offset, size, stride, requires_grad=False,
                backward_hooks=None):
      del requires_grad, backward_hooks
      item = storage.itemsize
      return np.lib.stride_tricks.as_strided(
          storage[offset:], tuple(size), tuple(s * item for s in stride)).copy()

    class Unpickler(pickle.Unpickler):

      def find_class(self, module, name):
        full = f"{module}.{name}"
        if full == "collections.OrderedDict":
          return collections.OrderedDict
        if full == "torch._utils._rebuild_tensor_v2":
          return rebuild
        if full in dtypes:
          return dtypes[full]
        raise pickle.UnpicklingError(f"Unsupported global {full}.")

      def persistent_load(self, pid):
        typename, dtype, key, _, numel = pid
        if typename != "storage" or not isinstance(dtype, np.dtype):
          raise pickle.UnpicklingError(f"Unsupported persistent id {pid!r}.")
        data = zf.read(f"{archive}/data/{key}")
        return np.frombuffer(data, dtype.newbyteorder("<"), count=numel)

    return collections.OrderedDict(
        Unpickler(io.BytesIO(zf.read(pkl_name))).load())


# ----------------------------------------------------------------------------
# Export.


def export(backbone: pretrained.Backbone, fmt: str, out: str) -> dict[str, Any]:
  """Writes `backbone` in `fmt` to `out`.

  Args:
    backbone: e.g. from `pretrained.load`.
    fmt: "torchvision" or "detectron2".
    out: the output file (local or gs://); its folder is created.

  Returns:
    What was written: {"format", "path", "tensors", "parameters", "step"}
    ("parameters" counts the learned ones, not BN statistics).

  Raises:
    ValueError: for an unknown format.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
  module = backbone.module
  if module.stem != "imagenet":
    logging.warning(
        "The backbone has the %r stem (3x3/1 conv1, no max-pool) but "
        "torchvision's and detectron2's ResNets have the ImageNet stem "
        "(7x7/2 conv1 + max-pool): load the file into a model whose stem "
        "matches, or conv1.weight will not fit.", module.stem)
  state_dict = torchvision_state_dict(backbone.variables)
  if fmt == "torchvision":
    archive = re.sub(r"\W", "_", epath.Path(out).stem) or "archive"
    data = torch_bytes(state_dict, archive)
    tensors = len(state_dict)
  else:
    checkpoint = detectron2_checkpoint(state_dict)
    data = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    tensors = len(checkpoint["model"])
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  parameters = sum(
      v.size for k, v in state_dict.items()
      if k.endswith(".weight") or k.endswith(".bias"))
  aug = backbone.config.get("aug", {})
  logging.info(
      "Wrote %s (%s, %d tensors, %d parameters) of ResNet-%d width %d "
      "(%s, step %d). Inputs are normalised with mean %s, std %s.",
      path, fmt, tensors, parameters, module.depth, module.width,
      backbone.source, backbone.step, aug.get("mean"), aug.get("std"))
  return {"format": fmt, "path": str(path), "tensors": tensors,
          "parameters": int(parameters), "step": backbone.step}


def run(workdir: str, fmt: str, out: str,
        step: int | None = None) -> dict[str, Any]:
  """Exports the query backbone of a pretraining checkpoint.

  Args:
    workdir: the pretraining run's directory.
    fmt: "torchvision" or "detectron2".
    out: the output file.
    step: which checkpoint; None for the latest complete one.

  Returns:
    `export`'s summary.
  """
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
  return export(pretrained.load(workdir, step), fmt, out)


# ----------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
  """The CLI flags; defined only when run as a program, so that importing
  this module next to other jobs (tests, notebooks) cannot clash on names."""
  flags.DEFINE_string("workdir", None, "The pretraining run's --workdir.",
                      required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  flags.DEFINE_enum("format", None, list(FORMATS), "Output format.",
                    required=True)
  flags.DEFINE_string("out", None, "Output file.", required=True)


def main(argv: Sequence[str]) -> None:
  """The CLI: exports with the flags of `_define_flags`.

  Args:
    argv: the program name alone (everything else is a flag).
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  run(f.workdir, f.format, f.out, f.step)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
