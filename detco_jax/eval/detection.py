r"""Detection transfer: fine-tune a RetinaNet (FPN) on a pretrained backbone.

  python -m detco_jax.eval.detection --config=configs/detection.py:demo \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR \
      [--config.random_init=True]

The pretraining run's query ResNet (or a checkpoint file's, with
`--config.pretrained=FILE`: docs/checkpoints.md; all stages trainable by
default, as in
the paper's transfer; `model.frozen_stages` freezes a prefix) gets an FPN and
a RetinaNet head (detco_jax/models/retinanet.py), and the whole detector is
trained with focal loss and an L1 box loss (detco_jax/detection/) through the
shared job loop: it resumes, stops cleanly on SIGTERM and runs multi-process
like every job. Everything has static shapes, NMS included, so it runs on
TPUs as well as GPUs.

At the end the test split is detected once: the job writes
`DIR/detections_<split>.json` (COCO results format, boxes in the dataset's
pixels, or the evaluated image's with `eval.source_pixels` False) and `DIR/ground_truth_<split>.json` (COCO annotation
format), computes AP, AP50, AP75, APs, APm and APl from them with
pycocotools, and writes those with the step and the backbone's source to
`DIR/detection_results.json`, TensorBoard and the log, with a picture of a
few test images (predictions beside the ground truth) as
`DIR/detections.png`.

With `train_fraction=F` < 1 (configs/detection.py) the detector trains on a
subset of the training images drawn by image id, which the job writes to
`DIR/train_subset.json` and checks when it resumes.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

if __name__ == "__main__":
  # The flags and the config are checked before JAX and TensorFlow load: the
  # job runs from this module imported again under its own name.
  cli.run_job(
      "detco_jax.eval.detection:run",
      config_help="Detection config, e.g. configs/detection.py:demo.",
      workdir_help="The detector's directory (checkpoints, COCO files, "
      "detection_results.json).", report="detco_jax.eval.detection:report",
      precheck="detco_jax.config_checks:check_probe")

# pylint: disable=g-import-not-at-top,wrong-import-order
import dataclasses
import functools
import io
import itertools
import json
from typing import Any, Iterable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import loop
from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import sharding
from detco_jax import visualize
from detco_jax.data import aspect_groups
from detco_jax.data import detection as detection_data
from detco_jax.data import sources
from detco_jax.detection import boxes as boxes_lib
from detco_jax.detection import losses
from detco_jax.detection import nms
from detco_jax.eval import coco
from detco_jax.eval import features
from detco_jax.eval import probe
from detco_jax.models import retinanet

RESULTS_FILE = "detection_results.json"
# The training subset of `data.train_fraction` < 1 (`check_subset_file`).
SUBSET_FILE = "train_subset.json"
PICTURE_FILE = "detections.png"
# The stem's stride: res_l has stride 2**l after the ImageNet stem (7x7/2 and
# a max pool), 2**(l - 2) after the small-image stem (3x3/1, no pool).
_STEM_SHIFT = {"imagenet": 0, "cifar": 2}


@flax.struct.dataclass
class DetectorState:
  """The detector's trained state (the whole RetinaNet, backbone included).

  Attributes:
    step: optimiser steps taken.
    params: the RetinaNet's params (`backbone`, `fpn`, `head`).
    batch_stats: the backbone's BN statistics.
    opt_state: the optimiser's state.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class EmaDetectorState(DetectorState):
  """A detector state with detectron2's moving foreground count.

  Only runs with `loss.normalizer_momentum` > 0 use it: the default runs'
  state, and so their checkpoints, keep `DetectorState`'s fields, and the
  runs saved before the moving count existed resume as they were.

  Attributes:
    loss_normalizer: float32 scalar, the moving average of the global
      batch's foreground anchors after `step` steps
      (`losses.loss_normalizer`); saved with the state so that a resumed
      run divides its losses as an uninterrupted one.
  """
  loss_normalizer: jax.Array


