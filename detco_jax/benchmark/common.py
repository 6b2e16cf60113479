"""What the step benchmarks share: devices, compilation, XLA's figures, timing.

`train_step` (the DetCo pretraining step, `python -m detco_jax.benchmark`)
and `detection_step` (the RetinaNet fine-tuning step, `python -m
detco_jax.benchmark.detection_step`) measure a real jitted step the same
way, with the functions here:

  * the devices: the local ones, or with `--compile_only --topology=v3:2x2`
    a TPU topology's compile-only devices (`topology_devices`, libtpu);
  * the step compiled once ahead of time for abstract arguments (shapes,
    dtypes, shardings: `with_shardings`), so that `--compile_only`
    allocates nothing, and what XLA says about it (`compile_figures`:
    compile_s, flops_per_step, memory_*_bytes);
  * the step (its donated state threaded through, `threaded_call`) timed in
    turn with one large matrix product in the compute dtype, the device's
    peak (`time_step`), and the speed figures from the medians
    (`speed_figures`: step_s, images_per_s_per_device, peak_flops_per_s,
    achieved_flops_per_s, mfu);
  * the figures printed one `name: value` line each (`log_figures`);
  * the flags both commands take (`define_flags`).
"""

import functools
import statistics
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import flags
from absl import logging
from ml_collections import config_flags

Figures = dict[str, float]


# ----------------------------------------------------------------------------
# Flags and devices.


def define_flags(config_help: str) -> None:
  """Defines the flags every step benchmark takes.

  `--config` (a config file), `--per_device_batch`, `--steps`, `--warmup`,
  `--compile_only`, `--topology` and `--chip_config`; read them from
  `flags.FLAGS` once parsed.

  Args:
    config_help: help text of `--config` (name an example config).
  """
  config_flags.DEFINE_config_file("config", None, config_help,
                                  lock_config=True)
  flags.DEFINE_integer(
      "per_device_batch", None,
      "Images per device; default: config.batch_size // device count.")
  flags.DEFINE_integer("steps", 10, "Timed steps (median).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps run after compilation.")
  flags.DEFINE_bool(
      "compile_only", False, "Compile the step and print its FLOPs and "
      "memory; allocate and run nothing.")
  flags.DEFINE_string(
      "topology", None, "With --compile_only: compile for this TPU topology "
      "instead of the local devices, e.g. v3:2x2 (a v3-8: 8 cores) or "
      "v4:2x2x1 (a v4-8); needs the libtpu package, runs on any host.")
  flags.DEFINE_string(
      "chip_config", None, "With --topology: libtpu's chip configuration, "
      "e.g. megacore (one device per v4 / v5p chip, as JAX shows them).")
  flags.mark_flags_as_required(["config"])


def topology_devices(name: str, chip_config: str | None = None
                     ) -> list[jax.Device]:
  """Compile-only devices of a TPU topology, e.g. "v3:2x2" (a v3-8).

  libtpu compiles for them on any host, a CPU one included, so the memory
  a step needs on a TPU can be read without one. XLA:CPU's own figures are
  no stand-in: its scheduler undoes rematerialisation (a `jax.checkpoint`ed
  layer stack compiles to more temp memory than the plain one there, and
  to 45% less for TPU), and it assigns buffers differently.

  Args:
    name: the topology, as libtpu names it ("v3:2x2", "v4:2x2x1").
    chip_config: e.g. "megacore"; None: libtpu's default (one device per
      TensorCore).

  Returns:
    The devices, which can form a mesh and be compiled for, not run on.
  """
  # Imported here: only this path needs it, and it needs libtpu.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": chip_config} if chip_config else {}
  return list(topologies.get_topology_desc(
      topology_name=name, platform="tpu", **kwargs).devices)


def step_devices(topology: str | None, chip_config: str | None,
                 compile_only: bool) -> list[jax.Device]:
  """The devices to compile (and run) the step on.

  Args:
    topology: a TPU topology (`topology_devices`), or None for the local
      devices.
    chip_config: the topology's chip configuration.
    compile_only: whether the step is only compiled.

  Returns:
    The devices.

  Raises:
    ValueError: a topology without `compile_only` (its devices cannot run
      anything); raised before any work.
  """
  if topology and not compile_only:
    raise ValueError("A TPU topology can only be compiled for: add "
                     "--compile_only.")
  return topology_devices(topology, chip_config) if topology else jax.devices()


