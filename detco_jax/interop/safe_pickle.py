"""Reads torch and detectron2 checkpoint files without running code from them.

`torch.save` files and detectron2 `.pkl` files are pickles, and unpickling
calls whatever global a pickle names: `pickle.load` (or `torch.load` without
`weights_only`) on a downloaded file runs the downloader's code. Here an
allow-list unpickler resolves only the globals a tensor file needs, each to
a NumPy stand-in that checks its arguments:

* torch's tensor rebuild functions (`torch._utils._rebuild_tensor_v2`,
  `_rebuild_tensor`, `_rebuild_parameter`) and storage types
  (`torch.FloatStorage`, ..., `torch.BFloat16Storage`);
* `collections.OrderedDict`;
* NumPy's array and scalar reconstruction (`numpy.core.multiarray
  ._reconstruct`, `numpy.ndarray`, `numpy.dtype` without object fields,
  `numpy.core.multiarray.scalar`, `numpy.core.numeric._frombuffer`, also
  under `numpy._core`), and `_codecs.encode` of text to latin-1 bytes
  (how protocol-2 pickles spell bytes).

Any other global stops the read with a `RefusedGlobalError` (a `ValueError`)
that names it, before the pickle could call it. torch itself is never imported.

The formats, told apart by content, not by the file's name:

* torch's zip format (torch >= 1.6): `<archive>/data.pkl` refers to the
  storages `<archive>/data/<key>` by persistent id ("storage", storage type,
  key, location, numel);
* torch's legacy format (`_use_new_zipfile_serialization=False`): pickled
  magic number, protocol version 1001 and system info, then the object
  (storage ids with a sixth entry, an optional view), the sorted storage
  keys, and each storage as an int64 element count and its raw bytes;
* a plain pickle (detectron2's `{"model": {name: ndarray}, ...}`).

Tensors keep their dtype (float32/16/64, bfloat16, integers, bool), storage
offset and strides (views and transposes), and tensors that share a storage
share its bytes.
"""

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np
from etils import epath

from detco_jax.interop import sniff
from detco_jax.interop import torch_format

# torch.save's legacy format: the first pickled objects.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


class CheckpointFileError(ValueError):
  """A file this reader will not or cannot read; the message names it."""


class RefusedGlobalError(CheckpointFileError):
  """The pickle names a global outside the allow-list; nothing was run."""


class CorruptFileError(CheckpointFileError):
  """The file is truncated, or inconsistent with its own format."""


class _Refused(Exception):
  """Raised inside the unpickler; `read_file` adds the file's name."""

  def __init__(self, what: str, why: str):
    super().__init__(what, why)
    self.what, self.why = what, why


class _Corrupt(Exception):
  """Raised inside the readers; `read_file` adds the file's name."""


@dataclasses.dataclass(frozen=True)
class Contents:
  """What a checkpoint file holds.

  Attributes:
    obj: the unpickled object: dicts, lists, tuples, numbers, strings and
      NumPy arrays (each tensor as an array of its own).
    container: "torch zip", "torch legacy" or "pickle".
  """
  obj: Any
  container: str


# ----------------------------------------------------------------------------
# The allow-listed globals' stand-ins.


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """`torch.<Name>Storage`, as the dtype it stands for."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A storage the pickle refers to; its bytes are read after unpickling.

  Attributes:
    key: the storage's record (zip) or key (legacy).
    dtype: its element type.
    numel: its element count.
    offset: where a legacy view starts in its root storage, in elements.
    root: the storage that holds the bytes (itself unless a legacy view).
    data: its elements once read.
  """
  key: str
  dtype: np.dtype
  numel: int
  offset: int = 0
  root: "_Storage | None" = None
  data: np.ndarray | None = None

  def elements(self) -> np.ndarray:
    root = self.root or self
    if root.data is None:
      raise _Corrupt(f"storage {root.key} was never read")
    return root.data[self.offset:self.offset + self.numel]


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """A tensor to rebuild once its storage's bytes are read."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def array(self) -> np.ndarray:
    """The tensor's elements as a C-contiguous array of their own."""
    data = self.storage.elements()
    if len(self.size) != len(self.stride) or any(
        n < 0 for n in self.size) or any(s < 0 for s in self.stride):
      raise _Corrupt(f"bad tensor size {self.size} or stride "
                             f"{self.stride}")
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size,
                                                         self.stride))
    # as_strided reads wherever it is told: keep it inside the storage.
    if self.offset < 0 or last >= len(data):
      raise _Corrupt(
          f"a tensor of size {self.size}, stride {self.stride} at offset "
          f"{self.offset} reaches past its storage of {len(data)} elements")
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.size,
        tuple(s * data.itemsize for s in self.stride), writeable=False)
    return np.array(view, order="C")


