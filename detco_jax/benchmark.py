r"""Speed, FLOPs, MFU and memory of the jitted DetCo train step.

  python -m detco_jax.benchmark --config=configs/detco.py[:variant] \
      [--config.key=value ...] [--per_device_batch=B] [--steps=N] \
      [--warmup=N] [--compile_only [--topology=v3:2x2]] [--nobackbone] \
      [--breakdown]

What is timed is the real step of `step.make_train_step`, compiled once
ahead of time, on a synthetic uint8 batch made once on the devices with the
step's input sharding: no host-to-device transfer, no compilation and no
warm-up step is in the figures. Each step is blocked on; figures are
medians over `--steps` steps. Printed, one `name: value` line each, per
device:

  step_s                    median seconds per step (and its min and max);
  images_per_s_per_device   DetCo samples (one image, all its views) per s;
  flops_per_step            FLOPs of the compiled per-device program (XLA's
                            cost analysis; with `model.remat` it counts the
                            recomputation too);
  achieved_flops_per_s      flops_per_step / step_s;
  peak_flops_per_s          one large matrix product in the compute dtype
                            (`model.dtype`, default precision, as the model
                            runs its convolutions), timed in the same run;
  mfu                       achieved / peak;
  memory_*_bytes            the compiled step's buffers (`memory_analysis`):
                            arguments, outputs, aliased (donated state reused
                            as output), temp, total = arguments + outputs +
                            temp - aliased, and XLA's own peak where the
                            backend reports one (XLA:TPU's counts the
                            temporaries' overlap; XLA:CPU's leaves them out:
                            read total there).

With `--backbone` (default) it also times the backbone alone doing DetCo's
irreducible work (forward + backward on I_q and P_q, forward on I_k and
P_k, the same ResNet, parameters and BN grouping, a trivial loss) and
prints `overhead_ratio` = full step / backbone-only and `flops_ratio`, the
same for compiled FLOPs (about 1.03 on one device; much more means work
that runs replicated instead of split over the devices, and is warned
about). `--breakdown` also times, each alone: the photometric augmentation,
the shuffle-BN permutation, heads + loss on precomputed stage maps, the
optimiser update, EMA + enqueue, and the real step with the photometric
ops off; `unaccounted_s` is the step minus backbone and pieces.

All timed functions are called in turn, one round after another, so that a
load that changes during the run (a shared machine) affects them alike; the
ratios are ratios of medians (`overhead_ratio_paired`: median of the
per-round ratios).

The global batch is `per_device_batch` x devices; `queue_size` and
`bn_groups` are changed where the batch needs it, and the changes are
printed. On CPU with fake devices (`--xla_force_host_platform_device_count`)
all devices share the host's cores, so per-device speeds are shares of it.

`--compile_only --topology=v3:2x2` (a v3-8; `v4:2x2x1 --chip_config=megacore`
for a v4-8) compiles the step for a TPU that is not there, with the libtpu
package installed (`pip install libtpu==0.0.42.*` for jax 0.10.2; one such
process at a time): the memory a TPU needs, read on any host. XLA:CPU's
memory figures are no stand-in for it: its scheduler undoes
rematerialisation and it assigns buffers differently.

Measured on 2026-11-22 on a 2-core CPU VM, one device, while other jobs
loaded it (load average 6-10: the times are several times slower than on
an idle machine, the FLOPs exact, the ratios measured side by side):

  configs/detco.py --per_device_batch=8   ResNet-50, 224/64 px: 0.19 img/s,
      442 GFLOP/step, MFU 0.23, overhead_ratio 1.06, flops_ratio 1.029.
  configs/detco.py:demo                   ResNet-18/16, 48/16 px, batch 64:
      15 img/s, 71.6 GFLOP/step, MFU 0.25, overhead_ratio 1.01.
  configs/detco.py:tiny                   ResNet-10/8, 32/10 px, batch 16:
      177 img/s, 1.0 GFLOP/step, MFU 0.10, overhead_ratio 1.30 (fixed
      per-step costs weigh at 70 ms a step).
"""

import functools
import statistics
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app
from absl import flags
from absl import logging
from jax.sharding import Mesh
from ml_collections import config_flags

from detco_jax import config_lib
from detco_jax import losses
from detco_jax import momentum
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax.data import augment
from detco_jax.models import detco as detco_lib
from detco_jax.models import heads
from detco_jax.models import resnet

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/detco.py:demo.",
    lock_config=True)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None,
    "Images per device; default: config.batch_size // device count.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median).")