def describe_devices(devices: list[jax.Device]) -> str:
  """The report's line about the devices, e.g. "devices: 8 x cpu (cpu)"."""
  return (f"devices: {len(devices)} x {devices[0].platform} "
          f"({devices[0].device_kind})")


# ----------------------------------------------------------------------------
# Compilation, and what XLA says about a compiled program.


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `shapes` (a pytree) with the given shardings.

  Args:
    shapes: arrays or shape-dtype structs (e.g. from `jax.eval_shape`).
    shardings: one sharding for every leaf, or a pytree of them with the
      structure of `shapes`.

  Returns:
    The abstract arguments a jitted function can be compiled for.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, shapes)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of each array of `tree`."""
  return with_shardings(tree, jax.tree.map(lambda x: x.sharding, tree))


def compile_with_warnings(jitted: Callable, *args) -> tuple[Any, float,
                                                            list[str]]:
  """AOT-compiles `jitted` for `args` (arrays or ShapeDtypeStructs).

  Returns:
    (compiled, seconds, warnings): XLA's executable, the lowering plus
    compile time, and the text of any warning raised meanwhile (e.g. donated
    buffers that could not be reused).
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
  logging.info("Compiled %s in %.1f s.", getattr(jitted, "__name__", "?"),
               seconds)
  return compiled, seconds, [str(w.message).splitlines()[0] for w in caught]


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one run of a compiled (per-device) program, or None.

  `cost_analysis()` returned a list of dicts (one per program) in older jax
  and returns a dict now; some backends return None or no "flops".
  """
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or cost.get("flops") is None or cost["flops"] < 0:
    return None
  return float(cost["flops"])


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Per-device buffer sizes of a compiled program (empty if unknown).

  Returns:
    `{"arguments", "outputs", "aliased", "temp", "total"[, "peak"]}` in
    bytes: total = arguments + outputs + temp - aliased, since a donated
    argument reused as an output is one buffer; "peak" is XLA's own peak
    where the backend reports one.
  """
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return {}
  if isinstance(stats, (list, tuple)):
    stats = stats[0] if stats else None
  if stats is None:
    return {}
  get = lambda name: int(getattr(stats, name, 0) or 0)
  mem = {"arguments": get("argument_size_in_bytes"),
         "outputs": get("output_size_in_bytes"),
         "aliased": get("alias_size_in_bytes"),
         "temp": get("temp_size_in_bytes")}
  mem["total"] = (mem["arguments"] + mem["outputs"] + mem["temp"]
                  - mem["aliased"])
  if get("peak_memory_in_bytes") > 0:
    mem["peak"] = get("peak_memory_in_bytes")
  return mem


def compile_figures(jitted: Callable, *args,
                    log: Callable[[str], None]) -> tuple[Any, Figures]:
  """Compiles a step for `args`; reads its FLOPs and memory.

  Args:
    jitted: the jitted step.
    *args: its arguments, abstract (`with_shardings`) or real.
    log: where warnings raised while compiling go (e.g. donated buffers
      that could not be reused).

  Returns:
    (compiled step, figures: compile_s, flops_per_step where the backend
    counts them, memory_*_bytes where it reports them).
  """
  compiled, seconds, caught = compile_with_warnings(jitted, *args)
  for message in caught:
    log(f"warning while compiling the step: {message}")
  figures: Figures = {"compile_s": seconds}
  flops = compiled_flops(compiled)
  if flops is not None:
    figures["flops_per_step"] = flops
  for name, value in compiled_memory(compiled).items():
    figures[f"memory_{name}_bytes"] = value
  return compiled, figures


# ----------------------------------------------------------------------------
# Timing.


def matmul_call(dtype: Any, min_seconds: float = 0.02,
                max_size: int = 16384) -> tuple[Callable[[], jax.Array], int]:
  """A square matrix product big enough to run near the device's peak.

  The side doubles from 512 until one product takes `min_seconds` (so that
  dispatch is negligible) or reaches `max_size`; platform-independent.

  Args:
    dtype: the compute dtype.
    min_seconds: shortest acceptable run.
    max_size: largest side tried.

  Returns:
    (call, n): a no-argument function running the n x n product on the
    default device, and n.
  """
  n = 512
  while True:
    a, b = jax.jit(lambda k, n=n: jax.random.normal(k, (2, n, n), dtype))(
        jax.random.key(0))
    product = jax.jit(jnp.matmul)
    call = functools.partial(product, a, b)
    jax.block_until_ready(call())  # Compile.
    if n >= max_size or min(seconds(call) for _ in range(3)) >= min_seconds:
      return call, n
    n *= 2


