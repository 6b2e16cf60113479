r"""Speed, FLOPs, MFU and memory of the jitted detection fine-tuning step.

  python -m detco_jax.benchmark.detection_step \
      --config=configs/detection.py[:variant] [--config.key=value ...] \
      [--pretrain_config=configs/detco.py[:variant]] \
      [--pretrain_config.model.depth=50 ...] [--per_device_batch=B] \
      [--steps=N] [--warmup=N] [--num_classes=K] [--boxes_per_image=N] \
      [--compile_only [--topology=v3:2x2 [--chip_config=megacore]]]

What is timed is the real step of the detection job,
`detection.make_train_step` (normalisation, the RetinaNet forward and
backward with the backbone's BN synchronised over the batch, anchor
matching, focal and box losses, the SGD update), compiled once ahead of
time as the pretraining benchmark compiles its step (`train_step`; the
shared helpers are in `common`), on a synthetic batch made once on the
devices with the step's input sharding: uint8 images [B, S, S, 3] and
`data.max_boxes` box slots per image of which `boxes_per_image` hold a box
(COCO's mean, 7, by default) of a size between the smallest and largest
anchor. The step's cost does not depend on the boxes' values: every shape
is static, padding included.

The backbone is the ResNet of a pretraining config (`--pretrain_config`,
default configs/detco.py: ResNet-50 with the ImageNet stem;
`configs/detco.py:demo` for the demo's ResNet-18/16 with the small-image
stem), as `pretrained.random_init` makes it: a pretrained one has the same
shapes, hence the same step. The class count is the dataset's (COCO 80,
VOC 20, the built-in dataset's 10), read from no dataset; `--num_classes`
sets it for others.

Printed, one `name: value` line each, per device: step_s (median, and its
min and max), images_per_s_per_device, flops_per_step (XLA's cost analysis
of the compiled per-device step), achieved_flops_per_s, peak_flops_per_s
(one large matrix product in the backbone's dtype, timed in turn with the
step), mfu, memory_*_bytes (the compiled step's buffers; see `train_step`)
and compile_s. `--compile_only` compiles for abstract arguments and prints
the compile figures alone: no state or batch is allocated, so with
`--topology=v3:2x2` (libtpu installed, see `train_step`) it reads the
memory a TPU needs on any host.

Measured on 2026-12-02 on a 2-core CPU VM, one device, no XLA_FLAGS, while
other jobs loaded it (load average 4-6: the times slower than on an idle
machine, the FLOPs exact; memory is XLA:CPU's, no stand-in for a TPU's):

  configs/detection.py:demo --pretrain_config=configs/detco.py:demo
      ResNet-18/16 (small-image stem), 32 px, batch 32, 3,060 anchors:
      0.76 s/step, 41.9 img/s, 30.4 GFLOP/step, MFU 0.41, 0.19 GB total
      (at 64 px, the demo before: 3.30 s/step, 129 GFLOP/step).
  configs/detection.py --per_device_batch=1   ResNet-50, 1024 px, COCO's
      80 classes, 196,416 anchors: 46.7 s/step, 0.021 img/s, 1.47
      TFLOP/step, MFU 0.57, 4.43 GB total (4.13 GB temp).
  the same with --per_device_batch=2 --compile_only: 2.94 TFLOP/step,
      8.40 GB total (8.09 GB temp), compiled in 19 s; with --topology=v3:2x2
      (TPU v3-8, libtpu 0.0.42.1): 2.91 TFLOP/step per core, 5.98 GB total
      (5.67 GB temp), compiled in 354 s.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import dataclasses
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.sharding import Mesh
from ml_collections import config_flags

from detco_jax import config_lib
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.benchmark import common
from detco_jax.data import detection as detection_data
from detco_jax.data import scenes
from detco_jax.data import sources
from detco_jax.eval import detection
from detco_jax.models import retinanet

Batch = dict[str, jax.Array]
Figures = common.Figures

# The pretraining config whose ResNet is the default backbone: the
# checkout's configs/detco.py, wherever the command runs from.
DEFAULT_PRETRAIN_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "configs", "detco.py")
# Boxes in an image: COCO 2017 train's mean (860k boxes, 118k images).
BOXES_PER_IMAGE = 7
# Classes of each box layout (`detection_data.BOX_FEATURES`), so that no
# dataset need be prepared to benchmark its detector.
_NUM_CLASSES = {"coco": 80, "voc": 20, sources.BUILTIN_NAME:
                scenes.NUM_CLASSES}


def num_classes(config: ml_collections.ConfigDict) -> int:
  """K, the class count of `config.data.dataset`, from its box layout.

  Args:
    config: the detection config.

  Returns:
    The dataset's class count.

  Raises:
    ValueError: a layout whose class count is not known here.
  """
  layout = detection_data.box_features(config.data)
  name = next(k for k, v in detection_data.BOX_FEATURES.items()
              if v == layout)
  if name not in _NUM_CLASSES:
    raise ValueError(f"The class count of {config.data.dataset!r} is not "
                     "known here: pass --num_classes.")
  return _NUM_CLASSES[name]


def make_batch_fn(config: ml_collections.ConfigDict, classes: int,
                  boxes_per_image: int,
                  shape: tuple[int, int] | None = None
                  ) -> Callable[[jax.Array], Batch]:
  """`key -> batch`: random images and a few plausible boxes per image.

  Box sides are log-uniform between the smallest and the largest anchor
  size (within the image), aspect ratios between 1:2 and 2:1, so that the
  boxes match anchors of every level, as real objects do.

  Args:
    config: the detection config (batch, image size, box slots, anchors).
    classes: K; labels are uniform in [0, K).
    boxes_per_image: real boxes in each image (at most `data.max_boxes`).
    shape: the images' (height, width), one of the config's padded shapes;
      None: the first (`detection.padded_shapes`).

  Returns:
    The function, traceable: `{"image": uint8 [B, H, W, 3], "boxes":
    float32 [B, G, 4] XYXY pixels, "labels": int32 [B, G] (-1 for
    padding), "valid": bool [B, G]}`, the real boxes first, as the job's
    batches have them.
  """
  b, g = config.batch_size, config.data.max_boxes
  h, w = shape or detection.padded_shapes(config)[0]
  s = jnp.array([w, h], jnp.float32)  # (x, y) extent.
  n = min(boxes_per_image, g)
  low = math.log(min(min(config.model.anchor_sizes), h, w))
  high = math.log(min(max(config.model.anchor_sizes), h, w))

  def make(key):
    k_image, k_size, k_ratio, k_centre, k_label = jax.random.split(key, 5)
    side = jnp.exp(jax.random.uniform(k_size, (b, g, 1), minval=low,
                                      maxval=high))
    ratio = 2.0 ** jax.random.uniform(k_ratio, (b, g, 1), minval=-1.0,
                                      maxval=1.0)  # Height / width.
    wh = jnp.minimum(jnp.concatenate([side / jnp.sqrt(ratio),
                                      side * jnp.sqrt(ratio)], -1), s)
    centre = wh / 2 + jax.random.uniform(k_centre, (b, g, 2)) * (s - wh)
    valid = jnp.broadcast_to(jnp.arange(g) < n, (b, g))
    boxes = jnp.concatenate([centre - wh / 2, centre + wh / 2], -1)
    labels = jax.random.randint(k_label, (b, g), 0, classes)
    return {"image": jax.random.bits(k_image, (b, h, w, 3), jnp.uint8),
            "boxes": jnp.where(valid[..., None], boxes, 0.0),
            "labels": jnp.where(valid, labels, -1),
            "valid": valid}

  return make


def synthetic_batch(config: ml_collections.ConfigDict, classes: int,
                    boxes_per_image: int, mesh: Mesh, seed: int = 0,
                    shape: tuple[int, int] | None = None) -> Batch:
  """`make_batch_fn`'s batch, made on the devices and split over `data`."""
  return jax.jit(make_batch_fn(config, classes, boxes_per_image, shape),
                 out_shardings=sharding.batch_sharded(mesh))(
                     jax.random.key(seed))


