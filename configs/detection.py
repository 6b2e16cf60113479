r"""Detection transfer (RetinaNet) of a pretrained backbone: data and views.

  python -m detco_jax.eval.detection --config=configs/detection.py:demo \
      --config.pretrained=$PRETRAIN_WORKDIR --workdir=$DETECTION_WORKDIR

The backbone comes from a pretraining run's workdir or a checkpoint file
(`pretrained`, `pretrained_step`, `pretrained_file`: docs/checkpoints.md;
`random_init=True` for the untrained floor) and keeps its architecture;
`model` describes the FPN, anchors and head around it.
The detector, its losses and its schedule are detectron2's RetinaNet R50-FPN
1x (Base-RetinaNet.yaml): P3..P7, anchors 32..512 with 3 scales per octave
and ratios 0.5/1/2, IoU thresholds 0.4/0.5, focal alpha 0.25 gamma 2, an L1
box loss, SGD lr 0.01 at batch 16 with momentum 0.9 and weight decay 1e-4,
1,000 warm-up steps from lr x 0.001 and 90k iterations with x0.1 at 60k and
80k (scaled to the batch: the schedule is counted in images, so at batch 64
it is 22,500 steps with drops at 15k and 20k, 250 warm-up steps and lr
0.04). Backbone BN is synchronised
over the global batch, as the paper's transfer configs use, and every stage
trains. Two things differ from detectron2, so AP from this config is not
directly comparable with detectron2's (or the paper's) RetinaNet figures:

  the head   4 convs with GroupNorm (32 groups) in each tower; detectron2's
             head has no norm (`--config.model.norm=none` gives it).
  the views  static S x S inputs with scale jitter, as the TF Model Garden's
             RetinaNet makes them for TPUs: training flips, resizes the
             longer side to S * U(scale_range) and crops or pads to S x S;
             testing resizes the longer side to S and pads. At 1024 px a 4:3
             COCO image trains with its shorter side in 614..960 and tests
             at 768. detectron2 resizes the shorter side to one of 640..800
             (at most 1333 for the longer) in training and to 800 in
             testing, with flips, on inputs that are not square.

Smaller departures (anchor offset, loss normaliser, clipping before NMS)
and the settings that undo them are listed in docs/evaluation.md.

Variants (`--config=configs/detection.py:VARIANT`):

  (default)  COCO 2017 (`tfds build coco/2017`), train -> validation, 80
             classes (a "1x"-like setting: batch 16, 1024 px).
  voc        VOC07+12: VOC 2007 and 2012 trainval (TFDS "train+validation")
             -> VOC 2007 test, 20 classes.
  demo       the built-in `detco_shapes` at the demo pretraining's 64 px.
  tiny       a few-step smoke configuration for tests (32 px).

  The schedules of DetCo's RetinaNet figures (`SCHEDULES`), in detectron2
  iterations at batch 16, each with 1,000 warm-up iterations from x0.001;
  they apply after the variants above and set `schedule_steps`,
  `schedule_warmup_steps` and `lr_decay_at` (the drops as fractions):

  12k        12,000 iterations, x0.1 at 9,000 and 11,000.
  1x         90,000 iterations, x0.1 at 60,000 and 80,000 (the default).
  2x         180,000 iterations, x0.1 at 120,000 and 160,000.

Arguments (`name=value`, in any order with the variants; configs/common.py):

  seed=N     the data order and views (and the job's initialisation).
  train_fraction=F
             train on round(F x N) of the N training images (0 < F <= 1),
             drawn by image id from `data.subset_seed` (default 0) and
             written to the workdir as train_subset.json, e.g.
             `:12k,train_fraction=0.01` or `:demo,train_fraction=0.1`. The
             schedule is the one chosen, as for the whole set.
  steps=N    train N steps (`total_steps`) at any batch; the x0.1 drops
             stay at the same fractions of the run and the warm-up keeps
             its length, e.g. `:demo,steps=100` or `:12k,steps=3000`.
"""

import ml_collections

from configs import common

