r"""Speed, FLOPs, MFU and memory of the jitted DetCo train step.

  python -m detco_jax.benchmark --config=configs/detco.py[:variant] \
      [--config.key=value ...] [--per_device_batch=B] [--steps=N] \
      [--warmup=N] [--compile_only [--topology=v3:2x2]] [--nobackbone] \
      [--breakdown]

(the flags: `__main__.py`). What is timed is the real step of
`step.make_train_step`, compiled once ahead of time, on a synthetic uint8
batch made once on the devices with the step's input sharding: no
host-to-device transfer, no compilation and no warm-up step is in the
figures. Each step is blocked on; figures are
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
about). It is the one program here that is not the step's own code, yet
it splits the views and applies the encoder's backbone as the step does.
`--breakdown` also times, each alone and each the code that trains (the
phases of `step.train_step` and the encoder's `heads`): the photometric
augmentation (`step.augment`), the shuffle-BN permutation
(`step.bn_shuffle`), heads + loss on precomputed stage maps
(`DetCoEncoder.heads`, `step.contrastive_loss`), the optimiser update
(`step.apply_gradients`), EMA + enqueue (`step.ema_and_enqueue`), and the
real step with the photometric ops off; `unaccounted_s` is the step minus
backbone and pieces.

All timed functions are called in turn, one round after another, so that a
load that changes during the run (a shared machine) affects them alike; the
ratios are ratios of medians (`overhead_ratio_paired`: median of the
per-round ratios).

The global batch is `per_device_batch` x devices; `queue_size` and
`bn_groups` (or `bn_group_size`) are changed where the batch needs it, and
the changes are printed. On CPU with fake devices
(`--xla_force_host_platform_device_count`) all devices share the host's
cores, so per-device speeds are shares of it.

`--compile_only --topology=v3:2x2` (a v3-8; `v4:2x2x1 --chip_config=megacore`
for a v4-8) compiles the step for a TPU that is not there, with the libtpu
package installed (`pip install libtpu==0.0.42.*` for jax 0.10.2; one such
process at a time): the memory a TPU needs, read on any host. XLA:CPU's
memory figures are no stand-in for it: its scheduler undoes
rematerialisation and it assigns buffers differently.

What this benchmark shares with the detection step's (`detection_step`):
the devices, compilation for abstract arguments, XLA's figures, the timing
in turn and the printing, is in `common`.

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
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from detco_jax import config_lib
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax.benchmark import common
from detco_jax.data import augment
from detco_jax.models import detco as detco_lib
from detco_jax.models import heads

Batch = dict[str, jax.Array]
Figures = common.Figures
# The step's pieces besides the backbone, timed alone by --breakdown.
PIECES = ("augment", "shuffle", "heads_loss", "optimizer", "ema_enqueue")
# Heads, loss and updates add about 3% to the backbone's FLOPs; much more
# per device means work that is not split over the devices.
_MAX_FLOPS_RATIO = 1.3


# ----------------------------------------------------------------------------
# Set-up.


def fit_config(config: ml_collections.ConfigDict, per_device_batch: int,
               num_devices: int) -> list[str]:
  """Sets the global batch; makes `queue_size` and the BN groups fit it.

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
  size = config.get("bn_group_size") or 0
  if config.bn == "shuffle" and size > 0:  # Groups of a size (`batch=N`).
    if batch % size:
      change("bn_group_size", max(g for g in range(1, size + 1)
                                  if batch % g == 0))
  elif config.bn == "shuffle" and batch % config.bn_groups:
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
  return common.with_shardings(shapes, shardings), shardings


# ----------------------------------------------------------------------------
# The reference program: the backbone alone.


def make_backbone_step(model: detco_lib.DetCoEncoder,
                       mesh: Mesh) -> Callable:
  """DetCo's irreducible work: the backbone alone, with a trivial loss.

  Forward and backward through the query backbone on I_q and P_q, forward
  through the key backbone (EMA variables) on I_k and P_k: the encoder's
  own `stage_maps` on the views as `step.split_views` splits them, so with
  its ResNet, BN grouping and dtype. The loss is the sum of the means of
  the stage maps, so the backward is a real one through every stage; the
  gradient's norm is returned so that it is computed.

  Args:
    model: the DetCo encoder whose backbone is timed.
    mesh: the mesh.

  Returns:
    jitted `fn(params, batch_stats, ema_params, ema_batch_stats, views)
    -> (loss, grad_norm)` on the backbone's sub-trees and float views
    (`augment.augment_views`' output).
  """
  def maps_mean(params, stats, images, patches):
    # The encoder's backbone alone: its heads' parameters are not needed.
    variables = {"params": {"backbone": params},
                 "batch_stats": {"backbone": stats}}
    (maps, patch_maps), _ = model.apply(
        variables, images, patches, True, mutable=["batch_stats"],
        method="stage_maps")
    every = list(maps.values()) + list((patch_maps or {}).values())
    return sum(jnp.mean(m.astype(jnp.float32)) for m in every)

  def fn(params, stats, ema_params, ema_stats, views):
    v = step_lib.split_views(views)
    value, grads = jax.value_and_grad(maps_mean)(params, stats, v.q_views,
                                                 v.q_patches)
    value += maps_mean(ema_params, ema_stats, v.k_views, v.k_patches)
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