@dataclasses.dataclass(frozen=True)
class Setup:
  """The detection job's step and its abstract arguments.

  Attributes:
    config: the detection config, its batch fitted to the devices.
    pretrain_config: the pretraining config of the backbone.
    backbone: its ResNet, with abstract variables (no arrays).
    model: the RetinaNet.
    shape: the (height, width) of the images measured.
    anchors: the anchors of every padded shape (`detection.Anchors`).
    classes: K.
    boxes_per_image: real boxes in each synthetic image.
    tx: the optimiser.
    mesh: the mesh.
    train_step: `detection.make_train_step`'s jitted step.
    state_spec: the detector state's shapes, dtypes and shardings.
    batch_spec: the batch's.
  """
  config: ml_collections.ConfigDict
  pretrain_config: ml_collections.ConfigDict
  backbone: pretrained.Backbone
  model: retinanet.RetinaNet
  shape: tuple[int, int]
  anchors: detection.Anchors
  classes: int
  boxes_per_image: int
  tx: optax.GradientTransformation
  mesh: Mesh
  train_step: Callable
  state_spec: Any
  batch_spec: Batch


def _detector_state(config: ml_collections.ConfigDict,
                    model: retinanet.RetinaNet,
                    tx: optax.GradientTransformation,
                    anchors: detection.Anchors, mesh: Mesh,
                    backbone: pretrained.Backbone) -> Any:
  """The job's fresh detector state (`detection.create_state`)."""
  return detection.create_state(model, backbone, tx, anchors, mesh,
                                config.seed,
                                detection.initial_loss_normalizer(config))


