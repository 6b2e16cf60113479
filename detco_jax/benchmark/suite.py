r"""One command that turns the devices JAX sees into evidence.

  python -m detco_jax.benchmark.suite --out=DIR [--budget_s=480] [--smoke]
      [--parts=device,train_step,detection,pipeline,curve] [--data_dir=DIR]

On whatever devices JAX sees (GPUs, TPUs or the CPU), it runs five parts in
order, each in a time box that is its share of `--budget_s`; time a part
leaves unused goes to the next. After each measured item it rewrites
`DIR/suite.json` (every figure with its unit and the command that measures
it alone) and `DIR/suite.md` (the tables), so a run cut off at any moment
keeps what it measured.

  1. device      the device kind, count, memory, versions; a large matrix
                 product timed in bfloat16 and float32 beside the datasheet
                 peak (`devices`).
  2. train_step  the pretraining step of `python -m detco_jax.benchmark`
                 (`train_step.run`, the same function) at ResNet-50,
                 224/64 px, the paper's queue: DetCo and MoCo v2, bfloat16
                 and float32, per-device batch 64, 32, 128 and the largest
                 whose compiled memory fits the device; samples/s per
                 device, MFU, step time, compiled memory, full / backbone-
                 only ratio, and the hours 200 ImageNet epochs take at that
                 rate here and on 8 such devices.
  3. detection   the RetinaNet R50-FPN fine-tuning step of
                 `python -m detco_jax.benchmark.detection_step` at the
                 detection config's landscape shape (800 x 1344), 2
                 images per device (detectron2's 16 on 8): images/s and
                 memory.
  4. pipeline    the host input pipeline of
                 `python -m detco_jax.benchmark.input_pipeline` on all host
                 cores and on one, ImageNet-size JPEGs written on the fly,
                 against the samples/s part 2's best DetCo row consumes,
                 and the cores that takes at the one-thread rate beside
                 the host's.
  5. curve       the demo's network and data (`configs/detco.py:demo`),
                 DetCo and MoCo v2 for as many epochs as the time left
                 allows (the same for both), the kNN monitor every epoch, a
                 linear probe of each and of the untrained network (the
                 floor) at the end (`curve`).

Each item of parts 2 and 3 is first compiled for abstract inputs (FLOPs and
memory, nothing allocated), then timed only if its predicted time (from its
FLOPs, the measured peak and the MFU seen so far) fits what is left of the
part's box; what does not fit is listed with the reason. Compiled programs
go to a persistent compilation cache (a temporary directory unless
JAX_COMPILATION_CACHE_DIR is set), so timing an item does not compile its
step a second time; its `compile_s` is the first compilation's.

`--smoke` runs every part at test sizes (the tiny configs, a few steps, a
stand-in memory limit for the largest-batch search), ignores the time
boxes and compiles at XLA's lowest backend optimisation level
(`SMOKE_XLA_FLAG`): on a CPU it ends in a few minutes. Several processes (a TPU pod
slice, `launch/tpu_vm.sh`) run the same parts with the mesh over all
devices, as the jobs do; process 0 decides what fits and writes the files.
On GPUs, `launch/gpu_single_node.sh` sets the XLA flags of JAX's GPU
performance guide (`GPU_XLA_FLAGS`); the suite records the environment and
notes any of them missing. docs/accelerators.md has the how-to.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import dataclasses
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging

from detco_jax import versions as versions_lib
from detco_jax.benchmark import budget as budget_lib
from detco_jax.benchmark import devices
from detco_jax.benchmark import report as report_lib

Part = report_lib.Part

# (name, heading, share of the budget), in the order they run.
PARTS = (
    ("device", "1. The device", 0.03),
    ("train_step", "2. Pretraining step throughput (ResNet-50, 224/64 px)",
     0.35),
    ("detection", "3. The detection step (RetinaNet R50-FPN)", 0.10),
    ("pipeline", "4. The host input pipeline", 0.07),
    ("curve", "5. A long-schedule learning curve", 0.45),
)
PART_NAMES = tuple(name for name, _, _ in PARTS)
# The XLA flags JAX's GPU performance tips recommend for training
# (docs.jax.dev, "GPU performance tips"); launch/gpu_xla_flags.sh sets them
# (tests/test_suite.py checks that the two lists agree).
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",
                 "--xla_gpu_triton_gemm_any=true")
# Environment variables recorded in suite.json.
_ENVIRONMENT = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE", "CUDA_VISIBLE_DEVICES",
                "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR", "TFDS_DATA_DIR",
                "NCCL_PROTO", "NCCL_LL_BUFFSIZE", "NCCL_LL128_BUFFSIZE")
EPOCHS = 200               # The paper's schedule, for the hours figure.
SCALED_DEVICES = 8         # The hours figure also for this many devices.
# Until an item has been timed, predictions assume this MFU.
_FIRST_MFU = 0.2
# The largest-batch search aims below the memory limit by this factor: the
# timed run also holds the backbone program's views and the peak product.
_MEMORY_MARGIN = 0.9


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each part measures: the full suite's sizes, or the smoke test's.

  Attributes:
    pretrain: the configs/detco.py config string of part 2 ("": the
      paper's ResNet-50 at 224/64 px); MoCo v2 adds `mocov2`.
    batches: part 2's per-device batches, in the order tried.
    grid: part 2's (method, dtype) pairs measured at each batch.
    largest: the pairs whose largest batch is searched and measured.
    batch_step: the largest batch is searched in multiples of this.
    stand_in_memory: None: the largest batch is the largest that fits the
      device's memory; a factor: that fits this multiple of the largest
      ladder batch's memory instead (smoke: a small search on any host).
    steps: timed steps of parts 2 and 3.
    warmup: untimed steps after compilation.
    detection: the configs/detection.py config string of part 3.
    detection_pretrain: the backbone's configs/detco.py config string.
    detection_batch: images per device in part 3.
    detection_dtypes: part 3's backbone dtypes.
    jpegs: JPEGs written for part 4.
    pipeline_batch: part 4's batch.
    pipeline_warmup: untimed batches.
    windows: timed windows (median).
    window_batches: batches per window.
    curve: the configs/detco.py scale of part 5 ("demo" or "tiny").
    probe: the configs/linear_probe.py config string of part 5's probes.
    max_epochs: part 5's epochs at most (in smoke mode: exactly).
    log_every: part 5's log window (steps).
  """
  pretrain: str
  batches: tuple[int, ...]
  grid: tuple[tuple[str, str], ...]
  largest: tuple[tuple[str, str], ...]
  batch_step: int
  stand_in_memory: float | None
  steps: int
  warmup: int
  detection: str
  detection_pretrain: str
  detection_batch: int
  detection_dtypes: tuple[str, ...]
  jpegs: int
  pipeline_batch: int
  pipeline_warmup: int
  windows: int
  window_batches: int
  curve: str
  probe: str
  max_epochs: int
  log_every: int