def initial_loss_normalizer(config: ml_collections.ConfigDict
                            ) -> float | None:
  """The moving foreground count's start, or None when it is not kept.

  Args:
    config: the detection config (`loss.normalizer_momentum`,
      `loss.normalizer_init`).

  Returns:
    `loss.normalizer_init` if `loss.normalizer_momentum` > 0, else None
    (the losses are divided by each batch's own count).

  Raises:
    ValueError: for a momentum outside [0, 1).
  """
  c = config.loss
  if not 0 <= c.normalizer_momentum < 1:
    raise ValueError("Bad config: loss.normalizer_momentum must be in [0, 1) "
                     f"(detectron2: 0.9), got {c.normalizer_momentum}.")
  return float(c.normalizer_init) if c.normalizer_momentum > 0 else None


def build_model(config: ml_collections.ConfigDict,
                backbone: pretrained.Backbone,
                num_classes: int) -> retinanet.RetinaNet:
  """The RetinaNet on the backbone's architecture that `config.model` says."""
  m, b = config.model, backbone.module
  return retinanet.RetinaNet(
      num_classes=num_classes, depth=b.depth, width=b.width, stem=b.stem,
      dtype=b.dtype, levels=tuple(m.levels), extra_levels=tuple(
          m.extra_levels), num_anchors=boxes_lib.num_anchors_per_location(
              m.scales_per_octave, tuple(m.ratios)),
      head_channels=m.head_channels, norm=m.norm,
      num_convs=m.get("num_convs", 4), prior_prob=m.get("prior_prob", 0.01),
      head_init_std=m.get("head_init_std", retinanet.HEAD_INIT_STD),
      fpn_norm=m.get("fpn_norm", "none"), backbone_bn=m.backbone_bn,
      frozen_stages=m.frozen_stages)


def anchor_levels(config: ml_collections.ConfigDict,
                  stem: str) -> tuple[int, ...]:
  """log2 of each pyramid level's stride, for the backbone's stem."""
  shift = _STEM_SHIFT[stem]
  return tuple(l - shift for l in (*config.model.levels,
                                   *config.model.extra_levels))


def padded_shapes(config: ml_collections.ConfigDict
                  ) -> tuple[tuple[int, int], ...]:
  """The (height, width) of every input shape a run feeds the detector.

  Args:
    config: the detection config (`views`).

  Returns:
    One shape for square views; the landscape and the portrait shape for
    detectron2's resize (`detection_data.BoxViewSpec.padded_shapes`).
  """
  return detection_data.BoxViewSpec.from_config(config).padded_shapes()


def make_anchors(config: ml_collections.ConfigDict, stem: str,
                 shape: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, list[int]]:
  """The anchors of an input shape and how many each level has.

  Args:
    config: the detection config (`views`, `model`).
    stem: the backbone's stem, which sets the levels' strides.
    shape: the input's (height, width); None: the first of `padded_shapes`.

  Returns:
    (anchors [A, 4] XYXY pixels, anchors per level).
  """
  m = config.model
  shape = tuple(shape or padded_shapes(config)[0])
  levels = anchor_levels(config, stem)
  if len(m.anchor_sizes) != len(levels):
    raise ValueError(
        f"Bad config: model.anchor_sizes has {len(m.anchor_sizes)} sizes "
        f"for {len(levels)} pyramid levels (model.levels + "
        "model.extra_levels); give one base size per level.")
  anchors = boxes_lib.anchors(shape, levels, tuple(m.anchor_sizes),
                              m.scales_per_octave, tuple(m.ratios),
                              offset=m.anchor_offset)
  per_level = boxes_lib.anchors_per_level(shape, levels, m.scales_per_octave,
                                          tuple(m.ratios))
  return anchors, per_level


Anchors = dict[tuple[int, int], tuple[np.ndarray, list[int]]]


