"""What the devices are: kind, count, memory, versions, and their matmul peak.

The suite's first part (`suite`) records these facts beside every other
figure, so that a table read later says what it was measured on:

  * `facts()`: platform, device kind, devices (global, local) and
    processes, memory per device (the allocator's limit where the backend
    reports one, else the host's RAM), jax / jaxlib / platform versions and
    the accelerator packages installed (CUDA plugin, libtpu);
  * `measured_peak(dtype)`: one large square matrix product in `dtype`,
    timed (`common.matmul_call`, the peak the step benchmarks divide by);
  * `datasheet_peak(kind, dtype)`: the vendor's dense peak for the device
    kind, where this table knows it.

Datasheet peaks are per JAX device and dense (no 2:4 sparsity): NVIDIA's
H100 / H200 / A100 datasheets, Google's Cloud TPU system pages. A float32
matrix product at JAX's default precision runs on TF32 tensor cores on
A100 and later, so its datasheet figure is TF32's; TPUs run it as bfloat16
passes, and no float32 figure is given for them.
"""

import importlib.metadata
import os
import platform
import statistics
from typing import Any

import jax
import jax.numpy as jnp

from detco_jax.benchmark import common

TERA = 1e12
# (substring of device_kind, {dtype name: dense peak FLOP/s per JAX
# device}), first match wins: the H100 PCIe and NVL before the SXM part.
# TPU v2 and v3 show each TensorCore as a device (half a chip); v4 and
# later one device per chip.
_DATASHEET = (
    ("H100 PCIe", {"bfloat16": 756 * TERA, "float32": 378 * TERA}),
    ("H100 NVL", {}),
    ("H200 NVL", {}),
    ("H100", {"bfloat16": 989.4 * TERA, "float32": 494.7 * TERA}),
    ("H200", {"bfloat16": 989.4 * TERA, "float32": 494.7 * TERA}),
    ("A100", {"bfloat16": 312 * TERA, "float32": 156 * TERA}),
    ("TPU v2", {"bfloat16": 22.5 * TERA}),
    ("TPU v3", {"bfloat16": 61.5 * TERA}),
    ("TPU v4", {"bfloat16": 275 * TERA}),
    ("TPU v5 lite", {"bfloat16": 197 * TERA}),
    ("TPU v5e", {"bfloat16": 197 * TERA}),
    ("TPU v5", {"bfloat16": 459 * TERA}),
    ("TPU v6 lite", {"bfloat16": 918 * TERA}),
    ("TPU v6e", {"bfloat16": 918 * TERA}),
)
# Packages whose versions say which accelerator build runs.
_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt",
             "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu",
             "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def datasheet_peak(kind: str, dtype: str) -> float | None:
  """The vendor's dense peak of one device of `kind`, in FLOP/s, or None.

  Args:
    kind: `jax.Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3".
    dtype: "bfloat16" or "float32".

  Returns:
    The peak, or None where the table has no figure for them.
  """
  for key, peaks in _DATASHEET:
    if key in kind:
      return peaks.get(dtype)
  return None


def memory_limit(device: jax.Device) -> tuple[int, str]:
  """Bytes one device can allocate, and where the figure comes from.

  Returns:
    (bytes, source): the allocator's `bytes_limit` on GPU and TPU (on GPU
    it is `XLA_PYTHON_CLIENT_MEM_FRACTION` of the memory); on CPU, which
    reports none, the host's RAM shared by the local devices.
  """
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "allocator bytes_limit"
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // jax.local_device_count(), "host RAM / local devices"


def versions() -> dict[str, str]:
  """Installed versions of jax, jaxlib and the accelerator packages."""
  found = {}
  for name in _PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def facts() -> dict[str, Any]:
  """The devices JAX sees, as text and numbers (no timing).

  Returns:
    {"platform", "device_kind", "devices", "local_devices", "processes",
    "memory_per_device_bytes", "memory_source", "platform_version",
    "versions", "host", "host_cores"}.
  """
  device = jax.devices()[0]
  limit, source = memory_limit(jax.local_devices()[0])
  try:
    platform_version = device.client.platform_version
  except AttributeError:
    platform_version = "unknown"
  return {
      "platform": device.platform, "device_kind": device.device_kind,
      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
      "processes": jax.process_count(), "memory_per_device_bytes": limit,
      "memory_source": source, "platform_version": platform_version,
      "versions": versions(), "host": platform.node(),
      "host_cores": os.cpu_count() or 1}


def measured_peak(dtype: str, rounds: int = 10, warmup: int = 2,
                  max_size: int = 16384) -> tuple[float, int]:
  """FLOP/s of one large square matrix product in `dtype` (median).

  The product is `common.matmul_call`'s: the side doubles until one
  product takes long enough that dispatch does not count.

  Args:
    dtype: "bfloat16" or "float32".
    rounds: timed products.
    warmup: untimed products first.
    max_size: the largest side tried.

  Returns:
    (FLOP/s, side of the product).
  """
  call, n = common.matmul_call(jnp.dtype(dtype), max_size=max_size)
  times = common.time_in_turn({"peak": call}, rounds, warmup)["peak"]
  return 2.0 * n**3 / statistics.median(times), n