METHODS = (("DetCo", ""), ("MoCo v2", "mocov2"))
DTYPES = ("bfloat16", "float32")
# Every (method, dtype) pair: dtype first, so that at each batch the two
# methods compare in bfloat16 before float32 is measured.
_ALL_PAIRS = tuple((label, dtype) for dtype in DTYPES
                   for label, _ in METHODS)

FULL = Sizes(pretrain="", batches=(64, 32, 128), grid=_ALL_PAIRS,
             largest=_ALL_PAIRS, batch_step=8,
             stand_in_memory=None, steps=10, warmup=2, detection="",
             detection_pretrain="", detection_batch=2,
             detection_dtypes=("float32", "bfloat16"), jpegs=300,
             pipeline_batch=64, pipeline_warmup=3, windows=5,
             window_batches=4, curve="demo", probe="demo,epochs=3",
             max_epochs=200, log_every=20)
# Each item compiles several programs, which on a 2-core CPU takes most of a
# minute: the smoke run times one batch and the largest of MoCo v2 in
# float32, whose step compiles fastest (part 5 trains DetCo too).
SMOKE = Sizes(pretrain="tiny", batches=(2,), grid=(("MoCo v2", "float32"),),
              largest=(("MoCo v2", "float32"),), batch_step=1,
              stand_in_memory=2.0, steps=2, warmup=1, detection="tiny",
              detection_pretrain="tiny", detection_batch=1,
              detection_dtypes=("float32",), jpegs=12,
              pipeline_batch=8, pipeline_warmup=1, windows=2,
              window_batches=2, curve="tiny", probe="tiny", max_epochs=2,
              log_every=4)


@dataclasses.dataclass
class Context:
  """What the parts share.

  Attributes:
    sizes: the sizes.
    budget: the time boxes.
    out: the output directory.
    data_dir: TFDS data dir of part 5 (None: TFDS's default).
    log: where progress lines go.
    peaks: dtype -> measured peak FLOP/s (part 1, or measured on demand).
    mfus: MFU of every timed step so far (predictions use the lowest).
    fastest: method -> (samples/s per device, labels) of part 2's fastest
      row of it, for part 4.
    write: rewrites suite.json and suite.md (after each measured item).
  """
  sizes: Sizes
  budget: budget_lib.Budget
  out: str
  data_dir: str | None
  log: Callable[[str], None]
  peaks: dict[str, float] = dataclasses.field(default_factory=dict)
  mfus: list[float] = dataclasses.field(default_factory=list)
  fastest: dict[str, tuple[float, dict[str, Any]]] = dataclasses.field(
      default_factory=dict)
  write: Callable[[], None] = lambda: None

  def peak(self, dtype: str) -> float:
    if dtype not in self.peaks:
      self.peaks[dtype] = devices.measured_peak(dtype, rounds=3, warmup=1)[0]
    return self.peaks[dtype]

  def predict_timing(self, figures: dict[str, float], dtype: str,
                     backbone: bool) -> float:
    """Seconds a timed run takes, from its compile-only figures.

    Loading the cached program, building the state, compiling the
    backbone-only program (about as costly as the step's) and timing
    `steps + warmup` rounds of step, backbone and peak product.
    """
    compile_s = figures.get("compile_s", 0.0)
    mfu = min(self.mfus, default=_FIRST_MFU)
    step_s = figures.get("flops_per_step", 0.0) / (self.peak(dtype) * mfu)
    rounds = self.sizes.steps + self.sizes.warmup
    per_round = step_s * (2 if backbone else 1) + 0.05
    return (0.3 * compile_s + (compile_s if backbone else 0.0)
            + rounds * per_round + 2.0)


# ----------------------------------------------------------------------------
# Part 1: the device.