def anchors_by_shape(config: ml_collections.ConfigDict, stem: str) -> Anchors:
  """`make_anchors` of every padded shape, keyed by (height, width)."""
  return {shape: make_anchors(config, stem, shape)
          for shape in padded_shapes(config)}


def _anchors_of(anchors: Anchors, images: jax.Array
                ) -> tuple[np.ndarray, list[int]]:
  """The anchors of a batch's (static) image shape, at trace time."""
  shape = tuple(images.shape[1:3])
  if shape not in anchors:
    raise ValueError(f"Images of {shape} are not one of the run's padded "
                     f"shapes {sorted(anchors)}.")
  return anchors[shape]


def _images_to_steps(base_steps: int, config: ml_collections.ConfigDict
                     ) -> int:
  """`base_steps` at batch `lr_base_batch` as steps of `batch_size`.

  Args:
    base_steps: a step count at batch `config.lr_base_batch`.
    config: the detection config.

  Returns:
    The step count that sees the same images at `config.batch_size`.
  """
  return int(round(base_steps * config.lr_base_batch / config.batch_size))


def total_steps(config: ml_collections.ConfigDict) -> int:
  """The run's length in steps at `config.batch_size`.

  Args:
    config: the detection config.

  Returns:
    `total_steps` if set (> 0, `steps=N`), else `schedule_steps` scaled
    from batch `lr_base_batch` to `batch_size` (the schedule counts images).
  """
  if config.total_steps > 0:
    return int(config.total_steps)
  return _images_to_steps(config.schedule_steps, config)


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  """The warm-up's length in steps at `config.batch_size`.

  Args:
    config: the detection config.

  Returns:
    `warmup_steps` if set (>= 0), else `schedule_warmup_steps` scaled from
    batch `lr_base_batch` to `batch_size`, like `total_steps`.
  """
  if config.warmup_steps >= 0:
    return int(config.warmup_steps)
  return _images_to_steps(config.schedule_warmup_steps, config)


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum, linear warm-up, x`lr_decay_factor` steps.

  The learning rate is `lr` at batch `lr_base_batch`, scaled linearly with
  the batch (detectron2's 0.01 at 16 images). Weight decay is added to the
  gradient before momentum (PyTorch's SGD), and not to normalisation
  parameters (detectron2's WEIGHT_DECAY_NORM = 0).

  Args:
    config: the detection config.

  Returns:
    (tx, schedule).
  """
  peak = config.lr * config.batch_size / config.lr_base_batch
  total = total_steps(config)
  boundaries = {int(round(f * total)): config.lr_decay_factor
                for f in config.lr_decay_at}
  decay = optax.piecewise_constant_schedule(peak, boundaries)
  warmup = max(warmup_steps(config), 1)
  ramp = optax.linear_schedule(peak * config.warmup_factor, peak, warmup)
  schedule = lambda step: jnp.where(step < warmup, ramp(step), decay(step))
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
      optax.sgd(schedule, momentum=config.momentum))
  return tx, schedule


def _decay_mask(params: Any) -> Any:
  """True for every parameter but those of BN and GN layers."""
  def decays(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    return not any(n.startswith("bn") or n.endswith("_bn") or "norm" in n
                   for n in names[:-1])
  return jax.tree_util.tree_map_with_path(decays, params)


def make_train_step(config: ml_collections.ConfigDict,
                    model: retinanet.RetinaNet, backbone: pretrained.Backbone,
                    anchors: Anchors, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: jax.sharding.Mesh):
  """The jitted `step(state, batch) -> (state, metrics)` (state donated).

  One program per padded shape: the anchors are picked by the batch's
  image shape when the step is traced.
  """
  c = config.loss
  momentum = float(c.normalizer_momentum)

  def loss_fn(params, state, batch):
    x = features.preprocess(batch["image"], backbone.config.aug)
    (cls, deltas), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True,
        mutable=["batch_stats"])
    total, metrics = losses.retinanet_loss(
        cls, deltas, jnp.asarray(_anchors_of(anchors, batch["image"])[0]),
        batch["boxes"], batch["labels"],
        batch["valid"], alpha=c.alpha, gamma=c.gamma, fg_iou=c.fg_iou,
        bg_iou=c.bg_iou, box_loss=c.box_loss,
        smooth_l1_beta=c.smooth_l1_beta,
        normalizer=state.loss_normalizer if momentum else None,
        normalizer_momentum=momentum)
    return total, (metrics, updates.get("batch_stats", state.batch_stats))

  def step(state, batch):
    if momentum and not isinstance(state, EmaDetectorState):
      raise ValueError("loss.normalizer_momentum > 0 needs the state made by "
                       "create_state(..., loss_normalizer=...).")
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, lr=schedule(state.step),
                   grad_norm=optax.tree.norm(grads))
    state = state.replace(step=state.step + 1, params=params,
                          batch_stats=batch_stats, opt_state=opt_state)
    if momentum:
      state = state.replace(loss_normalizer=metrics["loss_normalizer"])
    return state, metrics

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep),
                 donate_argnums=0)


def make_predict(config: ml_collections.ConfigDict,
                 model: retinanet.RetinaNet, backbone: pretrained.Backbone,
                 anchors: Anchors, mesh: jax.sharding.Mesh):
  """The jitted `predict(state, images, sizes) -> detections` (static shapes).

  Returns:
    A function of uint8 [B, H, W, 3] images (a padded shape) and int [B, 2]
    real (height, width) that returns {"boxes" [B, D, 4] XYXY, "scores",
    "classes", "valid"} of at most `eval.max_detections` per image; one
    program per padded shape.
  """
  e = config.eval

  def predict(state, images, sizes):
    shape_anchors, per_level = _anchors_of(anchors, images)
    x = features.preprocess(images, backbone.config.aug)
    cls, deltas = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x,
        train=False)
    return nms.postprocess(
        cls, deltas, jnp.asarray(shape_anchors), tuple(per_level),
        image_size=sizes,
        score_threshold=e.score_threshold, topk_per_level=e.topk_per_level,
        nms_threshold=e.nms_threshold, max_detections=e.max_detections,
        clip_after_nms=e.clip_after_nms)

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(predict, in_shardings=(rep, data, data), out_shardings=rep)


def detect(predict, state: DetectorState, batches: Any,
           mesh: jax.sharding.Mesh, keep_images: int = 0
           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Detections and ground truth of a test pass, from every process.

  Args:
    predict: from `make_predict`.
    state: the detector.
    batches: this process's padded test batches.
    mesh: the device mesh.
    keep_images: how many of this process's first test images to return.

  Returns:
    (the test batches' keys but "image" and the detections' ("det_" +
    key), concatenated over batches, every process's examples on every
    process; this process's first `keep_images` images, uint8 [n, H, W,
    3], which on process 0 are the first rows of the former).
  """
  parts, kept = [], None
  for batch in batches:
    if kept is None:
      kept = batch["image"][:keep_images]
    sizes = np.stack([batch["height"], batch["width"]], -1).astype(np.int32)
    out = predict(state, sharding.host_to_global(batch["image"], mesh),
                  sharding.host_to_global(sizes, mesh))
    # Not the images: their shapes differ between groups, and gathering
    # every test image on every process would not fit at COCO's scale.
    gathered = {k: multihost_utils.process_allgather(v, tiled=True)
                for k, v in batch.items() if k != "image"}
    # The detections are replicated: each process already has all rows.
    gathered.update({f"det_{k}": np.asarray(v) for k, v in out.items()})
    parts.append(gathered)
  return ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
          kept)


@dataclasses.dataclass(frozen=True)
class Detector:
  """What a detection run is made of, before any data or state.

  Attributes:
    model: the RetinaNet.
    anchors: for each padded (height, width), the anchors ([A, 4] XYXY
      pixels, in the order of the head's outputs) and their count per
      pyramid level.
    tx: the optimiser.
    schedule: its learning-rate schedule.
    train_step: `train_step(state, batch) -> (state, metrics)`, jitted.
    predict: `predict(state, images, sizes) -> detections`, jitted.
  """
  model: retinanet.RetinaNet
  anchors: Anchors
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: Any
  predict: Any


def build(config: ml_collections.ConfigDict, backbone: pretrained.Backbone,
          num_classes: int, mesh: jax.sharding.Mesh) -> Detector:
  """The model, anchors, optimiser and jitted steps of a detection run.

  Args:
    config: the detection config.
    backbone: the backbone it starts from (its architecture is kept).
    num_classes: K.
    mesh: the device mesh.

  Returns:
    The detector's pieces.
  """
  model = build_model(config, backbone, num_classes)
  anchors = anchors_by_shape(config, backbone.module.stem)
  tx, schedule = build_optimizer(config)
  return Detector(
      model=model, anchors=anchors, tx=tx, schedule=schedule,
      train_step=make_train_step(config, model, backbone, anchors, tx,
                                 schedule, mesh),
      predict=make_predict(config, model, backbone, anchors, mesh))


def create_state(model: retinanet.RetinaNet, backbone: pretrained.Backbone,
                 tx: optax.GradientTransformation, anchors: Anchors,
                 mesh: jax.sharding.Mesh, seed: int,
                 loss_normalizer: float | None = None) -> DetectorState:
  """A fresh detector on the backbone's variables, replicated on the mesh.

  Args:
    model: the RetinaNet.
    backbone: the pretrained (or untrained) backbone it starts from.
    tx: the optimiser.
    anchors: the anchors of each padded shape (`anchors_by_shape`), which
      the head's outputs must match one to one.
    mesh: the device mesh.
    seed: initialisation seed of the FPN and head.
    loss_normalizer: the moving foreground count's start
      (`initial_loss_normalizer`); None for a state without one.

  Returns:
    The state at step 0; an `EmaDetectorState` if `loss_normalizer` is set.
  """
  height, width = next(iter(anchors))

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, height, width, 3)),
                           train=False)
    variables = retinanet.RetinaNet.with_backbone(variables,
                                                  backbone.variables)
    fields = (jnp.zeros((), jnp.int32), variables["params"],
              variables["batch_stats"], tx.init(variables["params"]))
    if loss_normalizer is None:
      return DetectorState(*fields)
    return EmaDetectorState(*fields,
                            jnp.asarray(loss_normalizer, jnp.float32))
  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(seed))
  for shape, (shape_anchors, _) in anchors.items():
    _check_anchor_count(model, state, shape_anchors, shape)
  return state