def build(config: ml_collections.ConfigDict,
          pretrain_config: ml_collections.ConfigDict,
          mesh: Mesh, *, classes: int,
          boxes_per_image: int = BOXES_PER_IMAGE,
          shape: tuple[int, int] | None = None) -> Setup:
  """The job's step for the config and backbone, and its abstract inputs.

  Only shapes are computed (`jax.eval_shape` of `pretrained.random_init`
  and `detection.create_state`): nothing is allocated, so the mesh may be
  of compile-only devices.

  Args:
    config: the detection config (its batch is the global batch).
    pretrain_config: the pretraining config whose ResNet is the backbone.
    mesh: the mesh.
    classes: K.
    boxes_per_image: real boxes in each synthetic image.
    shape: the images' (height, width), one of the config's padded shapes;
      None: the first.

  Returns:
    The setup.
  """
  shape = tuple(shape or detection.padded_shapes(config)[0])
  variables = jax.eval_shape(lambda: pretrained.random_init(
      pretrain_config, config.seed, mesh).variables)
  backbone = pretrained.Backbone(
      pretrained.resnet_of(pretrain_config), variables, pretrain_config, 0,
      "abstract")
  detector = detection.build(config, backbone, classes, mesh)
  model, anchors, tx = detector.model, detector.anchors, detector.tx
  state_shapes = jax.eval_shape(
      lambda v: _detector_state(config, model, tx, anchors, mesh,
                                dataclasses.replace(backbone, variables=v)),
      variables)
  if shape not in anchors:
    raise ValueError(f"Shape {shape} is not one of the config's padded "
                     f"shapes {sorted(anchors)}.")
  batch_shapes = jax.eval_shape(
      make_batch_fn(config, classes, boxes_per_image, shape),
      jax.random.key(0))
  return Setup(
      config=config, pretrain_config=pretrain_config, backbone=backbone,
      model=model, shape=shape, anchors=anchors, classes=classes,
      boxes_per_image=boxes_per_image, tx=tx, mesh=mesh,
      train_step=detector.train_step,
      # The step's own in_shardings: the state replicated, the batch split.
      state_spec=common.with_shardings(state_shapes,
                                       sharding.replicated(mesh)),
      batch_spec=common.with_shardings(batch_shapes,
                                       sharding.batch_sharded(mesh)))