def part_device(ctx: Context, part: Part) -> None:
  """Device facts, and the matmul peak beside the datasheet's."""
  facts = devices.facts()
  part.add({k: facts[k] for k in ("platform", "device_kind", "host",
                                  "memory_source")},
           {"devices": facts["devices"],
            "local_devices": facts["local_devices"],
            "processes": facts["processes"],
            "memory_per_device_bytes": facts["memory_per_device_bytes"],
            "cores": facts["host_cores"]},
           _suite_command(ctx, "device"))
  for dtype in ("bfloat16", "float32"):
    peak, n = devices.measured_peak(dtype)
    ctx.peaks[dtype] = peak
    datasheet = devices.datasheet_peak(facts["device_kind"], dtype)
    figures = {"measured_peak_flops_per_s": peak, "peak_matmul_size": n}
    if datasheet is None:
      part.notes.append(f"No datasheet peak for {facts['device_kind']!r} "
                        f"in {dtype}.")
    else:
      figures.update(datasheet_peak_flops_per_s=datasheet,
                     measured_to_datasheet_ratio=peak / datasheet)
    part.add({"dtype": dtype}, figures, _suite_command(ctx, "device"))
    ctx.log(f"{dtype} matmul: {peak / 1e12:.3g} TFLOP/s (n={n})")


def render_device(part: Part) -> list[str]:
  facts, peaks = part.rows[0], part.rows[1:]
  lines = report_lib.table(
      ["platform", "device kind", "devices (local)", "processes",
       "memory per device", "host cores"],
      [[facts.labels["platform"], facts.labels["device_kind"],
        f"{facts.figures['devices']:.0f} ({facts.figures['local_devices']:.0f})",
        f"{facts.figures['processes']:.0f}",
        f"{facts.figures['memory_per_device_bytes'] / 2**30:.1f} GiB "
        f"({facts.labels['memory_source']})",
        f"{facts.figures['cores']:.0f}"]])
  lines += [""] + report_lib.table(
      ["dtype", "matmul side", "measured TFLOP/s", "datasheet TFLOP/s",
       "measured / datasheet"],
      [[r.labels["dtype"], int(r.figures["peak_matmul_size"]),
        r.figures["measured_peak_flops_per_s"] / 1e12,
        _scaled(r.figures.get("datasheet_peak_flops_per_s"), 1e-12),
        r.figures.get("measured_to_datasheet_ratio")] for r in peaks])
  return lines


# ----------------------------------------------------------------------------
# Part 2: the pretraining step.


def pretrain_config_string(sizes: Sizes, variant: str) -> str:
  """The configs/detco.py config string of a method at part 2's scale."""
  return ",".join(filter(None, (sizes.pretrain, variant)))


def pretrain_config(sizes: Sizes, variant: str,
                    dtype: str) -> ml_collections.ConfigDict:
  """The config `--config=configs/detco.py:STRING --config.model.dtype=D`
  gives."""
  # Imported here: `configs` is importable from a checkout (cli makes it so).
  from configs import detco  # pylint: disable=g-import-not-at-top
  config = detco.get_config(pretrain_config_string(sizes, variant))
  config.model.dtype = dtype
  return config


def train_step_command(sizes: Sizes, variant: str, dtype: str, batch: int,
                       compile_only: bool = False) -> str:
  """The `python -m detco_jax.benchmark` command of one row."""
  config = "configs/detco.py"
  string = pretrain_config_string(sizes, variant)
  words = ["python", "-m", "detco_jax.benchmark",
           f"--config={config}:{string}" if string else f"--config={config}",
           f"--config.model.dtype={dtype}", f"--per_device_batch={batch}"]
  words += (["--compile_only"] if compile_only else
            [f"--steps={sizes.steps}", f"--warmup={sizes.warmup}"])
  return " ".join(words)