def make_heads_loss(config: ml_collections.ConfigDict,
                    model: detco_lib.DetCoEncoder) -> Callable:
  """Heads and loss alone: key heads forward, query heads forward/backward.

  The encoder's `heads` and the step's `contrastive_loss`, differentiated
  as `step.loss_and_grads` differentiates them, on given stage maps.

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
    return model.apply({"params": params}, *maps, method="heads")

  def fn(params, ema_params, q_maps, k_maps, queues):
    keys = jax.lax.stop_gradient(embed(ema_params, k_maps))

    def loss_fn(p, maps):
      return step_lib.contrastive_loss(embed(p, maps), keys, queues,
                                       config)[0]

    value, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params,
                                                                q_maps)
    return value, optax.tree.norm(grads)

  return jax.jit(fn)


def _head_params(params: Any) -> Any:
  return {k: v for k, v in params.items() if k != "backbone"}


def _phase_inputs(config: ml_collections.ConfigDict,
                  model: detco_lib.DetCoEncoder, mesh: Mesh,
                  state: step_lib.TrainState, views: Batch,
                  rng: jax.Array) -> tuple[Any, ...]:
  """What the timed phases take, made once by the step's own phases.

  Returns:
    (q_maps, k_maps, keys, grads, batch_stats): the query's and the key's
    `(stage maps, patch stage maps)` (evaluation-mode BN), the keys of
    `step.encode_keys`, and the gradient and BN statistics of
    `step.loss_and_grads`; the maps split over `data`, the rest
    replicated.
  """
  def inputs(state, views, rng):
    v = step_lib.split_views(views)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    maps = lambda x, p: model.apply(variables, x, p, False,
                                    method="stage_maps")
    keys = step_lib.encode_keys(state, v, rng, config=config, model=model,
                                batch_sharding=sharding.batch_sharded(mesh))
    _, _, batch_stats, grads = step_lib.loss_and_grads(
        state, v, keys, config=config, model=model)
    return (maps(v.q_views, v.q_patches), maps(v.k_views, v.k_patches),
            keys, grads, batch_stats)

  rep, split = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(inputs, out_shardings=(split, split, rep, rep, rep))(
      state, views, rng)


def breakdown_calls(config: ml_collections.ConfigDict,
                    model: detco_lib.DetCoEncoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: Any, box: dict[str, Any],
                    batch: Batch, rng: jax.Array,
                    views: Batch) -> dict[str, Callable[[], Any]]:
  """No-argument calls of the step's pieces, each its own jitted program.

  Each piece is the step's own function (`step.augment`, ...), not a copy.

  Args:
    config, model, tx, schedule: as for `step.make_train_step`.
    mesh: the mesh.
    state_shardings: the state's shardings.
    box: `{"state": state}`; calls that update the state put it back here.
    batch: the uint8 batch.
    rng: the step's PRNG key.
    views: float views (augmented once, `augment.augment_views`).

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
  aug = jax.jit(functools.partial(step_lib.augment, config=config),
                in_shardings=(split, rep), out_shardings=split)
  calls["augment"] = lambda: aug(batch, rng)

  def shuffle(r, v):
    v = step_lib.split_views(v)
    return step_lib.bn_shuffle(r, v.k_views, v.k_patches, split)
  shuffle = jax.jit(shuffle, in_shardings=(rep, split), out_shardings=split)
  calls["shuffle"] = lambda: shuffle(rng, views)

  q_maps, k_maps, keys, grads, batch_stats = _phase_inputs(
      config, model, mesh, box["state"], views, rng)
  heads_loss = make_heads_loss(config, model)
  calls["heads_loss"] = lambda: heads_loss(
      _head_params(box["state"].params),
      _head_params(box["state"].ema_params), q_maps, k_maps,
      box["state"].queues)

  optimizer = jax.jit(functools.partial(step_lib.apply_gradients, tx=tx),
                      in_shardings=(state_shardings, rep, rep),
                      out_shardings=state_shardings, donate_argnums=0)
  ema_enqueue = jax.jit(
      lambda state, k: step_lib.ema_and_enqueue(state, k, config=config)[0],
      in_shardings=(state_shardings, rep), out_shardings=state_shardings,
      donate_argnums=0)

  def update(fn, *args):
    box["state"] = fn(box["state"], *args)
    return box["state"]
  calls["optimizer"] = functools.partial(update, optimizer, grads,
                                         batch_stats)
  calls["ema_enqueue"] = functools.partial(update, ema_enqueue, keys)

  plain = config.copy_and_resolve_references()
  plain.aug.jitter_prob = plain.aug.gray_prob = plain.aug.blur_prob = 0.0
  no_photometric = step_lib.make_train_step(plain, model, tx, schedule, mesh,
                                            state_shardings)

  calls["step_no_photometric"] = common.threaded_call(no_photometric, box,
                                                      batch, rng)
  return calls


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
  log(common.describe_devices(devices))
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
  batch_spec = common.with_shardings(
      {k: jax.ShapeDtypeStruct(shape, jnp.uint8)
       for k, shape in batch_shapes(config).items()},
      sharding.batch_sharded(mesh))
  rng_spec = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                                  sharding=sharding.replicated(mesh))
  train_step = step_lib.make_train_step(config, model, tx, schedule, mesh,
                                        shardings)
  compiled, figures = common.compile_figures(
      train_step, state_spec, batch_spec, rng_spec, log=log)
  return compiled, shardings, figures


