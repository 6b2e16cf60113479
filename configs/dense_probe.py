r"""Dense (per-pixel) linear probe of a pretrained backbone: mIoU per stage.

  python -m detco_jax.eval.dense --config=configs/dense_probe.py:demo \
      --config.pretrained=$PRETRAIN_WORKDIR --workdir=$PROBE_WORKDIR

The backbone is frozen (evaluation-mode BN, no gradient). Each stage's map is
standardised per channel with statistics measured once on `stats_batches`
training batches (no learned BN, so the probe stays linear), then a 1x1 conv
(a Dense layer) per stage gives class logits, upsampled bilinearly to the
mask. The four heads train together with softmax cross-entropy over the
labelled pixels and are tested by the mIoU of the argmax.

Optimiser: Adam with a cosine decay. The four heads see features of very
different widths (C to 8C channels) and, for a random backbone, very
different scales; Adam's per-parameter step size lets one learning rate fit
all four, and the standardisation makes it right whatever the backbone.
Adam moves each parameter by about `lr` per step, so the rate must let the
biases reach the log ratios of the class priors (about 4 for the built-in
dataset's 70-80% background) well within the schedule: lr * steps / 2 >> 4.
(At 1e-2 the 312-step demo ends above the prior's cross-entropy; 3e-2
reaches it.) No weight decay: a 1x1 classifier on a frozen map does not
overfit within these few epochs.

`--config.random_init=True` probes the same architecture untrained (the
floor); `--config.pretrained_step=N` picks a checkpoint (default the latest).

Variants (`--config=configs/dense_probe.py:VARIANT`):

  (default)  `oxford_iiit_pet` (prepared with `tfds build oxford_iiit_pet`),
             224 px crops, masks 1..3 mapped to pet / background / border.
  demo       the built-in `detco_shapes` at the demo pretraining's sizes
             (64 px images, 32 px crops and masks), 11 classes (background
             + 10 shapes); a few minutes on a 2-core CPU for the demo's
             ResNet-18 of width 16.
  tiny       a few-step smoke configuration for tests (32 px).
  fgbg       after another variant: two classes, the background and every
             other class merged into "foreground" (e.g. `:demo,fgbg`), so
             the mIoU says whether a stage separates objects from
             background, whatever their class.

Arguments (`name=value`, in any order with the variants; configs/common.py):

  epochs=N   train N epochs (`num_epochs`; the cosine decay follows), e.g.
             `--config=configs/dense_probe.py:demo,epochs=4`.
  seed=N     the probe's seed (data order, crops, head initialisation).
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
  """Oxford-IIIT Pet at 224 px."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.add_backbone_source(c)
  c.data = common.data(
      dataset="oxford_iiit_pet",
      eval_split="test",
      shuffle_buffer=4_000,
      mask_key="segmentation_mask",
      mask_offset=-1,                   # Stored 1..3 -> classes 0..2.
      num_classes=3,
      class_names=("pet", "background", "border"),
      # Merge the classes into background (`background_class`) and
      # foreground (any other): the `fgbg` variant.
      foreground_background=False,
      background_class=1,
  )

  # Training: RandomResizedCrop of `area` + flip; testing: shorter side to
  # `resize_size`, centre crop. Masks come out at `crop_size`.
  c.views = ml_collections.ConfigDict(dict(
      crop_size=224,
      resize_size=256,
      # Milder than classification's (0.08, 1): a tiny crop of a mask is
      # often all one class and teaches little about boundaries.
      area=(0.2, 1.0),
      ratio=(3 / 4, 4 / 3),
      flip_prob=0.5,
  ))

  c.stages = common.STAGES
  c.stats_batches = 8          # Training batches that fix the standardisation.
  c.batch_size = 64            # Global, all processes together.
  c.eval_batch_size = 64
  c.num_epochs = 20
  c.total_steps = -1           # > 0 overrides num_epochs.
  c.lr = 1e-2                  # Adam's; not scaled with the batch.
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  return c


def _demo(c: ml_collections.ConfigDict) -> None:
  """The built-in dataset as in configs/detco.py:demo; minutes on a CPU."""
  common.builtin_demo(c)
  c.data.mask_key = "mask"
  c.data.mask_offset = 0
  c.data.num_classes = 11
  c.data.background_class = 0
  c.data.class_names = ("background", "circle", "square", "triangle", "plus",
                        "ring", "star", "hexagon", "bar", "diamond",
                        "crescent")
  c.views.crop_size = common.DEMO_CROP_SIZE
  c.views.resize_size = common.DEMO_RESIZE_SIZE
  c.stats_batches = 4
  c.num_epochs = 2
  c.lr = 3e-2
  c.log_every = 25
  c.checkpoint_every = 200


def _tiny(c: ml_collections.ConfigDict) -> None:
  """Tests: the 32 px built-in dataset, a few steps, padding in the test."""
  _demo(c)
  common.builtin_tiny(c)
  c.data.prefetch = 1
  c.stats_batches = 1
  c.batch_size = 16
  c.eval_batch_size = 48       # 64 test images: the second batch is padded.
  c.total_steps = 4
  c.log_every = 2
  c.checkpoint_every = 2


def _fgbg(c: ml_collections.ConfigDict) -> None:
  """Foreground against background: does a stage know where objects are?"""
  c.data.foreground_background = True


VARIANTS = {"demo": _demo, "tiny": _tiny, "fgbg": _fgbg}


ARGUMENTS = common.run_arguments()

get_config = common.make_get_config(base_config, VARIANTS, ARGUMENTS)