def largest_batch(memory_at: Callable[[int], float],
                  known: dict[int, float], limit: float, step: int,
                  fits_time: Callable[[], bool], tries: int = 4
                  ) -> tuple[int, float] | None:
  """The largest per-device batch whose compiled memory fits `limit`.

  A line through the known (batch, memory) points (memory grows by the
  activations of each sample over the fixed state) predicts the largest
  multiple of `step` under `_MEMORY_MARGIN * limit`; that batch is
  compiled, and stepped down by the measured excess until it fits.

  Args:
    memory_at: batch -> compiled memory (bytes; compiles the step).
    known: batch -> memory already measured (at least one point).
    limit: the device's memory (bytes).
    step: the batch's granularity.
    fits_time: whether another compilation fits the time left.
    tries: compilations at most.

  Returns:
    (batch, memory), or None when no batch was found in time.
  """
  points = sorted(known.items())
  if len(points) >= 2:
    slope, intercept = np.polyfit([b for b, _ in points],
                                  [m for _, m in points], 1)
  else:  # Through the origin: overestimates the slope, so too small a batch.
    slope, intercept = points[0][1] / points[0][0], 0.0
  target = _MEMORY_MARGIN * limit
  batch = int((target - intercept) / max(slope, 1e-9)) // step * step
  batch = max(step, batch)
  for _ in range(tries):
    if not fits_time():
      return None
    memory = known.get(batch) or memory_at(batch)
    known[batch] = memory
    if memory <= limit:
      return batch, memory
    batch = max(step, int(batch * target / memory) // step * step)
  return None


def _memory(figures: dict[str, float]) -> float | None:
  """The compiled step's memory per device, or None if not reported.

  XLA:TPU's peak (from the buffers' lifetimes) on TPUs; elsewhere the total
  of the buffers (arguments + outputs + temporaries - donated), an upper
  bound: XLA:CPU's "peak" leaves the temporaries out, and XLA:GPU's is
  not checked here.
  """
  if jax.devices()[0].platform == "tpu" and "memory_peak_bytes" in figures:
    return figures["memory_peak_bytes"]
  return figures.get("memory_total_bytes")


def part_train_step(ctx: Context, part: Part) -> None:
  """DetCo and MoCo v2, bfloat16 and float32, at each batch and the largest.

  Items run in priority order: every (method, dtype) of the grid at the
  first batch (so they compare at one size), then the other batches, then
  the largest batches. Each is compiled first (FLOPs and memory), then
  timed if its prediction fits the box.
  """
  items = _TrainStepItems(ctx, part)
  variants = dict(METHODS)
  for batch in ctx.sizes.batches:
    for label, dtype in ctx.sizes.grid:
      _guarded(part, f"{label} {dtype} batch {batch}", ctx.log,
               lambda: items.measure(label, variants[label], dtype, batch))
  for label, dtype in ctx.sizes.largest:
    _guarded(part, f"{label} {dtype} largest batch", ctx.log,
             lambda: items.measure_largest(label, variants[label], dtype))


class _TrainStepItems:
  """Part 2's items: compiled once each, timed when they fit.

  Attributes:
    ctx: the suite's context.
    part: where the rows go.
    compiled: (variant, dtype, batch) -> compile-only figures.
    memory: (variant, dtype) -> {batch: compiled memory}.
    compile_cost: the longest compilation so far (the next one's guess).
  """

  def __init__(self, ctx: Context, part: Part):
    # Imported here: the suite module is imported by tests of its pieces.
    from detco_jax.benchmark import train_step  # pylint: disable=g-import-not-at-top
    self._train_step = train_step
    self.ctx, self.part = ctx, part
    self.compiled: dict[tuple[str, str, int], dict[str, float]] = {}
    self.memory: dict[tuple[str, str], dict[int, float]] = {}
    self.compile_cost = 0.0

  def compile_only(self, variant: str, dtype: str,
                   batch: int) -> dict[str, float]:
    """The step's compile-only figures (`python -m detco_jax.benchmark
    --compile_only`), compiled once per item."""
    key = (variant, dtype, batch)
    if key not in self.compiled:
      figures = self._train_step.run(
          pretrain_config(self.ctx.sizes, variant, dtype),
          per_device_batch=batch, steps=1, warmup=0, compile_only=True,
          log=self.ctx.log)
      self.compiled[key] = figures
      self.compile_cost = max(self.compile_cost, figures["compile_s"])
      if _memory(figures) is not None:
        self.memory.setdefault((variant, dtype), {})[batch] = _memory(
            figures)
    return self.compiled[key]

  def measure(self, label: str, variant: str, dtype: str, batch: int,
              extra: dict[str, Any] | None = None) -> None:
    """Compiles one item, then times it if its prediction fits; a row."""
    ctx, part, sizes = self.ctx, self.part, self.ctx.sizes
    name = f"{label} {dtype} batch {batch}"
    if not ctx.budget.allows(self.compile_cost):
      part.skip(name, f"compiling it (about {self.compile_cost:.0f} s) "
                f"does not fit the {ctx.budget.left():.0f} s left")
      return
    figures = dict(self.compile_only(variant, dtype, batch))
    labels = {"method": label, "dtype": dtype, "per_device_batch": batch,
              **(extra or {})}
    predicted = ctx.predict_timing(figures, dtype, backbone=True)
    if not ctx.budget.allows(predicted):
      part.skip(f"timing {name}", f"predicted {predicted:.0f} s (from its "
                f"FLOPs, the measured peak and MFU "
                f"{min(ctx.mfus, default=_FIRST_MFU):.2f}) > "
                f"{ctx.budget.left():.0f} s left")
      part.add(labels, figures, train_step_command(sizes, variant, dtype,
                                                   batch, compile_only=True))
      ctx.write()
      return
    compile_s = figures["compile_s"]
    figures = self._train_step.run(
        pretrain_config(sizes, variant, dtype), per_device_batch=batch,
        steps=sizes.steps, warmup=sizes.warmup, backbone=True, log=ctx.log)
    figures["compile_s"] = compile_s  # Not the cache's load time.
    figures["predicted_s"] = predicted
    figures.update(throughput_figures(figures["images_per_s_per_device"],
                                      jax.device_count()))
    if "mfu" in figures:
      ctx.mfus.append(figures["mfu"])
    rate = figures["images_per_s_per_device"]
    if rate > ctx.fastest.get(label, (0.0, None))[0]:
      ctx.fastest[label] = (rate, labels)
    part.add(labels, figures, train_step_command(sizes, variant, dtype,
                                                 batch))
    ctx.write()

  def measure_largest(self, label: str, variant: str, dtype: str) -> None:
    """Finds the largest batch that fits the memory, then measures it."""
    ctx, part = self.ctx, self.part
    name = f"{label} {dtype} largest batch"
    known = self.memory.get((variant, dtype))
    if not known:
      part.skip(name, "no batch of it was compiled with a memory figure, so "
                "its memory per sample is unknown")
      return
    limit = devices.memory_limit(jax.local_devices()[0])[0]
    if ctx.sizes.stand_in_memory:
      limit = ctx.sizes.stand_in_memory * max(known.values())
      part.notes.append(f"Smoke mode: {name} is searched under a stand-in "
                        f"memory of {limit / 2**20:.1f} MiB.")
    found = largest_batch(
        lambda b: _memory(self.compile_only(variant, dtype, b)), known,
        limit, ctx.sizes.batch_step,
        lambda: ctx.budget.allows(self.compile_cost))
    if found is None:
      part.skip(name, "the search's compilations did not fit the "
                f"{ctx.budget.left():.0f} s left")
      return
    batch = budget_lib.agree(int(found[0]))
    extra = {"largest": True, "memory_limit_gib": round(limit / 2**30, 2)}
    for row in list(part.rows):  # A batch of the ladder: timed already.
      if (row.labels == {"method": label, "dtype": dtype,
                         "per_device_batch": batch}
          and "step_s" in row.figures):
        part.add({**row.labels, **extra}, row.figures, row.command)
        return
    self.measure(label, variant, dtype, batch, extra)


def throughput_figures(per_device: float, num_devices: int
                       ) -> dict[str, float]:
  """Samples/s over all devices, and the hours of 200 ImageNet epochs.

  Args:
    per_device: samples/s per device.
    num_devices: devices present.

  Returns:
    samples_per_s, imagenet_200_epochs_hours (on the devices present) and
    imagenet_200_epochs_8_devices_hours (the per-device rate on 8 devices:
    linear scaling assumed, which the data-parallel step's one all-reduce
    per step makes close on one host).
  """
  from configs import detco  # pylint: disable=g-import-not-at-top
  samples = EPOCHS * detco.get_config().num_train_examples
  return {"samples_per_s": per_device * num_devices,
          "imagenet_200_epochs_hours": samples / (per_device * num_devices)
                                       / 3600,
          "imagenet_200_epochs_8_devices_hours":
              samples / (per_device * SCALED_DEVICES) / 3600}


def render_train_step(part: Part) -> list[str]:
  rows = []
  for r in part.rows:
    f = r.figures
    rows.append([
        r.labels["method"], r.labels["dtype"],
        f"{r.labels['per_device_batch']}"
        + (" (largest)" if r.labels.get("largest") else ""),
        f.get("images_per_s_per_device"), _scaled(f.get("step_s"), 1e3),
        f.get("mfu"), _scaled(_memory(f), 2**-30),
        f.get("overhead_ratio"), f.get("flops_ratio"),
        _scaled(f.get("flops_per_step"), 1e-9),
        f.get("imagenet_200_epochs_hours"),
        f.get("imagenet_200_epochs_8_devices_hours"), f.get("compile_s")])
  return report_lib.table(
      ["method", "dtype", "batch / device", "samples/s / device",
       "step ms", "MFU", "memory GiB", "full / backbone", "FLOP ratio",
       "GFLOP / step", "200 ep. h (here)", "200 ep. h (8 dev.)",
       "compile s"], rows) + [
           "", "Per device; samples are DetCo samples (2 views + 18 "
           "patches; MoCo v2: 2 views). MFU against the matmul peak "
           "measured in the same run in the model's dtype. Memory: XLA's "
           "compiled figure (its peak on TPUs, else arguments + outputs + "
           "temporaries - donated, an upper bound). 200 epochs of ImageNet "
           "(1,281,167 images); 8 devices assume linear scaling. A row "
           "without speed was compiled only (see 'Left out')."]


# ----------------------------------------------------------------------------
# Part 3: the detection step.


def detection_command(sizes: Sizes, dtype: str, compile_only: bool) -> str:
  """The `python -m detco_jax.benchmark.detection_step` command of a row."""
  words = ["python", "-m", "detco_jax.benchmark.detection_step",
           "--config=configs/detection.py" + (f":{sizes.detection}"
                                              if sizes.detection else ""),
           "--pretrain_config=configs/detco.py" + (
               f":{sizes.detection_pretrain}" if sizes.detection_pretrain
               else ""),
           f"--pretrain_config.model.dtype={dtype}",
           f"--per_device_batch={sizes.detection_batch}"]
  words += (["--compile_only"] if compile_only else
            [f"--steps={sizes.steps}", f"--warmup={sizes.warmup}"])
  return " ".join(words)


def part_detection(ctx: Context, part: Part) -> None:
  """RetinaNet R50-FPN at the detection config's size: float32, bfloat16."""
  from configs import detco  # pylint: disable=g-import-not-at-top
  from configs import detection as detection_config  # pylint: disable=g-import-not-at-top
  from detco_jax.benchmark import detection_step  # pylint: disable=g-import-not-at-top
  sizes = ctx.sizes
  compile_cost = [0.0]

  def measure(dtype):
    config = detection_config.get_config(sizes.detection)
    pretrain = detco.get_config(sizes.detection_pretrain)
    pretrain.model.dtype = dtype
    if not ctx.budget.allows(compile_cost[0]):
      part.skip(f"{dtype}", f"compiling (about {compile_cost[0]:.0f} s) "
                f"does not fit the {ctx.budget.left():.0f} s left")
      return
    run = lambda compile_only: detection_step.run(
        config, pretrain, per_device_batch=sizes.detection_batch,
        steps=sizes.steps, warmup=sizes.warmup, compile_only=compile_only,
        log=ctx.log)
    figures = run(True)
    compile_cost[0] = max(compile_cost[0], figures["compile_s"])
    labels = {"model": "RetinaNet R50-FPN" if not sizes.detection
              else f"RetinaNet ({sizes.detection})", "dtype": dtype,
              "image_size": "x".join(str(x) for x in
                                     detection_step.detection.padded_shapes(
                                         config)[0]),
              "per_device_batch": sizes.detection_batch}
    predicted = ctx.predict_timing(figures, dtype, backbone=False)
    if not ctx.budget.allows(predicted):
      part.skip(f"timing {dtype}", f"predicted {predicted:.0f} s > "
                f"{ctx.budget.left():.0f} s left")
      part.add(labels, figures, detection_command(sizes, dtype, True))
    else:
      compile_s = figures["compile_s"]
      figures = run(False)
      figures["compile_s"] = compile_s
      figures["predicted_s"] = predicted
      part.add(labels, figures, detection_command(sizes, dtype, False))
    ctx.write()

  for dtype in sizes.detection_dtypes:
    _guarded(part, dtype, ctx.log, lambda: measure(dtype))


def render_detection(part: Part) -> list[str]:
  return report_lib.table(
      ["model", "dtype", "image px", "batch / device", "images/s / device",
       "step ms", "MFU", "memory GiB", "GFLOP / step", "compile s"],
      [[r.labels["model"], r.labels["dtype"], r.labels["image_size"],
        r.labels["per_device_batch"],
        r.figures.get("images_per_s_per_device"),
        _scaled(r.figures.get("step_s"), 1e3), r.figures.get("mfu"),
        _scaled(_memory(r.figures), 2**-30),
        _scaled(r.figures.get("flops_per_step"), 1e-9),
        r.figures.get("compile_s")] for r in part.rows])


# ----------------------------------------------------------------------------
# Part 4: the host input pipeline.


def pipeline_command(sizes: Sizes) -> str:
  """The `python -m detco_jax.benchmark.input_pipeline` command."""
  return (f"python -m detco_jax.benchmark.input_pipeline --skip_builtin "
          f"--num_images={sizes.jpegs} --batch_size={sizes.pipeline_batch} "
          f"--warmup={sizes.pipeline_warmup} --windows={sizes.windows} "
          f"--window_batches={sizes.window_batches}")


def part_pipeline(ctx: Context, part: Part) -> None:
  """DetCo samples/s through the host pipeline on ImageNet-size JPEGs."""
  # Imported here: it imports TensorFlow.
  from detco_jax.benchmark import input_pipeline  # pylint: disable=g-import-not-at-top
  from detco_jax.benchmark import photos  # pylint: disable=g-import-not-at-top
  sizes = ctx.sizes
  cores, usable = host_cores()
  need = _needed(ctx, part)
  samples = (sizes.pipeline_warmup + sizes.windows * sizes.window_batches
             ) * sizes.pipeline_batch
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    try:
      photos.write_folder(tmp, sizes.jpegs)
    except ImportError as e:  # No scikit-image: no photographs to time.
      part.skip("all", str(e))
      return
    write_s = time.perf_counter() - start
    config = input_pipeline.imagenet_config(tmp, sizes.pipeline_batch)
    # Before any rate is known: 50 samples/s per core, half the pipeline's
    # target (input_pipeline's docstring).
    rate = 50.0 * cores
    for one_thread in (False, True):
      threads = "1" if one_thread else "all"
      predicted = 5.0 + samples / (rate / cores if one_thread else rate)
      if not ctx.budget.allows(predicted):
        part.skip(f"{threads} threads", f"predicted {predicted:.0f} s > "
                  f"{ctx.budget.left():.0f} s left")
        continue
      r = input_pipeline.measure(config, one_thread=one_thread,
                                 warmup=sizes.pipeline_warmup,
                                 windows=sizes.windows,
                                 window_batches=sizes.window_batches)
      figures = {"samples_per_s": r["wall"],
                 "samples_per_s_per_core": r["wall"] if one_thread
                                           else r["wall"] / cores,
                 "samples_per_cpu_s": r["cpu"], "cores": cores,
                 "usable_cores": usable,
                 "jpegs": sizes.jpegs, "write_jpegs_s": write_s}
      if not one_thread:
        rate = r["wall"]
      figures.update(need_figures(need, r["wall"], one_thread))
      part.add({"threads": threads}, figures, pipeline_command(sizes))
      ctx.write()


def host_cores() -> tuple[int, int]:
  """The host's logical CPUs, and those this process may run on.

  Returns:
    (os.cpu_count(), the size of this process's CPU affinity set); the
    second is the first where the platform has no affinity call.
  """
  cores = os.cpu_count() or 1
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:  # No affinity call (macOS).
    usable = cores
  return cores, usable


def _needed(ctx: Context, part: Part) -> float | None:
  """What part 2's fastest DetCo row consumes per host, in samples/s.

  The pipeline measured is DetCo's (views and patches); without a timed
  DetCo row, the fastest row of another method stands in, and is said to.

  Args:
    ctx: the suite's context (part 2's fastest rows).
    part: part 4, whose notes say where the figure comes from.

  Returns:
    The row's samples/s per device times this host's devices; None if
    part 2 timed no step.
  """
  if not ctx.fastest:
    part.notes.append("No step was timed in part 2: no need to compare the "
                      "pipeline with.")
    return None
  method = "DetCo" if "DetCo" in ctx.fastest else max(
      ctx.fastest, key=lambda m: ctx.fastest[m][0])
  per_device, labels = ctx.fastest[method]
  part.notes.append(
      "Needed: part 2's fastest " + method + " row ("
      + ", ".join(f"{k} {v}" for k, v in labels.items())
      + f") on this host's {jax.local_device_count()} devices. The pipeline "
      "is DetCo's at ImageNet sizes (500x375 JPEGs, 224 px views, 64 px "
      "patches)"
      + ("" if method == "DetCo" else f", {method}'s step consumes fewer "
         "images per sample")
      + ("; in smoke mode part 2's sizes differ, so the ratio is no "
         "evidence." if ctx.sizes is SMOKE else "."))
  return per_device * jax.local_device_count()


def need_figures(need: float | None, rate: float,
                 one_thread: bool) -> dict[str, float]:
  """A pipeline row's samples/s against what the host's devices consume.

  Args:
    need: samples/s part 2's step consumes on this host (None: no step
      was timed).
    rate: the row's samples/s.
    one_thread: whether the row ran tf.data on one thread, so that `rate`
      is the per-core rate.

  Returns:
    {} without a need; else needed_samples_per_s and supply_to_need_ratio
    (rate / need) and, on the one-thread row, cores_needed: the cores the
    need takes at that row's per-core rate, ceil(need / rate).
  """
  if need is None:
    return {}
  figures = {"needed_samples_per_s": need,
             "supply_to_need_ratio": rate / need}
  if one_thread:
    figures["cores_needed"] = math.ceil(need / rate)
  return figures


def _cores_here(figures: dict[str, float]) -> str | None:
  """The host's cores, and in brackets those usable where fewer."""
  if "cores" not in figures:
    return None
  cores, usable = figures["cores"], figures.get("usable_cores")
  return f"{cores:.0f}" + ("" if usable in (None, cores)
                           else f" ({usable:.0f} usable)")


def render_pipeline(part: Part) -> list[str]:
  return report_lib.table(
      ["threads", "samples/s", "per core", "per CPU-second", "needed",
       "supply / need", "cores needed", "cores here"],
      [[r.labels["threads"], r.figures.get("samples_per_s"),
        r.figures.get("samples_per_s_per_core"),
        r.figures.get("samples_per_cpu_s"),
        r.figures.get("needed_samples_per_s"),
        r.figures.get("supply_to_need_ratio"),
        _count(r.figures.get("cores_needed")),
        _cores_here(r.figures)] for r in part.rows]) + [
            "", "DetCo samples (2 global views + 2 x 9 jigsaw patches) "
            "per second through the real host pipeline "
            "(`make_pretrain_dataset`): JPEG decode, crops, patches, "
            "batching; 'per core' divides the all-core rate by the host's "
            "cores. 'Cores needed': the cores 'needed' takes at the "
            "one-thread rate, ceil(needed / one-thread samples/s); 'cores "
            "here': os.cpu_count(), and in brackets the cores this process "
            "may run on where fewer."]


def _count(value: float | None) -> int | None:
  return None if value is None else int(value)


# ----------------------------------------------------------------------------
# Running the parts.


def _scaled(value: float | None, factor: float) -> float | None:
  return None if value is None else value * factor


def _guarded(part: Part, item: str, log: Callable[[str], None],
             fn: Callable[[], None]) -> None:
  """Runs one item; an error (e.g. out of memory) is recorded, not raised,
  so that the part goes on with its next item."""
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:300]
    log(f"{item} failed: {type(e).__name__}: {first}\n"
        + traceback.format_exc())
    part.skip(item, f"failed: {type(e).__name__}: {first}")