_WARMUP = flags.DEFINE_integer("warmup", 2,
                               "Untimed steps run after compilation.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the step and print its FLOPs and "
    "memory; allocate and run nothing.")
_BACKBONE = flags.DEFINE_bool(
    "backbone", True, "Also time the backbone alone and print the overhead "
    "ratio full step / backbone-only.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also time the step's pieces on their own "
    "(augmentation, encoders + loss, optimiser, EMA + enqueue).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: compile for this TPU topology "
    "instead of the local devices, e.g. v3:2x2 (a v3-8: 8 cores) or "
    "v4:2x2x1 (a v4-8); needs the libtpu package, runs on any host.")
_CHIP_CONFIG = flags.DEFINE_string(
    "chip_config", None, "With --topology: libtpu's chip configuration, "
    "e.g. megacore (one device per v4 / v5p chip, as JAX shows them).")
flags.mark_flags_as_required(["config"])

Batch = dict[str, jax.Array]
Figures = dict[str, float]
# The step's pieces besides the backbone, timed alone by --breakdown.
PIECES = ("augment", "shuffle", "heads_loss", "optimizer", "ema_enqueue")
# Heads, loss and updates add about 3% to the backbone's FLOPs; much more
# per device means work that is not split over the devices.
_MAX_FLOPS_RATIO = 1.3


# ----------------------------------------------------------------------------
# Set-up.


def fit_config(config: ml_collections.ConfigDict, per_device_batch: int,
               num_devices: int) -> list[str]:
  """Sets the global batch; makes `queue_size` and `bn_groups` fit it.

  Args:
    config: the experiment config, changed in place.
    per_device_batch: images per device.
    num_devices: devices in the mesh.

  Returns:
    One "key old -> new" line per changed value.
  """
  changes = []

  def change(key, value):
    if config[key] != value:
      changes.append(f"{key} {config[key]} -> {value}")
      config[key] = value

  batch = per_device_batch * num_devices
  change("batch_size", batch)
  if config.queue_size % batch:
    change("queue_size", max(1, round(config.queue_size / batch)) * batch)
  if config.bn == "shuffle" and batch % config.bn_groups:
    change("bn_groups", max(g for g in range(1, config.bn_groups + 1)
                            if batch % g == 0))
  return changes


def batch_shapes(config: ml_collections.ConfigDict
                 ) -> dict[str, tuple[int, ...]]:
  """Shapes of a step's uint8 batch: global views and, if used, patches."""
  b, s = config.batch_size, config.views.global_size
  p = config.views.patch_size
  shapes = {"global": (b, 2, s, s, 3)}
  if config_lib.uses_local(config):
    shapes["local"] = (b, 2, heads.NUM_PATCHES, p, p, 3)
  return shapes


def synthetic_batch(config: ml_collections.ConfigDict, mesh: Mesh,
                    seed: int = 0) -> Batch:
  """Random uint8 views made on the devices, split over `data` like a batch.

  Args:
    config: the experiment config (batch and view sizes).
    mesh: the mesh.
    seed: PRNG seed.

  Returns:
    `{"global": [B, 2, H, W, 3], "local": [B, 2, 9, h, w, 3]}` ("local"
    only when a loss term uses patches).
  """
  shapes = batch_shapes(config)

  def make(key):
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.bits(k, shape, jnp.uint8)
            for k, (name, shape) in zip(keys, shapes.items())}

  return jax.jit(make, out_shardings=sharding.batch_sharded(mesh))(
      jax.random.key(seed))


def abstract_state(config: ml_collections.ConfigDict,
                   model: detco_lib.DetCoEncoder,
                   tx: optax.GradientTransformation,
                   mesh: Mesh) -> tuple[Any, Any]:
  """The state's shapes with their shardings, and the shardings alone.

  Lets the step be compiled without allocating the state (`--compile_only`).
  """
  init = functools.partial(step_lib.init_state, config, model, tx)
  shapes = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.state_shardings(shapes, mesh)
  state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
  return state, shardings


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