def _ints(values: Any, what: str) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or not all(
      isinstance(v, int) for v in values):
    raise _Corrupt(f"the tensor's {what} is {values!r}")
  return tuple(values)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): a tensor view of a storage."""
  del unused  # requires_grad, backward hooks, metadata.
  if not isinstance(storage, _Storage) or not isinstance(storage_offset, int):
    raise _Corrupt("a tensor is rebuilt from something that is not "
                           "a storage")
  return _Tensor(storage, storage_offset, _ints(size, "size"),
                 _ints(stride, "stride"))


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): the parameter's data."""
  del unused
  if not isinstance(data, _Tensor):
    raise _Corrupt("a parameter holds no tensor")
  return data


def _checked_dtype(dtype: np.dtype) -> np.dtype:
  """`dtype`, unless it could hold Python objects (pickled ones)."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise _Refused(f"numpy dtype {dtype!r}", "it may hold Python objects")
  return dtype


def _dtype(spec, align=False, copy=False):
  """numpy.dtype, for plain numbers, strings and bytes only."""
  if not isinstance(spec, str) or spec[:1] in ("O", "V"):
    raise _Refused(f"numpy dtype {spec!r}", "it may hold Python objects")
  return _checked_dtype(np.dtype(spec, bool(align), bool(copy)))


def _reconstruct(cls, shape, dtype_char):
  """numpy's `_reconstruct(ndarray, shape, b'b')`; pickle's BUILD fills it."""
  if cls is not np.ndarray:
    raise _Refused(f"numpy's _reconstruct of {cls!r}", "only numpy.ndarray "
                   "is rebuilt")
  return np.ndarray.__new__(np.ndarray, _ints(shape, "shape"),
                            _dtype(dtype_char.decode("latin1") if isinstance(
                                dtype_char, bytes) else dtype_char))


def _scalar(dtype, data):
  """numpy's `scalar(dtype, bytes)`: a NumPy scalar."""
  data = data.encode("latin1") if isinstance(data, str) else data
  return np.frombuffer(data, _checked_dtype(dtype), count=1)[0]


def _frombuffer(buffer, dtype, shape, order):
  """numpy's `_frombuffer` (protocol 5 pickles of arrays)."""
  if order not in ("C", "F"):
    raise _Corrupt(f"array order {order!r}")
  return np.frombuffer(buffer, _checked_dtype(dtype)).reshape(
      _ints(shape, "shape"), order=order).copy(order="K")


def _encode(text, encoding):
  """_codecs.encode(text, 'latin1'): how protocol 2 spells bytes."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Refused(f"_codecs.encode to {encoding!r}", "only text to latin-1 "
                   "bytes is allowed")
  return text.encode("latin1")


_NUMPY = {"multiarray._reconstruct": _reconstruct,
          "multiarray.scalar": _scalar,
          "numeric._frombuffer": _frombuffer}
ALLOWED: dict[str, Callable[..., Any] | type | _StorageType] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": _dtype,
    "_codecs.encode": _encode,
    **{f"{core}.{name}": fn for core in ("numpy.core", "numpy._core")
       for name, fn in _NUMPY.items()},
    **{f"torch.{name}": _StorageType(name, dtype)
       for name, dtype in torch_format.STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `ALLOWED` globals; storages by persistent id."""

  def __init__(self, file: BinaryIO, path: str, storages: bool):
    # latin1: Python 2 pickles (old detectron2 files) hold bytes as str.
    super().__init__(file, encoding="latin1")
    self._path = path
    self._accepts_storages = storages
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    found = ALLOWED.get(f"{module}.{name}")
    if found is None:
      raise _Refused(
          f"'{module}.{name}'",
          "not a tensor file global, so unpickling it could run code; "
          "nothing from the file was run. Only torch's tensor rebuild "
          "functions and storages, collections.OrderedDict and numpy's "
          "array reconstruction are allowed: re-save just the state dict "
          "(torch.save(model.state_dict(), FILE))")
    return found

  def persistent_load(self, pid: Any) -> _Storage:
    if not self._accepts_storages:
      raise _Corrupt(f"a persistent id {pid!r} in a plain pickle")
    if (not isinstance(pid, tuple) or len(pid) not in (5, 6)
        or pid[0] != "storage" or not isinstance(pid[1], _StorageType)):
      raise _Corrupt(f"unknown persistent id {pid!r}")
    _, storage_type, key, _, numel, *view = pid
    key = str(key)
    if not isinstance(numel, int) or numel < 0:
      raise _Corrupt(f"storage {key} has {numel!r} elements")
    root = self.storages.get(key)
    if root is None:
      root = self.storages[key] = _Storage(key, storage_type.dtype, numel)
    elif root.dtype != storage_type.dtype:
      raise _Corrupt(f"storage {key} is read as {root.dtype} and "
                             f"{storage_type.dtype}")
    if view and view[0] is not None:
      # Legacy files of torch < 1.0 may refer to a part of a storage.
      _, offset, size = view[0]
      return _Storage(key, root.dtype, int(size), int(offset), root)
    return root