def _suite_command(ctx: Context, part: str) -> str:
  smoke = " --smoke" if ctx.sizes is SMOKE else ""
  return (f"python -m detco_jax.benchmark.suite --out={ctx.out} "
          f"--parts={part}{smoke}")


def environment() -> dict[str, str]:
  """The environment variables that change what is measured."""
  return {k: os.environ[k] for k in _ENVIRONMENT if k in os.environ}


def gpu_flags_missing(xla_flags: str) -> list[str]:
  """Which of `GPU_XLA_FLAGS` (by name) `xla_flags` does not set."""
  given = {word.split("=", 1)[0] for word in xla_flags.split()}
  return [f for f in GPU_XLA_FLAGS if f.split("=", 1)[0] not in given]


def _header(out: str, budget_s: float, smoke: bool,
            parts: tuple[str, ...], argv: list[str]) -> dict[str, Any]:
  facts = devices.facts()
  env = environment()
  # The packages that decide a result, then the accelerator builds.
  versions = {**versions_lib.installed(), **facts["versions"]}
  header = {
      "command": " ".join(shlex.quote(a) for a in ["python", "-m",
                                                   "detco_jax.benchmark.suite",
                                                   *argv[1:]]),
      "started": report_lib.now(), "budget_s": budget_s, "smoke": smoke,
      "parts": list(parts), "out": out, "environment": env,
      "gpu_xla_flags_recommended": list(GPU_XLA_FLAGS),
      "device_line": f"{facts['devices']} x {facts['device_kind']} "
                     f"({facts['platform']}), {facts['processes']} "
                     f"process(es), host {facts['host']}",
      "versions": versions,
      "versions_line": versions_lib.line(versions)
                       + f"; platform {facts['platform_version']}",
      "header_notes": [], "finished": False, "elapsed_s": 0.0}
  if facts["platform"] == "gpu":
    missing = gpu_flags_missing(env.get("XLA_FLAGS", ""))
    header["gpu_xla_flags_missing"] = missing
    if missing:
      header["header_notes"].append(
          "GPU run without the launcher's XLA flags "
          f"({' '.join(missing)}): start it with launch/gpu_single_node.sh.")
  if smoke:
    header["header_notes"].append(
        "Smoke mode: test sizes (tiny configs, a few steps), time boxes "
        "ignored. No figure here is evidence of speed or learning.")
  return header