def _abstract(tree: Any) -> Any:
  """Shape, dtype and sharding of each array of `tree`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


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


# ----------------------------------------------------------------------------
# What XLA says about a compiled program.


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


# ----------------------------------------------------------------------------
# Reference programs: the device's matmul peak, the backbone alone.


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
    if n >= max_size or min(_seconds(call) for _ in range(3)) >= min_seconds:
      return call, n
    n *= 2


def _seconds(call: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


def _split_views(views: Mapping[str, jax.Array],
                 flatten: bool = False) -> tuple[Any, ...]:
  """(I_q, I_k, P_q, P_k) of float views.

  The patch sets are [B, 9, h, w, 3], or [B * 9, h, w, 3] with `flatten`
  (as the backbone takes them), or None without patches.
  """
  g = views["global"]
  if "local" not in views:
    return g[:, 0], g[:, 1], None, None
  p = views["local"]
  if flatten:
    return (g[:, 0], g[:, 1], p[:, 0].reshape((-1,) + p.shape[3:]),
            p[:, 1].reshape((-1,) + p.shape[3:]))
  return g[:, 0], g[:, 1], p[:, 0], p[:, 1]


def make_backbone_step(model: detco_lib.DetCoEncoder,
                       mesh: Mesh) -> Callable:
  """DetCo's irreducible work: the backbone alone, with a trivial loss.

  Forward and backward through the query backbone on I_q and P_q, forward
  through the key backbone (EMA variables) on I_k and P_k, with the same
  ResNet module, BN grouping and dtype as `model`. The loss is the sum of
  the means of the four stage maps, so the backward is a real one through
  every stage; the gradient's norm is returned so that it is computed.

  Args:
    model: the DetCo encoder whose backbone is timed.
    mesh: the mesh.

  Returns:
    jitted `fn(params, batch_stats, ema_params, ema_batch_stats, views)
    -> (loss, grad_norm)` on the backbone's sub-trees and float views.
  """
  backbone = resnet.ResNet(model.depth, model.width, model.stem,
                           model.bn_groups, model.dtype, model.remat)

  def maps_mean(variables, images):
    maps, _ = backbone.apply(variables, images, train=True,
                             mutable=["batch_stats"])
    return sum(jnp.mean(m.astype(jnp.float32)) for m in maps.values())

  def fn(params, stats, ema_params, ema_stats, views):
    q_views, k_views, q_patches, k_patches = _split_views(views, True)

    def loss(p):
      variables = {"params": p, "batch_stats": stats}
      total = maps_mean(variables, q_views)
      if q_patches is not None:
        total += maps_mean(variables, q_patches)
      return total

    value, grads = jax.value_and_grad(loss)(params)
    ema = {"params": ema_params, "batch_stats": ema_stats}
    value += maps_mean(ema, k_views)
    if k_patches is not None:
      value += maps_mean(ema, k_patches)
    return value, optax.tree.norm(grads)

  rep = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, rep, rep, rep,
                                   sharding.batch_sharded(mesh)),
                 out_shardings=rep)


def backbone_args(state: step_lib.TrainState, views: Batch) -> tuple:
  """The arguments of `make_backbone_step`'s function, from a train state."""
  return (state.params["backbone"], state.batch_stats["backbone"],
          state.ema_params["backbone"], state.ema_batch_stats["backbone"],
          views)


# ----------------------------------------------------------------------------
# The step's pieces, each jitted and timed alone (--breakdown).


def _heads(module, maps, patch_maps):
  """The encoder's heads on given stage maps (a `DetCoEncoder` method)."""
  out = {"global": {s: module.global_heads[s](maps[s])
                    for s in module.stages}, "local": {}}
  if patch_maps is not None:
    out["local"] = {s: module.local_heads[s](patch_maps[s])
                    for s in module.stages}
  return out


def make_heads_loss(config: ml_collections.ConfigDict,
                    model: detco_lib.DetCoEncoder) -> Callable:
  """Heads and loss alone: key heads forward, query heads forward/backward.

  Args:
    config: the experiment config (loss settings).
    model: the encoder.

  Returns:
    `fn(head_params, ema_head_params, q_maps, k_maps, queues) -> (loss,
    grad_norm)`, where the maps are `(views' stage maps, patches' stage maps
    or None)` and the gradient also flows into the query maps, as it does
    on its way into the backbone.
  """
  def embed(params, maps):
    return model.apply({"params": params}, *maps, method=_heads)

  def fn(params, ema_params, q_maps, k_maps, queues):
    keys = jax.lax.stop_gradient(embed(ema_params, k_maps))

    def loss_fn(p, maps):
      out = embed(p, maps)
      return losses.detco_loss(
          out["global"], out["local"], keys["global"], keys["local"],
          queues["global"], queues["local"],
          temperature=config.loss.temperature,
          weights=config_lib.loss_weights(config),
          terms=config_lib.loss_terms(config))[0]

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params,
                                                                q_maps)
    return value, optax.tree.norm(grads)

  return jax.jit(fn)