def _materialise(obj: Any) -> Any:
  """`obj` with every `_Tensor` replaced by its array."""
  if isinstance(obj, _Tensor):
    return obj.array()
  if isinstance(obj, _Storage):
    return obj.elements().copy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


# ----------------------------------------------------------------------------
# The three formats.


def _read_zip(f: BinaryIO, path: str) -> Any:
  """torch's zip format."""
  with zipfile.ZipFile(f) as zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl")
               and n.count("/") == 1]
    if len(pickles) != 1:
      listed = ", ".join(zf.namelist()[:4])
      kind = ("a TorchScript archive (torch.jit.save)"
              if any(n.endswith("/constants.pkl") for n in zf.namelist())
              else "a zip archive")
      raise CheckpointFileError(
          f"{path} is {kind}, not a torch.save checkpoint: it has no "
          f"<archive>/data.pkl ({listed}, ...). Save the state dict with "
          "torch.save(model.state_dict(), FILE).")
    archive = pickles[0][:-len("data.pkl")]
    unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, True)
    obj = unpickler.load()
    for key, storage in unpickler.storages.items():
      data = zf.read(f"{archive}data/{key}")
      size = storage.numel * storage.dtype.itemsize
      if len(data) < size:
        raise _Corrupt(f"storage {key} holds {len(data)} of its "
                               f"{size} bytes")
      # The file says "little" in its byteorder record (torch >= 1.10 on
      # every supported platform).
      storage.data = np.frombuffer(data, storage.dtype.newbyteorder("<"),
                                   count=storage.numel)
  return obj


def _read_legacy(f: BinaryIO, path: str) -> Any:
  """torch's legacy format, after its magic number."""
  protocol = _Unpickler(f, path, False).load()
  if protocol != LEGACY_PROTOCOL:
    raise _Corrupt(f"legacy protocol version {protocol!r}, not "
                           f"{LEGACY_PROTOCOL}")
  info = _Unpickler(f, path, False).load()
  if not isinstance(info, dict) or not info.get("little_endian", False):
    raise CheckpointFileError(
        f"{path} was saved on a big-endian machine ({info!r}); re-save it "
        "on a little-endian one.")
  unpickler = _Unpickler(f, path, True)
  obj = unpickler.load()
  keys = _Unpickler(f, path, False).load()
  if not isinstance(keys, list) or set(map(str, keys)) != set(
      unpickler.storages):
    raise _Corrupt("the storage keys do not match the object's")
  for key in keys:
    storage = unpickler.storages[str(key)]
    header = f.read(8)
    if len(header) < 8:
      raise _Corrupt(f"storage {key} is missing")
    (numel,) = struct.unpack("<q", header)
    size = numel * storage.dtype.itemsize
    data = f.read(size) if numel >= 0 else b""
    if numel < 0 or len(data) < size:
      raise _Corrupt(f"storage {key} holds {len(data)} of its {size} bytes")
    storage.data = np.frombuffer(data, storage.dtype.newbyteorder("<"))
  return obj


def _read(f: BinaryIO, path: str) -> Contents:
  head = f.read(sniff.HEAD_BYTES)
  f.seek(0)
  problem = sniff.problem(path, head)
  if problem:
    raise CheckpointFileError(problem)
  if sniff.container(head) == "zip":
    return Contents(_read_zip(f, path), "torch zip")
  first = _Unpickler(f, path, False).load()
  if isinstance(first, int) and first == LEGACY_MAGIC:
    return Contents(_read_legacy(f, path), "torch legacy")
  return Contents(first, "pickle")


def read_file(path: str) -> Contents:
  """Reads a torch or detectron2 checkpoint without running code from it.

  Args:
    path: the file (local or gs://).

  Returns:
    Its contents, every tensor as a NumPy array.

  Raises:
    FileNotFoundError: when there is no such file.
    RefusedGlobalError: when the pickle names a global outside the
      allow-list (nothing from the file was run).
    CorruptFileError: for a truncated or inconsistent file.
    CheckpointFileError: for a file in none of the formats (e.g. a
      TorchScript archive).
  """
  file = epath.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"No checkpoint file {path}.")
  try:
    with file.open("rb") as f:
      contents = _read(f, path)
      return Contents(_materialise(contents.obj), contents.container)
  except _Refused as e:
    raise RefusedGlobalError(
        f"Refusing to load {e.what} from {path}: {e.why}.") from None
  except CheckpointFileError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Whatever a damaged pickle or archive makes the parsers raise.
    detail = str(e) if isinstance(e, _Corrupt) else f"{type(e).__name__}: {e}"
    raise CorruptFileError(
        f"{path}: truncated or corrupt file ({detail}).") from e