def _compilation_cache() -> str | None:
  """Turns on the persistent compilation cache in a temporary directory,
  unless one is configured; returns the directory to remove at the end."""
  if jax.config.jax_compilation_cache_dir:
    return None
  directory = tempfile.mkdtemp(prefix="detco_suite_xla_cache_")
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program: the kNN monitor jits its feature extractor anew at each
  # evaluation, and would compile it again after every epoch of part 5.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory


PART_FUNCTIONS = {"device": part_device, "train_step": part_train_step,
                  "detection": part_detection, "pipeline": part_pipeline}
RENDERERS = {"device": render_device, "train_step": render_train_step,
             "detection": render_detection, "pipeline": render_pipeline}


def parse_parts(text: str) -> tuple[str, ...]:
  """`--parts`: names in the suite's order.

  Raises:
    ValueError: an unknown name; the message lists the parts.
  """
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in PART_NAMES]
  if unknown or not names:
    raise ValueError(f"--parts: unknown {unknown or text!r}; choose from "
                     f"{','.join(PART_NAMES)}.")
  return tuple(n for n in PART_NAMES if n in names)


def run(out: str, *, budget_s: float = 480.0, smoke: bool = False,
        parts: tuple[str, ...] = PART_NAMES, data_dir: str | None = None,
        argv: list[str] | None = None,
        log: Callable[[str], None] = logging.info) -> report_lib.Report:
  """Runs the suite's parts; writes suite.json and suite.md as it goes.

  Args:
    out: the output directory (local, or gs:// on a pod slice).
    budget_s: seconds for the whole suite.
    smoke: test sizes, no time boxes.
    parts: which parts, in the suite's order.
    data_dir: TFDS data dir for part 5's built-in dataset (None: TFDS's
      default or $TFDS_DATA_DIR).
    argv: the command line, for the record.
    log: where progress lines go.

  Returns:
    The report (as written).

  Raises:
    ValueError: several processes writing to a local directory.
  """
  from detco_jax.benchmark import curve  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1 and "curve" in parts and "://" not in out:
    raise ValueError(f"--out={out} is local, but the {jax.process_count()} "
                     "processes' learning-curve runs must share their "
                     "workdirs: use a gs:// directory.")
  cache = _compilation_cache()
  sizes = SMOKE if smoke else FULL
  budget = budget_lib.Budget(
      budget_s, {name: share for name, _, share in PARTS}, parts, force=smoke)
  header = _header(out, budget_s, smoke, parts, argv or sys.argv)
  all_parts = [Part(name, title) for name, title, _ in PARTS]
  report = report_lib.Report(out, header, all_parts,
                             dict(RENDERERS, curve=curve.render))
  functions = dict(PART_FUNCTIONS, curve=curve.run_part)
  ctx = Context(sizes, budget, out, data_dir, log, write=report.write)
  try:
    for part in report.parts.values():
      if part.name not in parts:
        part.status = "not run"
        continue
      part.box_s = budget.start(part.name)
      part.status = "running"
      report.write()
      start = time.perf_counter()
      log(f"Part {part.title}: {part.box_s:.0f} s.")
      try:
        functions[part.name](ctx, part)
        part.status = "done"
      except Exception as e:  # pylint: disable=broad-except
        part.status = "failed"
        part.error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        log(traceback.format_exc())
      part.elapsed_s = time.perf_counter() - start
      header["elapsed_s"] = budget.elapsed()
      report.write()
    header["finished"] = True
    header["elapsed_s"] = budget.elapsed()
    report.write()
  finally:
    if cache:
      shutil.rmtree(cache, ignore_errors=True)
  return report