def create_state(setup: Setup) -> Any:
  """The detector's real state, as the job makes it for `random_init=True`."""
  backbone = pretrained.random_init(setup.pretrain_config, setup.config.seed,
                                    setup.mesh)
  return _detector_state(setup.config, setup.model, setup.tx, setup.anchors,
                         setup.mesh, backbone)


def _describe(setup: Setup, per_device_batch: int, changes: list[str],
              log: Callable[[str], None]) -> None:
  """Logs the batch, the detector and the config changes."""
  c, m = setup.config, setup.backbone.module
  h, w = setup.shape
  log(f"global batch: {c.batch_size} ({per_device_batch} per device); "
      f"images {h}x{w} px ({c.views.resize}), {c.data.max_boxes} box slots "
      f"({min(setup.boxes_per_image, c.data.max_boxes)} boxes), "
      f"{setup.classes} classes")
  levels = detection.anchor_levels(c, m.stem)
  log(f"model: RetinaNet on ResNet-{m.depth} width {m.width} ({m.stem} "
      f"stem, {setup.pretrain_config.model.dtype}), strides "
      f"{', '.join(str(2**l) for l in levels)}, "
      f"{len(setup.anchors[setup.shape][0])} anchors, head "
      f"{c.model.head_channels} channels ({c.model.norm}), FPN norm "
      f"{c.model.get('fpn_norm', 'none')}, "
      f"backbone BN {c.model.backbone_bn}, frozen stages "
      f"{c.model.frozen_stages}")
  log("config changes: " + ("; ".join(changes) or "none"))