def _head_params(params: Any) -> Any:
  return {k: v for k, v in params.items() if k != "backbone"}


def _update_fns(config: ml_collections.ConfigDict,
                tx: optax.GradientTransformation,
                state_shardings: Any, mesh: Mesh) -> tuple[Callable, ...]:
  """Jitted (optimizer, ema_enqueue) updates of a donated state."""
  rep = sharding.replicated(mesh)

  def optimizer(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  def ema_enqueue(state, keys):
    m = momentum.momentum_at(state.step, config_lib.total_steps(config),
                             config.ema_momentum, config.ema_cosine)
    return state.replace(
        ema_params=momentum.ema_update(state.ema_params, state.params, m),
        ema_batch_stats=momentum.ema_update(state.ema_batch_stats,
                                            state.batch_stats, m),
        queues=momentum.enqueue(state.queues, keys))

  return tuple(jax.jit(f, in_shardings=(state_shardings, rep),
                       out_shardings=state_shardings, donate_argnums=0)
               for f in (optimizer, ema_enqueue))


def _unit_keys(queues: momentum.Queues, batch: int) -> dict[str, Any]:
  """Enqueue-shaped keys: `{kind: {stage: [batch, D]}}` of unit vectors."""
  def keys_like(queue):
    return heads.l2_normalize(jnp.ones((batch, queue.shape[1]), queue.dtype))
  return {kind: {s: keys_like(q) for s, q in queues[kind].items()}
          for kind in momentum.KINDS}


def breakdown_calls(config: ml_collections.ConfigDict,
                    model: detco_lib.DetCoEncoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: Any, box: dict[str, Any],
                    batch: Batch, rng: jax.Array,
                    views: Batch) -> dict[str, Callable[[], Any]]:
  """No-argument calls of the step's pieces, each its own jitted program.

  Args:
    config, model, tx, schedule: as for `step.make_train_step`.
    mesh: the mesh.
    state_shardings: the state's shardings.
    box: `{"state": state}`; calls that update the state put it back here.
    batch: the uint8 batch.
    rng: the step's PRNG key.
    views: float views (augmented once).

  Returns:
    `{"augment": photometric augmentation + normalisation,
      "shuffle": the shuffle-BN permutation of the key views and patches,
      "heads_loss": heads (key forward, query forward and backward) and the
        12 InfoNCE terms on precomputed stage maps,
      "optimizer": the SGD update, "ema_enqueue": EMA + enqueue,
      "step_no_photometric": the real step with jitter, grayscale and blur
        off (cast and normalisation remain)}`.
  """
  rep, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  calls = {}
  aug = jax.jit(lambda b, r: augment.augment_views(b, r, config.aug,
                                                   config.views),
                in_shardings=(split, rep), out_shardings=split)
  calls["augment"] = lambda: aug(batch, rng)

  def shuffle(v, r):
    perm = jax.random.permutation(r, config.batch_size)
    return {k: x[:, 1][perm] for k, x in v.items()}
  shuffle = jax.jit(shuffle, in_shardings=(split, rep), out_shardings=split)
  calls["shuffle"] = lambda: shuffle(views, rng)

  q_views, k_views, q_patches, k_patches = _split_views(views, flatten=True)
  backbone = jax.jit(lambda v, x: model.apply(v, x, method="features"))
  state = box["state"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  maps = lambda x: None if x is None else backbone(variables, x)
  q_maps, k_maps = (maps(q_views), maps(q_patches)), (maps(k_views),
                                                       maps(k_patches))
  heads_loss = make_heads_loss(config, model)
  calls["heads_loss"] = lambda: heads_loss(
      _head_params(box["state"].params),
      _head_params(box["state"].ema_params), q_maps, k_maps,
      box["state"].queues)

  optimizer, ema_enqueue = _update_fns(config, tx, state_shardings, mesh)
  grads = jax.jit(lambda p: jax.tree.map(lambda x: 1e-4 * x, p),
                  out_shardings=rep)(state.params)
  keys = jax.jit(functools.partial(_unit_keys, batch=config.batch_size),
                 out_shardings=rep)(state.queues)

  def update(fn, arg):
    box["state"] = fn(box["state"], arg)
    return box["state"]
  calls["optimizer"] = functools.partial(update, optimizer, grads)
  calls["ema_enqueue"] = functools.partial(update, ema_enqueue, keys)

  plain = config.copy_and_resolve_references()
  plain.aug.jitter_prob = plain.aug.gray_prob = plain.aug.blur_prob = 0.0
  no_photometric = step_lib.make_train_step(plain, model, tx, schedule, mesh,
                                            state_shardings)

  def step_no_photometric():
    box["state"], metrics = no_photometric(box["state"], batch, rng)
    return box["state"], metrics
  calls["step_no_photometric"] = step_no_photometric
  return calls


# ----------------------------------------------------------------------------
# Timing.


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
      seconds = _seconds(call)
      if i >= warmup:
        times[name].append(seconds)
  return times


def _fit_and_describe(config: ml_collections.ConfigDict,
                      per_device_batch: int | None,
                      devices: list[jax.Device],
                      log: Callable[[str], None]) -> int:
  """Fits the batch to the devices, validates, logs the set-up.

  Returns:
    The per-device batch.
  """
  num = len(devices)
  if per_device_batch is None:
    per_device_batch = max(config.batch_size // num, 1)
  changes = fit_config(config, per_device_batch, num)
  config_lib.validate(config, num, len({d.process_index for d in devices}))
  device = devices[0]
  log(f"devices: {num} x {device.platform} ({device.device_kind})")
  log(f"global batch: {config.batch_size} ({per_device_batch} per device); "
      f"views {config.views.global_size} px, patches "
      f"{config.views.patch_size} px; model ResNet-{config.model.depth} "
      f"width {config.model.width}, {config.model.dtype}, "
      f"remat={config.model.remat}")
  log("config changes: " + ("; ".join(changes) or "none"))
  return per_device_batch


def compile_step(config: ml_collections.ConfigDict,
                 model: detco_lib.DetCoEncoder,
                 tx: optax.GradientTransformation,
                 schedule: optax.Schedule, mesh: Mesh,
                 log: Callable[[str], None]) -> tuple[Any, Any, Figures]:
  """Compiles the real step for abstract inputs; reads FLOPs and memory.

  Returns:
    (compiled step, state shardings, figures: compile_s, flops_per_step,
    memory_*_bytes).
  """
  state_spec, shardings = abstract_state(config, model, tx, mesh)
  batch_spec = {k: jax.ShapeDtypeStruct(shape, jnp.uint8,
                                        sharding=sharding.batch_sharded(mesh))
                for k, shape in batch_shapes(config).items()}
  rng_spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                  sharding=sharding.replicated(mesh))
  train_step = step_lib.make_train_step(config, model, tx, schedule, mesh,
                                        shardings)
  compiled, seconds, caught = compile_with_warnings(
      train_step, state_spec, batch_spec, rng_spec)
  for message in caught:
    log(f"warning while compiling the step: {message}")
  figures: Figures = {"compile_s": seconds}
  flops = compiled_flops(compiled)
  if flops is not None:
    figures["flops_per_step"] = flops
  for name, value in compiled_memory(compiled).items():
    figures[f"memory_{name}_bytes"] = value
  return compiled, shardings, figures


def run(config: ml_collections.ConfigDict, *, per_device_batch: int | None,
        steps: int, warmup: int, compile_only: bool = False,
        backbone: bool = True, breakdown: bool = False,
        topology: str | None = None, chip_config: str | None = None,
        log: Callable[[str], None] = print) -> Figures:
  """Compiles, runs and measures the DetCo step; prints and returns figures.

  Args:
    config: the experiment config (not changed; a copy is fitted).
    per_device_batch: images per device; None: batch_size // devices.
    steps: timed steps.
    warmup: untimed steps after compilation.
    compile_only: stop after compiling (FLOPs and memory only).
    backbone: also time the backbone-only step (overhead ratio).
    breakdown: also time the step's pieces (see `breakdown_calls`); implies
      `backbone`.
    topology: compile for this TPU topology's devices (`topology_devices`)
      instead of the local ones; only with `compile_only`.
    chip_config: the topology's chip configuration (e.g. "megacore").
    log: where the report lines go.

  Returns:
    name -> value of every figure printed as `name: value`.
  """
  if topology and not compile_only:
    raise ValueError("A TPU topology can only be compiled for: add "
                     "--compile_only.")
  config = config.copy_and_resolve_references()
  backbone = backbone or breakdown
  devices = (topology_devices(topology, chip_config) if topology
             else jax.devices())
  per_device_batch = _fit_and_describe(config, per_device_batch, devices,
                                       log)
  mesh = sharding.make_mesh(devices)
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  compiled, shardings, figures = compile_step(config, model, tx, schedule,
                                              mesh, log)
  if compile_only:
    _log_figures(figures, log)
    return figures

  state = step_lib.create_train_state(config, model, tx, mesh,
                                      jax.random.key(config.seed))[0]
  batch = synthetic_batch(config, mesh)
  rng = jax.device_put(jax.random.key(config.seed),
                       sharding.replicated(mesh))
  box = {"state": state}  # The donated state, threaded through the calls.

  def full_step():
    box["state"], metrics = compiled(box["state"], batch, rng)
    return box["state"], metrics

  peak_call, peak_n = matmul_call(config_lib.DTYPES[config.model.dtype])
  calls = {"step": full_step, "peak": peak_call}
  if backbone:
    # Float views, made once: the reference programs skip augmentation.
    views = jax.jit(lambda b: augment.augment_views(
        b, jax.random.key(1), config.aug, config.views))(batch)
    bb_compiled, bb_seconds, _ = compile_with_warnings(
        make_backbone_step(model, mesh),
        *_abstract(backbone_args(state, views)))
    figures["backbone_compile_s"] = bb_seconds
    bb_flops = compiled_flops(bb_compiled)
    if bb_flops is not None:
      figures["backbone_flops_per_step"] = bb_flops
    calls["backbone"] = lambda: bb_compiled(
        *backbone_args(box["state"], views))
    if breakdown:
      calls.update(breakdown_calls(config, model, tx, schedule, mesh,
                                   shardings, box, batch, rng, views))

  times = time_in_turn(calls, steps, warmup)
  figures.update(summarise(times, figures, per_device_batch, peak_n))
  _log_figures(figures, log)
  if figures.get("flops_ratio", 1.0) > _MAX_FLOPS_RATIO:
    log(f"warning: the step does {figures['flops_ratio']:.2f}x the "
        "backbone's FLOPs per device (about 1.03x on one device): part of "
        "it runs replicated instead of split over the devices.")
  return figures


def summarise(times: Mapping[str, list[float]], figures: Figures,
              per_device_batch: int, peak_n: int) -> Figures:
  """Speed figures from the timings (medians) and the compiled FLOPs.

  Args:
    times: name -> seconds per call, from `time_in_turn`.
    figures: the compile-time figures (flops_per_step and
      backbone_flops_per_step where known).
    per_device_batch: images per device.
    peak_n: side of the peak matrix product.

  Returns:
    The new figures.
  """
  med = {name: statistics.median(t) for name, t in times.items()}
  step_s = med["step"]
  out: Figures = {
      "step_s": step_s, "step_s_min": min(times["step"]),
      "step_s_max": max(times["step"]),
      "images_per_s_per_device": per_device_batch / step_s,
      "peak_matmul_size": peak_n,
      "peak_flops_per_s": 2.0 * peak_n**3 / med["peak"]}
  if "flops_per_step" in figures:
    out["achieved_flops_per_s"] = figures["flops_per_step"] / step_s
    out["mfu"] = out["achieved_flops_per_s"] / out["peak_flops_per_s"]
  if "backbone" in med:
    out["backbone_s"] = med["backbone"]
    out["overhead_ratio"] = step_s / med["backbone"]
    # The ratio within each round, then its median: robust to load drift.
    out["overhead_ratio_paired"] = statistics.median(
        s / b for s, b in zip(times["step"], times["backbone"]))
    if "flops_per_step" in figures and "backbone_flops_per_step" in figures:
      out["flops_ratio"] = (figures["flops_per_step"]
                            / figures["backbone_flops_per_step"])
  if all(name in med for name in PIECES):
    for name in PIECES + ("step_no_photometric",):
      out[f"{name}_s"] = med[name]
    out["pieces_sum_s"] = med["backbone"] + sum(med[n] for n in PIECES)
    out["unaccounted_s"] = step_s - out["pieces_sum_s"]
  return out


def _log_figures(figures: Figures, log: Callable[[str], None]) -> None:
  """One `name: value` line per figure."""
  for name, value in figures.items():
    if isinstance(value, int) or (float(value).is_integer()
                                  and abs(value) >= 1e3):
      log(f"{name}: {int(value)}")
    else:
      log(f"{name}: {value:.4g}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  run(_CONFIG.value, per_device_batch=_PER_DEVICE_BATCH.value,
      steps=_STEPS.value, warmup=_WARMUP.value,
      compile_only=_COMPILE_ONLY.value, backbone=_BACKBONE.value,
      breakdown=_BREAKDOWN.value, topology=_TOPOLOGY.value,
      chip_config=_CHIP_CONFIG.value)


if __name__ == "__main__":
  app.run(main)