# DetCo's RetinaNet schedules, in detectron2 iterations at batch 16: name ->
# (iterations, the x0.1 drops as fractions of the run).
SCHEDULES = {
    "12k": (12_000, (9_000 / 12_000, 11_000 / 12_000)),
    "1x": (90_000, (60_000 / 90_000, 80_000 / 90_000)),
    "2x": (180_000, (120_000 / 180_000, 160_000 / 180_000)),
}
# detectron2's WARMUP_ITERS at batch 16, for every schedule.
SCHEDULE_WARMUP_STEPS = 1000


def _set_schedule(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets the learning-rate schedule `SCHEDULES[name]`, counted in images.

  Args:
    c: the config, changed in place.
    name: a key of `SCHEDULES`.
  """
  steps, drops = SCHEDULES[name]
  # Steps at batch `lr_base_batch`: the job runs schedule_steps *
  # lr_base_batch / batch_size steps, the same number of images.
  c.schedule_steps = steps
  c.schedule_warmup_steps = SCHEDULE_WARMUP_STEPS
  c.lr_decay_at = drops             # Fractions of the run's steps.
  # Steps at `batch_size` that replace the scaled counts when set (total
  # > 0, as `steps=N` does; warm-up >= 0); the drops stay at the fractions.
  c.total_steps = -1
  c.warmup_steps = -1


def base_config() -> ml_collections.ConfigDict:
  """COCO 2017 at 1024 px."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.add_backbone_source(c, frozen=False)  # BN trains.
  c.data = common.data(
      dataset="coco/2017",
      train_split="train",
      eval_split="validation",
      # (dataset, split) pairs that replace (dataset, train_split) for
      # training, e.g. VOC07+12; empty: train on `dataset` alone.
      train_sources=(),
      # The feature layout (detco_jax/data/detection.py `BOX_FEATURES`):
      # unset, the dataset name's first component ("coco/2017" -> "coco").
      box_features=common.placeholder(str),
      # Boxes per image after padding (COCO has at most 93).
      max_boxes=100,
      # Train on this fraction of the training images (`train_fraction=F`):
      # round(F * N) of them, drawn by image id from `subset_seed` alone and
      # written to the workdir (detco_jax/data/detection.py `train_subset`).
      train_fraction=1.0,
      subset_seed=0,
  )
  c.views = ml_collections.ConfigDict(dict(
      image_size=1024,
      scale_range=(0.8, 1.25),   # Longer side S * U(lo, hi) in training.
      flip_prob=0.5,
      min_box_size=1.0,          # Pixels; slivers left by a crop are dropped.
      # The ImageNet mean: padding that normalises to about 0.
      pad_value=(124, 116, 104),
  ))
  c.batch_size = 16            # Global, all processes together.
  c.eval_batch_size = 8

  # ---- The detector (detco_jax/models/retinanet.py). Levels count as the
  # backbone's stages (3 = res3); extra levels are P6/P7 made from res5. A
  # level's stride is 2**level after the ImageNet stem, 4x less after the
  # small-image ("cifar") stem.
  c.model = ml_collections.ConfigDict(dict(
      levels=(3, 4, 5),
      extra_levels=(6, 7),
      anchor_sizes=(32, 64, 128, 256, 512),  # Base size per level, pixels.
      scales_per_octave=3,
      ratios=(0.5, 1.0, 2.0),                # Anchor height / width.
      # Anchor centres at (x + offset) * stride: 0.5 centres them in their
      # cell (TF Model Garden); detectron2's ANCHOR_GENERATOR.OFFSET is 0.0.
      anchor_offset=0.5,
      head_channels=256,
      norm="gn",
      backbone_bn="sync",                    # "sync" or "frozen".
      frozen_stages=0,                       # detectron2's FREEZE_AT.
  ))
  c.loss = ml_collections.ConfigDict(dict(
      alpha=0.25, gamma=2.0, fg_iou=0.5, bg_iou=0.4, box_loss="l1",
      smooth_l1_beta=0.0,  # Of box_loss="smooth_l1"; 0 is L1.
      # The losses are divided by the batch's foreground anchors (momentum
      # 0), or by their moving average from `normalizer_init` (detectron2:
      # momentum 0.9 from 100 per GPU; detco_jax/detection/losses.py).
      normalizer_momentum=0.0, normalizer_init=100.0))
  c.eval = ml_collections.ConfigDict(dict(
      score_threshold=0.05, topk_per_level=1000, nms_threshold=0.5,
      max_detections=100,
      clip_after_nms=False,  # True: clip after NMS, as detectron2 does.
      picture_images=8,      # Test images drawn with their detections.
      picture_score=0.3,     # Detections drawn from this score on.
  ))

  # ---- Optimisation: detectron2's 1x (SCHEDULES["1x"]). The schedule is
  # counted in images: its steps are at batch `lr_base_batch` and scale to
  # `batch_size` when the job starts (detco_jax/eval/detection.py
  # `total_steps`), so the drops stay at the same fractions of the run.
  c.lr = 0.01                  # At batch `lr_base_batch`, scaled linearly.
  c.lr_base_batch = 16
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.warmup_factor = 0.001      # The warm-up starts at lr * warmup_factor.
  _set_schedule(c, "1x")
  c.lr_decay_factor = 0.1

  c.log_every = 50
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  return c


def _voc(c: ml_collections.ConfigDict) -> None:
  """VOC07+12 trainval -> VOC07 test."""
  c.data.dataset = "voc/2007"
  c.data.eval_split = "test"
  c.data.train_sources = (("voc/2007", "train+validation"),
                          ("voc/2012", "train+validation"))


def _demo(c: ml_collections.ConfigDict) -> None:
  """The built-in dataset as in configs/detco.py:demo; minutes on a CPU.

  The 64 px images are detected at 32 px, the demo pretraining's view size:
  the backbone is fine-tuned at the scale it was pretrained at, and a step
  costs 4.7x less than at 64 px (benchmark, side by side: 0.85 against
  4.0 s at batch 32), which is what lets the README's table of backbones,
  seeds and schedules run in about an hour on a 2-core CPU. With the
  small-image stem res3..res5 have strides 2, 4 and 8 there, and P6 16;
  objects are 4 to 20 px. 500 steps (16,000 images, 1.6 epochs) is the
  long schedule; `steps=100` the short one.
  """
  common.builtin_demo(c)
  c.data.max_boxes = 4           # At most 4 objects in an image.
  c.views.image_size = common.DEMO_CROP_SIZE
  c.batch_size = 32
  c.eval_batch_size = 64
  c.model.extra_levels = (6,)
  c.model.anchor_sizes = (4, 8, 16, 32)    # 2 x stride: objects are small.
  c.model.head_channels = 64
  c.warmup_steps = 25           # 5% of the long schedule.
  c.total_steps = 500
  c.log_every = 20
  c.checkpoint_every = 200


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Tests: the 32 px built-in dataset, small batches."""
  _demo(c)
  common.builtin_tiny(c)
  c.data.prefetch = 1
  c.views.image_size = c.data.builtin_image_size
  c.batch_size = 8
  c.eval_batch_size = 48       # 64 test images: the second batch is padded.
  c.model.extra_levels = ()
  c.model.anchor_sizes = (8, 16, 32)
  # 2 channels per GN group: with 1, GN would flatten the 4x4 res5 level.
  c.model.head_channels = 64
  c.warmup_steps = 2
  c.total_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.eval.picture_images = 2


def _schedule_variant(name: str) -> common.Variant:
  """The variant that sets the schedule `SCHEDULES[name]`."""
  return lambda c: _set_schedule(c, name)


# The schedules apply after the scale variants: `demo,12k` is the demo's
# data and model on the 12k schedule.
VARIANTS = {"voc": _voc, "demo": _demo, "tiny": _tiny,
            **{name: _schedule_variant(name) for name in SCHEDULES}}


def _set_train_fraction(c: ml_collections.ConfigDict, fraction: float
                        ) -> None:
  """Sets `data.train_fraction`, which must be in (0, 1].

  Args:
    c: the config, changed in place.
    fraction: F, the fraction of the training images to train on.

  Raises:
    ValueError: F outside (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"Config argument 'train_fraction' must be in (0, 1], "
                     f"got {fraction}.")
  c.data.train_fraction = fraction


ARGUMENTS = {"seed": common.Argument("seed"),
             "steps": common.Argument("total_steps"),
             "train_fraction": common.Argument(_set_train_fraction,
                                               default=1.0)}

get_config = common.make_get_config(base_config, VARIANTS, ARGUMENTS)