def run(config: ml_collections.ConfigDict,
        pretrain_config: ml_collections.ConfigDict, *,
        per_device_batch: int | None, steps: int, warmup: int,
        compile_only: bool = False, topology: str | None = None,
        chip_config: str | None = None, classes: int | None = None,
        boxes_per_image: int = BOXES_PER_IMAGE,
        shape: tuple[int, int] | None = None,
        log: Callable[[str], None] = print) -> Figures:
  """Compiles, runs and measures the detection step; prints the figures.

  Args:
    config: the detection config (not changed; a copy gets the batch).
    pretrain_config: the pretraining config whose ResNet is the backbone.
    per_device_batch: images per device; None: batch_size // devices.
    steps: timed steps.
    warmup: untimed steps after compilation.
    compile_only: stop after compiling (FLOPs and memory only), having
      allocated nothing.
    topology: compile for this TPU topology's devices
      (`common.topology_devices`) instead of the local ones; only with
      `compile_only`.
    chip_config: the topology's chip configuration (e.g. "megacore").
    classes: K; None: the dataset's (`num_classes`).
    boxes_per_image: real boxes in each synthetic image.
    shape: the images' (height, width), one of the config's padded shapes
      (`detection.padded_shapes`); None: the first.
    log: where the report lines go.

  Returns:
    name -> value of every figure printed as `name: value`.
  """
  devices = common.step_devices(topology, chip_config, compile_only)
  config = config.copy_and_resolve_references()
  if per_device_batch is None:
    per_device_batch = max(config.batch_size // len(devices), 1)
  batch_size = per_device_batch * len(devices)
  changes = ([f"batch_size {config.batch_size} -> {batch_size}"]
             if batch_size != config.batch_size else [])
  config.batch_size = batch_size
  log(common.describe_devices(devices))
  setup = build(config, pretrain_config, sharding.make_mesh(devices),
                classes=num_classes(config) if classes is None else classes,
                boxes_per_image=boxes_per_image, shape=shape)
  _describe(setup, per_device_batch, changes, log)
  compiled, figures = common.compile_figures(
      setup.train_step, setup.state_spec, setup.batch_spec, log=log)
  if compile_only:
    common.log_figures(figures, log)
    return figures

  batch = synthetic_batch(config, setup.classes, boxes_per_image, setup.mesh,
                          seed=config.seed, shape=setup.shape)
  step = common.threaded_call(compiled, {"state": create_state(setup)}, batch)
  times, peak_n = common.time_step(
      step, config_lib.DTYPES[pretrain_config.model.dtype], steps, warmup)
  figures.update(common.speed_figures(times, figures, per_device_batch,
                                      peak_n))
  common.log_figures(figures, log)
  return figures


def run_shapes(config: ml_collections.ConfigDict,
               pretrain_config: ml_collections.ConfigDict, *,
               with_square: bool = False,
               log: Callable[[str], None] = print,
               **kwargs: Any) -> dict[str, Figures]:
  """`run` at each of the config's padded shapes, and at its square step.

  Args:
    config: the detection config.
    pretrain_config: the pretraining config whose ResNet is the backbone.
    with_square: also measure the config with the `square` variant's
      protocol (its S x S step), and print each shape's images/s over it.
    log: where the report lines go.
    **kwargs: `run`'s other arguments.

  Returns:
    "HxW" (or "square HxW") -> that step's figures.
  """
  from configs import detection as detection_config  # pylint: disable=g-import-not-at-top
  runs = [("", config, shape) for shape in detection.padded_shapes(config)]
  if with_square:
    square = config.copy_and_resolve_references()
    detection_config.VARIANTS["square"](square)
    runs += [("square ", square, detection.padded_shapes(square)[0])]
  results = {}
  for label, c, (h, w) in runs:
    name = f"{label}{h}x{w}"
    log(f"== {name}")
    results[name] = run(c, pretrain_config, shape=(h, w), log=log, **kwargs)
  speed = {k: f.get("images_per_s_per_device") for k, f in results.items()}
  base = next((v for k, v in speed.items() if k.startswith("square")), None)
  if base:
    log("== side by side")
    for name, value in speed.items():
      if not name.startswith("square"):
        log(f"images_per_s_{name}_over_square: {value / base:.3f}")
  return results


def define_flags() -> None:
  """The shared step-benchmark flags, and the detection step's own."""
  common.define_flags("Detection config file, e.g. "
                      "configs/detection.py:demo.")
  config_flags.DEFINE_config_file(
      "pretrain_config", DEFAULT_PRETRAIN_CONFIG, "Pretraining config file "
      "whose ResNet is the backbone (its model section), e.g. "
      "configs/detco.py:demo; default configs/detco.py (ResNet-50).",
      lock_config=True)
  flags.DEFINE_integer(
      "num_classes", None, "Detection classes; default the dataset's (COCO "
      "80, VOC 20, the built-in 10).")
  flags.DEFINE_integer("boxes_per_image", BOXES_PER_IMAGE,
                       "Real boxes in each synthetic image.")
  flags.DEFINE_bool("with_square", False,
                    "Also measure the config's square step (the `square` "
                    "variant) and print each padded shape's speed over it.")


def main() -> None:
  """Benchmarks with the command-line flags."""
  f = flags.FLAGS
  run_shapes(f.config, f.pretrain_config, with_square=f.with_square,
             per_device_batch=f.per_device_batch, steps=f.steps,
             warmup=f.warmup, compile_only=f.compile_only,
             topology=f.topology, chip_config=f.chip_config,
             classes=f.num_classes, boxes_per_image=f.boxes_per_image)


if __name__ == "__main__":
  # Both config files import `configs.common`.
  cli.make_configs_importable(sys.argv)
  cli.make_configs_importable(
      [f"--config={DEFAULT_PRETRAIN_CONFIG}"]
      + [arg.replace("--pretrain_config=", "--config=", 1) for arg in sys.argv
         if arg.startswith("--pretrain_config=")])
  cli.run(main, define_flags)
