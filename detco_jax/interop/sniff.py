"""Which checkpoint container a file is, from its first bytes.

`safe_pickle` reads a file by what its first bytes say, not by its name, and
the command line checks a `--config.pretrained=FILE` the same way before
JAX loads: this module imports nothing beyond the standard library, so both
use it.
"""

import pickle

# Enough of the head to tell the formats apart (the tar header's magic sits
# at offset 257).
HEAD_BYTES = 512
_ZIP_MAGIC = b"PK\x03\x04"
# Every pickle of protocol >= 2 opens with PROTO; torch.save writes 2.
_PICKLE_MAGIC = pickle.PROTO
# A POSIX tar header has "ustar" at offset 257: torch < 0.4's tar format.
_TAR_MAGIC = (257, b"ustar")


def container(head: bytes) -> str | None:
  """The container that a file's first bytes announce.

  Args:
    head: the file's first `HEAD_BYTES` bytes (fewer for a short file).

  Returns:
    "zip" (torch's zip format), "tar" (torch < 0.4), "pickle" (torch's
    legacy format or a plain pickle such as detectron2's .pkl), or None.
  """
  if head.startswith(_ZIP_MAGIC):
    return "zip"
  offset, magic = _TAR_MAGIC
  if head[offset:offset + len(magic)] == magic:
    return "tar"
  if head.startswith(_PICKLE_MAGIC):
    return "pickle"
  return None


def problem(path: str, head: bytes) -> str | None:
  """Why a file with this head is no checkpoint this project reads.

  Args:
    path: the file, for the message.
    head: its first `HEAD_BYTES` bytes.

  Returns:
    One sentence naming the file and the fix, or None when the container
    is one `safe_pickle` reads (its contents are checked only then).
  """
  kind = container(head)
  if kind == "tar":
    return (f"{path} is in the tar format of torch < 0.4, which this reader "
            "does not support: load it with that torch and torch.save it "
            "again.")
  if kind is None:
    return (f"{path} is not a checkpoint this project reads: not torch's zip "
            "or legacy format (torch.save), nor a pickle (detectron2's "
            f".pkl); it starts with {head[:8]!r}.")
  return None