def make_measure_bn(model: retinanet.RetinaNet,
                    backbone: pretrained.Backbone, mesh: jax.sharding.Mesh):
  """The jitted `measure(state, images) -> batch_stats` of one batch.

  The detector runs in training mode with BN momentum 0, so its running
  statistics come back as exactly this batch's; BN layers that normalise
  with their running statistics (frozen stages, frozen BN) return theirs
  unchanged.
  """
  measuring = model.clone(bn_momentum=0.0)

  def measure(state, images):
    x = features.preprocess(images, backbone.config.aug)
    _, updated = measuring.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x,
        train=True, mutable=["batch_stats"])
    return updated["batch_stats"]

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(measure, in_shardings=(rep, data), out_shardings=rep)


def precise_bn(measure, state: DetectorState, batches: Iterable[Any],
               num_batches: int, mesh: jax.sharding.Mesh
               ) -> tuple[DetectorState, int]:
  """detectron2's PreciseBN: running statistics as a true batch average.

  Every BN layer's running mean and variance become the mean of its batch
  statistics over `num_batches` training batches (detectron2's
  `update_bn_stats` with TEST.PRECISE_BN.NUM_ITER), in place of the moving
  averages, which lag the weights of the last steps.

  Args:
    measure: from `make_measure_bn`.
    state: the trained detector.
    batches: this process's training batches ("image" is read).
    num_batches: how many.
    mesh: the device mesh.

  Returns:
    (the state with the averaged statistics, batches read).
  """
  mean, k = state.batch_stats, 0
  for batch in itertools.islice(batches, num_batches):
    stats = measure(state, sharding.host_to_global(batch["image"], mesh))
    k += 1
    # A running mean: statistics that never change stay exactly as they are.
    mean = jax.tree.map(lambda m, x, k=k: m + (x - m) / k, mean, stats)
  return state.replace(batch_stats=mean), k


