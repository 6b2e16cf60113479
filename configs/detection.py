r"""Detection transfer (RetinaNet) of a pretrained backbone: data and views.

  python -m detco_jax.eval.detection --config=configs/detection.py:demo \
      --config.pretrained=$PRETRAIN_WORKDIR --workdir=$DETECTION_WORKDIR

The backbone comes from a pretraining run's workdir or a checkpoint file
(`pretrained`, `pretrained_step`, `pretrained_file`: docs/checkpoints.md;
`random_init=True` for the untrained floor) and keeps its architecture;
`model` describes the FPN, anchors and head around it.

The default is DetCo's RetinaNet R50-FPN protocol: xieenze/DetCo's
benchmarks/detection/configs/coco_R_50_RetinaNet_1x.yaml over its
Base-RetinaNet.yaml and detectron2's config/defaults.py. Every value, where
it comes from, and its config entry (tests/test_detection_protocol.py checks
each row against `base_config()`):

  entry = value                         source
  model.levels = (3, 4, 5)              Base-RetinaNet FPN.IN_FEATURES
  model.extra_levels = (6, 7)
      P6, P7 from C5 (build_retinanet_resnet_fpn_backbone)
  model.frozen_stages = 0               1x BACKBONE.FREEZE_AT
  model.backbone_bn = "sync"            1x RESNETS.NORM SyncBN
  model.fpn_norm = "bn"                 1x FPN.NORM SyncBN (global batch)
  model.norm = "none"                   defaults RETINANET.NORM ""
  model.num_convs = 4                   defaults RETINANET.NUM_CONVS
  model.prior_prob = 0.01               defaults RETINANET.PRIOR_PROB
  model.head_init_std = 0.01            RetinaNetHead normal_(std=0.01)
  model.anchor_sizes = (32, 64, 128, 256, 512)
      Base-RetinaNet ANCHOR_GENERATOR.SIZES
  model.scales_per_octave = 3           Base-RetinaNet: x, x 2^(1/3), x 2^(2/3)
  model.ratios = (0.5, 1.0, 2.0)        defaults ANCHOR_GENERATOR.ASPECT_RATIOS
  model.anchor_offset = 0.0             defaults ANCHOR_GENERATOR.OFFSET
  loss.bg_iou, loss.fg_iou = 0.4, 0.5
      Base-RetinaNet IOU_THRESHOLDS, labels 0/-1/1
  loss.alpha, loss.gamma = 0.25, 2.0    defaults FOCAL_LOSS_ALPHA, _GAMMA
  loss.box_loss = "l1"                  Base-RetinaNet SMOOTH_L1_LOSS_BETA 0.0
  loss.normalizer_momentum = 0.9        RetinaNet loss_normalizer_momentum
  loss.normalizer_init = 800.0          100 per GPU of 2 images, 8 GPUs
  views.resize = "shortest_edge"        ResizeShortestEdge
  views.min_sizes = (640, 672, 704, 736, 768, 800)
      Base-RetinaNet MIN_SIZE_TRAIN, sampled by "choice"
  views.test_min_size = 800             defaults MIN_SIZE_TEST
  views.max_size = 1333                 defaults MAX_SIZE_TRAIN, MAX_SIZE_TEST
  views.flip_prob = 0.5                 RandomFlip (defaults RANDOM_FLIP)
  views.size_divisibility = 32          FPN size_divisibility
  data.filter_empty = True              DATALOADER.FILTER_EMPTY_ANNOTATIONS
  batch_size = 16                       Base-RetinaNet IMS_PER_BATCH
  lr = 0.01                             Base-RetinaNet BASE_LR
  momentum, weight_decay = 0.9, 1e-4    defaults SOLVER.MOMENTUM, WEIGHT_DECAY
  warmup_factor = 0.001                 defaults WARMUP_FACTOR
  schedule_warmup_steps = 1000          defaults WARMUP_ITERS
  schedule_steps = 90000                Base-RetinaNet MAX_ITER
  lr_decay_at = (60000 / 90000, 80000 / 90000)
      Base-RetinaNet STEPS, as fractions of the run
  lr_decay_factor = 0.1                 defaults SOLVER.GAMMA
  eval.score_threshold = 0.05           defaults SCORE_THRESH_TEST
  eval.topk_per_level = 1000            defaults TOPK_CANDIDATES_TEST
  eval.nms_threshold = 0.5              defaults NMS_THRESH_TEST
  eval.max_detections = 100             defaults DETECTIONS_PER_IMAGE
  eval.clip_after_nms = True            RetinaNet.inference_single_image
  eval.precise_bn_batches = 200         1x PRECISE_BN.ENABLED, NUM_ITER
  eval.source_pixels = True             COCOEvaluator on the original pixels

Weight decay skips norm parameters (defaults WEIGHT_DECAY_NORM 0.0), the
matcher allows low-quality matches, and the head's convs start from
normal(0.01) with the classifier's bias at -log((1 - 0.01) / 0.01), as
detectron2's RetinaNet does (detco_jax/detection, models/retinanet.py).

The `_moco` configs' pixels (RGB, mean 123.675 / 116.28 / 103.53, std
58.395 / 57.12 / 57.375, STRIDE_IN_1X1 False) are the backbone's own here:
the pretrained ResNet keeps its normalisation and its stride in the 3x3.

Static shapes. detectron2 batches images of one aspect ratio group (width >
height, or not) and pads each batch to its largest image. Here each group
pads to one fixed shape, 800 x 1344 (landscape) and 1344 x 800 (portrait),
and each step's group is drawn for the whole batch with the chance of the
landscape share (detco_jax/data/aspect_groups.py): two training programs and
two test programs.

What still departs from detectron2 (docs/evaluation.md lists each, with the
reason): the loss normaliser counts the global batch, so its start is 100 x
8 GPUs; a step's group is drawn for the whole batch rather than by each
GPU's buffer; precise BN averages biased (not unbiased) batch variances;
the test ground truth comes from the dataset's boxes (TFDS), not COCO's
annotation file, so AP's area ranges use box areas rather than mask areas.

Variants (`--config=configs/detection.py:VARIANT`):

  (default)  COCO 2017 (`tfds build coco/2017`), train -> validation, 80
             classes, the protocol above.
  voc        VOC07+12: VOC 2007 and 2012 trainval (TFDS "train+validation")
             -> VOC 2007 test, 20 classes.
  demo       the built-in `detco_shapes` at the demo pretraining's scale,
             the protocol scaled to its 64 px square images.
  tiny       a few-step smoke configuration for tests (32 px).
  square     the TF Model Garden's TPU recipe in place of detectron2's
             inputs and head: static S x S views with scale jitter (the
             longer side to S x U(0.8, 1.25), then cropped or padded; tests
             resize the longer side to S), a GroupNorm head, no FPN norm,
             anchors centred in their cells, the batch's own foreground
             count, clipping before NMS, no precise BN, AP in the evaluated
             image's pixels; S is 1024 on COCO. E.g. `:square`, `:demo,square`.

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
  """COCO 2017 on DetCo's RetinaNet protocol (the table above)."""
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
      # Leave images without a box to train on out of training.
      filter_empty=True,
  )
  c.views = ml_collections.ConfigDict(dict(
      # "shortest_edge": detectron2's ResizeShortestEdge, each aspect-ratio
      # group padded to its shape; "longest_edge": square S x S views.
      resize="shortest_edge",
      min_sizes=(640, 672, 704, 736, 768, 800),  # Drawn per image.
      test_min_size=800,
      max_size=1333,
      size_divisibility=32,
      # Square views only (`:square`): S, and the longer side's jitter.
      image_size=1024,
      scale_range=(0.8, 1.25),
      flip_prob=0.5,
      min_box_size=0.0,          # Pixels; only boxes without area go.
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
      # Anchor centres at (x + offset) * stride: detectron2's corner (0.0);
      # the TF Model Garden centres them in their cell (0.5).
      anchor_offset=0.0,
      head_channels=256,
      num_convs=4,                           # Per tower.
      prior_prob=0.01,
      head_init_std=0.01,                    # The head convs' normal init.
      norm="none",                           # The head's: "none" or "gn".
      fpn_norm="bn",                         # "bn" (SyncBN) or "none".
      backbone_bn="sync",                    # "sync" or "frozen".
      frozen_stages=0,                       # detectron2's FREEZE_AT.
  ))
  c.loss = ml_collections.ConfigDict(dict(
      alpha=0.25, gamma=2.0, fg_iou=0.5, bg_iou=0.4, box_loss="l1",
      smooth_l1_beta=0.0,  # Of box_loss="smooth_l1"; 0 is L1.
      # The losses are divided by a moving average of the global batch's
      # foreground anchors from `normalizer_init` (detectron2's 100 per GPU
      # of 2 images, over 8 GPUs), or by each batch's own count (momentum 0;
      # detco_jax/detection/losses.py).
      normalizer_momentum=0.9, normalizer_init=800.0))
  c.eval = ml_collections.ConfigDict(dict(
      score_threshold=0.05, topk_per_level=1000, nms_threshold=0.5,
      max_detections=100,
      clip_after_nms=True,   # Clip after NMS, as detectron2 does.
      # Training batches whose BN statistics replace the running ones before
      # testing (detectron2's PreciseBN); 0: off.
      precise_bn_batches=200,
      # Score in the dataset's pixels (detectron2), not the evaluated image's.
      source_pixels=True,
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

  detectron2's protocol scales by 32 / 800: the shorter side is drawn from
  (26, ..., 32) for 640..800 and tested at 32. The images are square, so
  the longer side equals the shorter and `max_size` 32 never shrinks one:
  both groups pad to 32 x 32 (every square image is "portrait"), one
  program. Sizes divide by 8, res5's stride after the small-image stem.
  """
  common.builtin_demo(c)
  c.data.max_boxes = 4           # At most 4 objects in an image.
  c.views.image_size = common.DEMO_CROP_SIZE
  c.views.min_sizes = tuple(round(common.DEMO_CROP_SIZE * s / 800)
                            for s in (640, 672, 704, 736, 768, 800))
  c.views.test_min_size = common.DEMO_CROP_SIZE
  c.views.max_size = common.DEMO_CROP_SIZE
  c.views.size_divisibility = 8
  c.batch_size = 32
  c.eval_batch_size = 64
  c.model.extra_levels = (6,)
  c.model.anchor_sizes = (4, 8, 16, 32)    # 2 x stride: objects are small.
  c.model.head_channels = 64
  # detectron2's per-layer gain at 64 channels: its normal(0.01) at 256
  # channels scaled by sqrt(256 / 64). With 0.01 the no-norm head's signal
  # fades 2x more per conv and the loss stays flat for about 230 of the 500
  # steps, against about 100 (docs/results.md).
  c.model.head_init_std = 0.01 * (256 / c.model.head_channels) ** 0.5
  # detectron2's start, 100 per 2 images, for this batch.
  c.loss.normalizer_init = 50.0 * c.batch_size
  c.eval.precise_bn_batches = 50  # 1,600 images, half of detectron2's.
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
  c.views.min_sizes = (24, 28, 32)
  c.views.test_min_size = c.views.max_size = c.data.builtin_image_size
  c.batch_size = 8
  c.eval_batch_size = 48       # 64 test images: the second batch is padded.
  c.model.extra_levels = ()
  c.model.anchor_sizes = (8, 16, 32)
  # 2 channels per GN group (`square`): with 1, GN would flatten the 4x4
  # res5 level.
  c.model.head_channels = 64
  c.loss.normalizer_init = 50.0 * c.batch_size
  c.eval.precise_bn_batches = 2
  c.warmup_steps = 2
  c.total_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.eval.picture_images = 2


def _square(c: ml_collections.ConfigDict) -> None:
  """The TF Model Garden's TPU recipe: square views, GN head (docstring).

  Sets only the protocol's entries, so it goes with any scale: `:square`
  is 1024 px COCO, `:demo,square` the demo's 32 px.
  """
  c.views.resize = "longest_edge"
  c.views.min_box_size = 1.0       # Slivers left by a crop are dropped.
  c.data.filter_empty = False
  c.model.norm = "gn"
  c.model.fpn_norm = "none"
  c.model.anchor_offset = 0.5
  c.loss.normalizer_momentum = 0.0
  c.eval.clip_after_nms = False
  c.eval.precise_bn_batches = 0
  c.eval.source_pixels = False


def _schedule_variant(name: str) -> common.Variant:
  """The variant that sets the schedule `SCHEDULES[name]`."""
  return lambda c: _set_schedule(c, name)


# The protocol and the schedules apply after the scale variants:
# `demo,square` is the demo's data on square views, `demo,12k` the demo's
# data and model on the 12k schedule.
VARIANTS = {"voc": _voc, "demo": _demo, "tiny": _tiny, "square": _square,
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