class _Compiled(NamedTuple):
  """A config fitted to the devices, its model and its compiled step."""
  config: ml_collections.ConfigDict
  per_device_batch: int
  mesh: Mesh
  model: detco_lib.DetCoEncoder
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  step: Any
  shardings: Any
  figures: Figures


def _compile(config: ml_collections.ConfigDict, per_device_batch: int | None,
             devices: list[jax.Device],
             log: Callable[[str], None]) -> _Compiled:
  """Fits a copy of `config` to `devices`, builds and compiles its step."""
  config = config.copy_and_resolve_references()
  per_device_batch = _fit_and_describe(config, per_device_batch, devices,
                                       log)
  mesh = sharding.make_mesh(devices)
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  step, shardings, figures = compile_step(config, model, tx, schedule, mesh,
                                          log)
  return _Compiled(config, per_device_batch, mesh, model, tx, schedule, step,
                   shardings, figures)


def _start(c: _Compiled) -> tuple[dict[str, Any], Batch, jax.Array]:
  """A fresh state (in a box, see `common.threaded_call`), batch and key."""
  state = step_lib.create_train_state(c.config, c.model, c.tx, c.mesh,
                                      jax.random.key(c.config.seed))[0]
  batch = synthetic_batch(c.config, c.mesh)
  rng = jax.device_put(jax.random.key(c.config.seed),
                       sharding.replicated(c.mesh))
  return {"state": state}, batch, rng


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
    topology: compile for this TPU topology's devices
      (`common.topology_devices`) instead of the local ones; only with
      `compile_only`.
    chip_config: the topology's chip configuration (e.g. "megacore").
    log: where the report lines go.

  Returns:
    name -> value of every figure printed as `name: value`.
  """
  devices = common.step_devices(topology, chip_config, compile_only)
  backbone = backbone or breakdown
  c = _compile(config, per_device_batch, devices, log)
  config, figures = c.config, c.figures
  if compile_only:
    common.log_figures(figures, log)
    return figures

  box, batch, rng = _start(c)
  full_step = common.threaded_call(c.step, box, batch, rng)
  others = {}  # Timed in the same rounds as the step.
  if backbone:
    # Float views, made once: the reference programs skip augmentation.
    views = jax.jit(lambda b: augment.augment_views(
        b, jax.random.key(1), config.aug, config.views))(batch)
    bb_compiled, bb_seconds, _ = common.compile_with_warnings(
        make_backbone_step(c.model, c.mesh),
        *common.abstract(backbone_args(box["state"], views)))
    figures["backbone_compile_s"] = bb_seconds
    bb_flops = common.compiled_flops(bb_compiled)
    if bb_flops is not None:
      figures["backbone_flops_per_step"] = bb_flops
    others["backbone"] = lambda: bb_compiled(
        *backbone_args(box["state"], views))
    if breakdown:
      others.update(breakdown_calls(config, c.model, c.tx, c.schedule,
                                    c.mesh, c.shardings, box, batch, rng,
                                    views))

  times, peak_n = common.time_step(
      full_step, config_lib.DTYPES[config.model.dtype], steps, warmup, others)
  figures.update(summarise(times, figures, c.per_device_batch, peak_n))
  common.log_figures(figures, log)
  if figures.get("flops_ratio", 1.0) > _MAX_FLOPS_RATIO:
    log(f"warning: the step does {figures['flops_ratio']:.2f}x the "
        "backbone's FLOPs per device (about 1.03x on one device): part of "
        "it runs replicated instead of split over the devices.")
  return figures


def summarise(times: Mapping[str, list[float]], figures: Figures,
              per_device_batch: int, peak_n: int) -> Figures:
  """Speed figures from the timings (medians) and the compiled FLOPs.

  `common.speed_figures`, then the backbone's and the pieces' figures.

  Args:
    times: name -> seconds per call, from `common.time_step`.
    figures: the compile-time figures (flops_per_step and
      backbone_flops_per_step where known).
    per_device_batch: images per device.
    peak_n: side of the peak matrix product.

  Returns:
    The new figures.
  """
  med = {name: statistics.median(t) for name, t in times.items()}
  step_s = med["step"]
  out = common.speed_figures(times, figures, per_device_batch, peak_n)
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


# ----------------------------------------------------------------------------
# Several configs side by side (--compare).


def compare(configs: Mapping[str, ml_collections.ConfigDict], *,
            per_device_batch: int | None, steps: int, warmup: int,
            log: Callable[[str], None] = print) -> dict[str, Figures]:
  """Times several configs' steps side by side, in turn, round after round.

  Each config's real step is compiled and run on its own state and
  synthetic batch, as `run` does; then the steps and the peak matrix
  product are called in turn, `warmup` untimed and `steps` timed rounds,
  so that a load that changes during the run (a shared machine) slows them
  alike. The first config is compared with each other one: the ratio of
  their times per image (medians, and the median of the per-round ratios)
  and of their FLOPs per image.

  Args:
    configs: label -> experiment config (not changed; copies are fitted),
      the config the others are compared with first.
    per_device_batch: images per device for every config; None: each
      config's batch_size // devices.
    steps: timed rounds.
    warmup: untimed rounds.
    log: where the report lines go.

  Returns:
    label -> figures: the compile figures and `common.speed_figures` of
    each config; every config after the first also has the first's
    `time_per_image_ratio`, `time_per_image_ratio_paired` and
    `flops_per_image_ratio` over its own.
  """
  devices = jax.devices()
  compiled, calls = {}, {}
  for label, config in configs.items():
    log(f"== {label}")
    c = compiled[label] = _compile(config, per_device_batch, devices, log)
    calls[label] = common.threaded_call(c.step, *_start(c))
  first = next(iter(compiled.values())).config.model.dtype
  peak_call, peak_n = common.matmul_call(config_lib.DTYPES[first])
  peak = "<peak matmul>"  # Not a config's label: those name a file.
  times = common.time_in_turn({**calls, peak: peak_call}, steps, warmup)

  out = {}
  for label, c in compiled.items():
    out[label] = dict(c.figures)
    out[label].update(common.speed_figures(
        {"step": times[label], "peak": times[peak]}, c.figures,
        c.per_device_batch, peak_n))
  base, base_c = next(iter(compiled.items()))
  per_image = lambda label, t: t / compiled[label].per_device_batch
  for label, c in list(compiled.items())[1:]:
    out[label]["time_per_image_ratio"] = (
        per_image(base, statistics.median(times[base]))
        / per_image(label, statistics.median(times[label])))
    out[label]["time_per_image_ratio_paired"] = statistics.median(
        per_image(base, a) / per_image(label, b)
        for a, b in zip(times[base], times[label]))
    if "flops_per_step" in base_c.figures and "flops_per_step" in c.figures:
      out[label]["flops_per_image_ratio"] = (
          per_image(base, base_c.figures["flops_per_step"])
          / per_image(label, c.figures["flops_per_step"]))
  for line in side_by_side(out, steps):
    log(line)
  return out


def side_by_side(figures: Mapping[str, Figures], rounds: int) -> list[str]:
  """`compare`'s report: each config's figures, a table, the ratios.

  Args:
    figures: `compare`'s result.
    rounds: the timed rounds.

  Returns:
    The lines: per config a "== label" line and its `name: value` lines,
    then one table row per config and one ratio line per config after the
    first.
  """
  lines = []
  for label, figs in figures.items():
    lines.append(f"== {label}")
    common.log_figures(figs, lines.append)
  lines.append(f"side by side, medians of {rounds} rounds in turn:")
  lines.append(f"{'GFLOP/step':>11} {'step_s':>8} {'img/s/dev':>10} "
               f"{'mfu':>6}  config")
  for label, figs in figures.items():
    gflop = figs.get("flops_per_step", float("nan")) / 1e9
    lines.append(f"{gflop:11.2f} {figs['step_s']:8.3f} "
                 f"{figs['images_per_s_per_device']:10.1f} "
                 f"{figs.get('mfu', float('nan')):6.3f}  {label}")
  base = next(iter(figures))
  for label, figs in list(figures.items())[1:]:
    flops = figs.get("flops_per_image_ratio")
    lines.append(
        f"{base} takes {figs['time_per_image_ratio']:.2f}x the time per "
        f"image of {label} (paired: {figs['time_per_image_ratio_paired']:.2f}"
        "x)" + (f", for {flops:.2f}x its FLOPs per image." if flops else "."))
  return lines