def _gather_counts(local: tuple[np.ndarray, int], what: str
                   ) -> aspect_groups.GroupCounts:
  """Every process's group counts, on every process, logged once."""
  counts, left_out = local
  gathered = np.asarray(multihost_utils.process_allgather(
      np.append(counts, left_out))).reshape(-1, len(counts) + 1)
  result = aspect_groups.GroupCounts(gathered[:, :-1])
  logging.info("%s images by aspect-ratio group: %s; %d left out (no box "
               "to train on, or a size that cannot be read).", what,
               ", ".join(f"{aspect_groups.GROUP_NAMES[g]} "
                         f"{int(result.totals[g])}"
                         for g in aspect_groups.GROUPS),
               int(gathered[:, -1].sum()))
  return result


def job(config: ml_collections.ConfigDict, workdir: str) -> loop.Job:
  """Detection fine-tuning in `workdir` as a job for `loop.run`.

  Args:
    config: the detection config (configs/detection.py).
    workdir: checkpoints, TensorBoard events, COCO files and results.

  Returns:
    The job; its `finish` evaluates the detector and writes the results.
  """
  probe.check_batch_sizes(config, ("batch_size", "eval_batch_size"))
  mesh = sharding.make_mesh()
  backbone = pretrained.for_probe(config, mesh)
  sources.prepare_builtin(config.data)
  names = detection_data.class_names(config)
  detector = build(config, backbone, len(names), mesh)
  spec = detection_data.BoxViewSpec.from_config(config)

  normalizer = initial_loss_normalizer(config)
  # Drawn once: every (re)start of the stream below trains on these images.
  subset = detection_data.train_subset(config)
  # Counted once, over every process: which batches are of which group.
  # Opened once: a subset's shard reads the whole split to pick its images.
  train_source = detection_data.train_source(config, subset=subset)
  train_counts = test_counts = None
  if spec.grouped or config.data.get("filter_empty", False):
    train_counts = _gather_counts(detection_data.count_train_groups(
        config, source=train_source), "Training")
  if spec.grouped:
    test_counts = _gather_counts(detection_data.count_test_groups(config),
                                 "Test")
  steps = total_steps(config)

  def train_batches(start):
    return detection_data.make_train_iterator(
        config, start_step=start, subset=subset, group_counts=train_counts,
        source=train_source)

  def init_state(resuming):
    # A fresh detector is cheap; restored over when resuming.
    check_subset_file(workdir, subset, resuming)
    if resuming:
      _check_saved_normalizer(workdir, normalizer is not None, mesh)
    return create_state(detector.model, backbone, detector.tx,
                        detector.anchors, mesh, config.seed, normalizer)

  def step(state, batch):
    batch = {k: batch[k] for k in ("image", "boxes", "labels", "valid")}
    return detector.train_step(state, sharding.host_to_global(batch, mesh))

  def finish(state, writer):
    num = int(config.eval.get("precise_bn_batches", 0))
    if num > 0:
      # The batches that would follow the last step, as detectron2's hook
      # reads its training loader on.
      state, read = precise_bn(make_measure_bn(detector.model, backbone,
                                               mesh), state,
                               train_batches(steps), num, mesh)
      logging.info("Precise BN: running statistics averaged over %d "
                   "training batches.", read)
    return _evaluate(config, workdir, backbone, names, detector.predict,
                     state, mesh, writer, test_counts)

  logging.info("Detection transfer of %s on %s: %d classes; inputs %s, "
               "anchors %s.", backbone.source, config.data.dataset,
               len(names), " and ".join(f"{h}x{w}" for h, w in
                                        detector.anchors),
               " and ".join(str(len(a)) for a, _ in
                            detector.anchors.values()))
  return loop.Job(
      name="detection", workdir=workdir, init_state=init_state,
      data=train_batches, step=step, total_steps=steps,
      batch_size=config.batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      console=("cls_loss", "box_loss", "num_fg"), finish=finish)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Fine-tunes (or resumes) the detector, then evaluates it.

  Args:
    config: the detection config (configs/detection.py).
    workdir: the job's directory.

  Returns:
    The results written to `detection_results.json` ({} if stopped).
  """
  return loop.run(job(config, workdir)).results


def _describe_subset(record: dict[str, Any] | None) -> str:
  """A subset record (`TrainSubset.to_json`) in a few words."""
  if record is None:
    return "the whole training split"
  return (f"train_fraction {record['fraction']}, subset_seed "
          f"{record['seed']} ({record['count']} of {record['total']} images "
          f"of {record['parts']})")


def check_subset_file(workdir: str,
                      subset: detection_data.TrainSubset | None,
                      resuming: bool) -> None:
  """Writes the run's training subset, or checks it against the saved one.

  A fresh run with a subset writes `SUBSET_FILE` (parts, fraction, seed,
  count, total and the sorted ids) on process 0. A resumed run must train on
  the images it started with: the file's subset, or the whole split when
  there is no file.

  Args:
    workdir: the run's directory.
    subset: the config's subset (`detection_data.train_subset`); None for
      the whole split.
    resuming: the run continues from a checkpoint in `workdir`.

  Raises:
    ValueError: on resume, when the config's subset is not the saved one.
  """
  path = epath.Path(workdir) / SUBSET_FILE
  record = None if subset is None else subset.to_json()
  if not resuming:
    if record is not None:
      reporting.write_json(workdir, SUBSET_FILE, record)
    elif path.exists() and jax.process_index() == 0:
      path.unlink()  # A stopped earlier run's: not this run's data.
    return
  saved = json.loads(path.read_text()) if path.exists() else None
  if saved != record:
    raise ValueError(
        f"Bad config: the checkpoints in {workdir} trained on "
        f"{_describe_subset(saved)}, but this config draws "
        f"{_describe_subset(record)}; resume with the run's own "
        "data.train_fraction and data.subset_seed, or start a new workdir.")


def _check_saved_normalizer(workdir: str, expected: bool,
                            mesh: jax.sharding.Mesh) -> None:
  """Checks that the latest checkpoint has a moving count iff config does.

  The two states differ by a field, so the restore would fail on the tree
  mismatch; this says why, and which setting the run was saved with.

  Args:
    workdir: the run's directory, holding at least one checkpoint.
    expected: whether the config keeps a moving count.
    mesh: the device mesh (the scalar read is replicated on it).

  Raises:
    ValueError: when the checkpoint and the config disagree.
  """
  ckpt = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
  target = {"loss_normalizer": jax.ShapeDtypeStruct(
      (), jnp.float32, sharding=sharding.replicated(mesh))}
  try:
    ckpt.restore_subtrees(target)
    saved = True
  except checkpoint_lib.MissingSubtreesError:
    saved = False
  finally:
    ckpt.close()
  if saved != expected:
    was, now = ("> 0", "0") if saved else ("0", "> 0")
    raise ValueError(
        f"Bad config: the checkpoints in {workdir} were saved with "
        f"loss.normalizer_momentum {was} (a moving foreground count "
        f"{'in' if saved else 'not in'} the state), but it is {now} now. "
        "Resume with the run's own setting, or start a new workdir.")


def _check_anchor_count(model, state, anchors: np.ndarray,
                        shape: tuple[int, int]) -> None:
  """The head's outputs and the anchors must line up one to one."""
  shapes = jax.eval_shape(
      functools.partial(model.apply, train=False),
      {"params": state.params, "batch_stats": state.batch_stats},
      jax.ShapeDtypeStruct((1, *shape, 3), jnp.float32))
  if shapes[0].shape[1] != len(anchors):
    raise ValueError(
        f"The head predicts {shapes[0].shape[1]} anchors but "
        f"{len(anchors)} were made: model.levels / extra_levels do not match "
        f"the backbone's strides at the input shape {shape}.")