def define_flags() -> None:
  """The suite's flags."""
  flags.DEFINE_string("out", None, "Directory for suite.json and suite.md "
                      "(local, or gs:// on a pod slice).")
  flags.DEFINE_alias("workdir", "out")  # What the launch scripts pass.
  flags.DEFINE_float("budget_s", 480.0, "Seconds for the whole suite; each "
                     "part gets its share.")
  flags.DEFINE_bool("smoke", False, "Every part at test sizes, ignoring the "
                    "time boxes (a CPU check of the suite itself).")
  flags.DEFINE_string("parts", ",".join(PART_NAMES),
                      "Comma-separated parts to run.")
  flags.DEFINE_string("data_dir", None, "TFDS data dir for the built-in "
                      "dataset of part 5; default $TFDS_DATA_DIR or TFDS's.")
  flags.mark_flags_as_required(["out"])


def main() -> None:
  """Runs the suite with the command-line flags."""
  f = flags.FLAGS
  report = run(f.out, budget_s=f.budget_s, smoke=f.smoke,
               parts=parse_parts(f.parts), data_dir=f.data_dir,
               argv=sys.argv)
  for part in report.parts.values():
    logging.info("%s: %s, %d rows, %d left out.", part.title, part.status,
                 len(part.rows), len(part.skipped))
  logging.info("Wrote %s/%s and %s.", f.out, report_lib.JSON_FILE,
               report_lib.MARKDOWN_FILE)


# Smoke runs compile a few dozen programs and time none of them for
# evidence: LLVM at its lowest optimisation level compiles them about twice
# as fast on a CPU (they then run slower, which a smoke run does not
# measure). Set before JAX starts its backends; a level the caller's
# XLA_FLAGS names wins.
SMOKE_XLA_FLAG = "--xla_backend_optimization_level=0"


def smoke_environment(argv: list[str], environ: dict[str, str]) -> None:
  """Adds `SMOKE_XLA_FLAG` to `environ["XLA_FLAGS"]` for a --smoke run."""
  if not any(a in ("--smoke", "--smoke=true", "--smoke=True") for a in argv):
    return
  flags_now = environ.get("XLA_FLAGS", "")
  if SMOKE_XLA_FLAG.split("=", 1)[0] not in flags_now:
    environ["XLA_FLAGS"] = f"{flags_now} {SMOKE_XLA_FLAG}".strip()


if __name__ == "__main__":
  smoke_environment(sys.argv, os.environ)
  cli.make_configs_importable(
      ["--config=" + os.path.join(os.path.dirname(os.path.dirname(
          os.path.dirname(os.path.abspath(__file__)))), "configs",
                                  "detco.py")])
  cli.run(main, define_flags)
