"""torch's file format, written without torch (`safe_pickle` reads it).

torch.save writes a zip archive `<archive>/data.pkl`, `<archive>/data/<key>`
(each storage's raw little-endian bytes), `<archive>/version`,
`<archive>/byteorder` ... The pickle refers to storages by persistent id
("storage", torch.<Type>Storage, key, "cpu", numel) and rebuilds each tensor
with torch._utils._rebuild_tensor_v2, both of which
`torch.load(weights_only=True)` accepts. The pickle is written opcode by
opcode because `pickle.Pickler` refuses to emit a reference to a global it
cannot import (torch), and stand-in classes would have to shadow the real
`torch` module whenever torch is imported in the same process.
"""

import pickle
import struct
import zipfile
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

# torch's storage types (the pickle's `torch.<Name>`) and their dtypes.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
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
    state_dict: name -> numpy array (a dtype of `STORAGE_DTYPES`).
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