def _evaluate(config, workdir, backbone, names, predict, state, mesh,
              writer, test_counts=None) -> dict[str, Any]:
  """Detects the test split, writes the COCO files, AP and the picture."""
  split = config.data.eval_split
  batches = detection_data.make_test_iterator(
      config, batch_size=config.eval_batch_size, group_counts=test_counts)
  out, pictured = detect(predict, state, batches, mesh,
                         keep_images=int(config.eval.picture_images))
  # detectron2 scores boxes in the dataset's pixels, where COCO's small /
  # medium / large ranges are defined; square views score in their own.
  source_pixels = bool(config.eval.get("source_pixels", False))
  gt = coco.ground_truth(out, names, source_pixels=source_pixels)
  real = out["mask"] > 0
  dets = coco.detections(
      out["image_id"], out["det_boxes"], out["det_scores"],
      out["det_classes"], out["det_valid"] & real[:, None],
      scales=coco.source_scales(out) if source_pixels else None)
  coco.write(workdir, split, gt, dets)
  ap = coco.evaluate(gt, dets)
  step = int(state.step)
  writer.write_scalars(step, {f"detection/{k}": v for k, v in ap.items()})
  logging.info("Detection at step %d on %s: %s", step, split, ", ".join(
      f"{k} {v:.4f}" for k, v in ap.items()))
  _write_picture(config, workdir, out, pictured, names, writer, step)
  # The training subset too: 1% and 100% runs are different experiments.
  results = dict(probe.results_header(config, backbone), steps=step,
                 train_fraction=float(config.data.get("train_fraction", 1.0)),
                 subset_seed=int(config.data.get("subset_seed", 0)),
                 eval_images=int(real.sum()), **ap)
  reporting.write_json(workdir, RESULTS_FILE, results)
  return results