def seconds(call: Callable[[], Any]) -> float:
  """Wall seconds of `call()`, blocked on its device arrays."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


def threaded_call(compiled: Callable, box: dict[str, Any],
                  *args: Any) -> Callable[[], Any]:
  """A no-argument call of a step that donates its state.

  Each call runs `compiled(state, *args) -> (state, outputs)` on the state
  in `box` and puts the new one back, since a donated state cannot be used
  again; other calls sharing the box see the same current state.

  Args:
    compiled: the step.
    box: `{"state": the current state}`, updated by each call.
    *args: the step's other arguments, the same at every call.

  Returns:
    The call, returning `(state, outputs)`.
  """
  def call():
    box["state"], outputs = compiled(box["state"], *args)
    return box["state"], outputs

  return call


def time_in_turn(calls: Mapping[str, Callable[[], Any]], steps: int,
                 warmup: int) -> dict[str, list[float]]:
  """Seconds of each call, the calls taken in turn, round after round.

  Args:
    calls: name -> a no-argument function returning device arrays (blocked
      on before the clock stops).
    steps: timed rounds.
    warmup: untimed rounds first.

  Returns:
    name -> the `steps` durations in seconds.
  """
  times = {name: [] for name in calls}
  logging.info("Timing %s: %d warm-up and %d timed rounds.",
               ", ".join(calls), warmup, steps)
  for i in range(warmup + steps):
    for name, call in calls.items():
      duration = seconds(call)
      if i >= warmup:
        times[name].append(duration)
  return times


def time_step(step: Callable[[], Any], dtype: Any, steps: int, warmup: int,
              others: Mapping[str, Callable[[], Any]] | None = None
              ) -> tuple[dict[str, list[float]], int]:
  """Times the step in turn with the peak matrix product (and `others`).

  Args:
    step: a no-argument call of the step (`threaded_call`).
    dtype: the compute dtype of the peak product (the model's).
    steps: timed rounds.
    warmup: untimed rounds first.
    others: more calls timed in the same rounds, after those two.

  Returns:
    (times, n): `time_in_turn`'s seconds under "step", "peak" and the names
    of `others`, and the side of the peak product.
  """
  peak_call, peak_n = matmul_call(dtype)
  calls = {"step": step, "peak": peak_call, **(others or {})}
  return time_in_turn(calls, steps, warmup), peak_n


def speed_figures(times: Mapping[str, list[float]], figures: Figures,
                  per_device_batch: int, peak_n: int) -> Figures:
  """Speed figures from `time_step`'s timings (medians) and the FLOPs.

  Args:
    times: name -> seconds per call, with "step" and "peak".
    figures: the compile-time figures (flops_per_step where known).
    per_device_batch: images per device.
    peak_n: side of the peak matrix product.

  Returns:
    step_s (its median; step_s_min, step_s_max), images_per_s_per_device,
    peak_matmul_size, peak_flops_per_s and, with the FLOPs known,
    achieved_flops_per_s and mfu.
  """
  step_s = statistics.median(times["step"])
  out: Figures = {
      "step_s": step_s, "step_s_min": min(times["step"]),
      "step_s_max": max(times["step"]),
      "images_per_s_per_device": per_device_batch / step_s,
      "peak_matmul_size": peak_n,
      "peak_flops_per_s": 2.0 * peak_n**3 / statistics.median(times["peak"])}
  if "flops_per_step" in figures:
    out["achieved_flops_per_s"] = figures["flops_per_step"] / step_s
    out["mfu"] = out["achieved_flops_per_s"] / out["peak_flops_per_s"]
  return out


def log_figures(figures: Figures, log: Callable[[str], None]) -> None:
  """One `name: value` line per figure."""
  for name, value in figures.items():
    if isinstance(value, int) or (float(value).is_integer()
                                  and abs(value) >= 1e3):
      log(f"{name}: {int(value)}")
    else:
      log(f"{name}: {value:.4g}")