def _write_picture(config, workdir, out, images, names, writer,
                   step: int) -> None:
  """Predicted boxes (score >= eval.picture_score) beside the ground truth.

  `images` are the first test images of process 0 (`detect`), the first
  rows of `out`.
  """
  n = min(int(config.eval.picture_images), int((out["mask"] > 0).sum()),
          len(images))
  if n <= 0 or jax.process_index() != 0:
    return
  keep = out["det_valid"][:n] & (out["det_scores"][:n]
                                 >= config.eval.picture_score)
  panel = visualize.detections_grid(
      images[:n], names,
      predicted=(out["det_boxes"][:n], out["det_classes"][:n],
                 out["det_scores"][:n], keep),
      truth=(out["boxes"][:n], out["labels"][:n], out["valid"][:n]))
  writer.write_images(step, {"detection/test": panel[None]})
  buffer = io.BytesIO()
  Image.fromarray(panel).save(buffer, format="png")
  (epath.Path(workdir) / PICTURE_FILE).write_bytes(buffer.getvalue())


def report(results: dict[str, Any]) -> None:
  """Logs the AP figures on every process."""
  if results:
    logging.info("Process %d: AP %.4f AP50 %.4f AP75 %.4f",
                 jax.process_index(), results["AP"], results["AP50"],
                 results["AP75"])
