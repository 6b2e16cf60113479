r"""DetCo pretraining (Xie et al., ICCV 2021): the paper's setting and variants.

Paper setting (ImageNet, ResNet-50, batch 256, 200 epochs, 8 accelerators):

  python -m detco_jax.main --config=configs/detco.py --workdir=$WORKDIR

Expected after 200 epochs (paper, Tables 1 and 12): ImageNet linear top-1 68.6,
top-5 88.5; VOC07+12 Faster R-CNN C4 AP 57.8.

Variants, chosen with `--config=configs/detco.py:VARIANT[,VARIANT...]`:

  demo          the built-in offline dataset (`detco_shapes`, 64 px images,
                32 px global views, 10 px patches) with a narrow ResNet-18,
                10 epochs with the kNN monitor after each; 22 minutes alone
                on a 2-core CPU, after which its linear probe beats the
                untrained network's (docs/results.md has the figures).
  tiny          a few-step configuration for tests (32 px, ResNet-10 of
                width 8).
  smoke         the README's one-minute check: `tiny` for 24 steps, with
                checkpoints, the views picture and the kNN monitor.
  ablation      the demo for 3 epochs: the scale of the README's ablation
                table (experiments/ablation.py).
  800ep         the paper's 800-epoch schedule.
  aa            RandAugment on the global views ("DetCo+AA").
  single_level  the paper's ablation "multi-level off": Res5 only.
  global_only   the paper's ablation "global-local off": g<->g only.
  mocov2        the MoCo v2 baseline (Res5, g<->g); see configs/mocov2.py.

The classic pretext tasks, as methods beside DetCo (`method`; same backbone,
data, augmentation, loop and probes; detco_jax/methods/), e.g.
`--config=configs/detco.py:demo,rotation`:

  rotation      predict 0/90/180/270 degrees (Gidaris et al. 2018), every
                angle of each image (`pretext.angles="random"`: one).
  jigsaw_perm   classify which of 100 maximal-Hamming permutations shuffled
                the 3 x 3 tiles (Noroozi & Favaro 2016).
  rel_patch     which of 8 neighbours a second patch is, with a gap and
                jitter between cells (Doersch et al. 2015).
  supervised    not self-supervised: a linear classifier on the pooled
                res5 features, trained on the dataset's label from one
                global view per image; the reference row of a table.

Arguments, typed `name=value` items in the same list (configs/common.py):

  epochs=N      train N epochs (`num_epochs`), e.g.
                `--config=configs/detco.py:demo,epochs=3` is the demo for
                3 epochs.
  seed=N        the run's seed (`seed`), e.g. `ablation,mocov2,seed=1`.
  batch=N       the large-batch recipe at a global batch of N: SGD at
                0.03 x N/256 (the linear scaling rule, as before), a
                5-epoch warm-up when N > 256, shuffle-BN groups of 32
                images (`bn_group_size`), e.g. `batch=1024` for a v4-32
                (launch/README.md).
  knn_epochs=N  run the kNN monitor every N epochs (`knn.every_steps`; 0:
                off), e.g. `demo,epochs=24,knn_epochs=1` logs `knn/top1`
                after every epoch (experiments/learning_curve.py draws it).

The order of the items does not matter (configs/common.py): variants apply
in the order listed above, arguments after them.
Any value can be overridden on the command line, e.g. `--config.batch_size=512`.
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
  """The paper's setting: ImageNet, ResNet-50, batch 256, 200 epochs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # "detco", or a classic pretext task (the variants of the same names).
  c.method = "detco"

  # ---- Data (host side): configs/common.py's block.
  c.data = common.data()

  # ---- Views made on the host (uint8 crops), spec "Views".
  c.views = ml_collections.ConfigDict(dict(
      global_size=224,
      global_area=(0.2, 1.0),
      global_ratio=(3 / 4, 4 / 3),
      local_min_area=0.6,     # Jigsaw crop covers at least this area.
      local_size=255,         # The jigsaw crop is resized to this square.
      grid=3,                 # 3 x 3 cells of local_size // grid px.
      patch_size=64,          # Random crop inside each cell.
      flip_prob=0.5,
      # Antialias the global views' resize, as the reference does (PIL's
      # bilinear shrink under torchvision's RandomResizedCrop); off, as in
      # TF's bilinear default and big_vision, for its measured cost: 40% of
      # the host's one-thread rate (479 -> 285 samples/s per core on the
      # 2-core VM: a DGX H100 at the project's goal would feed its GPUs
      # with 86 of its 112 cores instead of 51), for pixels 1.5 grey levels
      # from PIL's on average (0.16 antialiased); at the demo's scale it
      # moved no probe beyond noise. docs/training.md, "The reference's
      # pixels". The jigsaw patches are sampled bilinearly either way.
      antialias=False,
  ))

  # ---- Evaluation views (probes): resize the shorter side, centre crop.
  c.eval_views = common.eval_views()

  # ---- Photometric augmentation, run on the device inside the jitted step.
  c.aug = ml_collections.ConfigDict(dict(
      jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.4,
      hue=0.1,
      gray_prob=0.2,
      blur_prob=0.5,
      blur_sigma=(0.1, 2.0),     # In pixels at 224 px; scaled with view size.
      blur_kernel_frac=0.1,      # Kernel side as a fraction of the view side.
      randaugment=False,         # "DetCo+AA": RandAugment on global views.
      randaugment_layers=2,
      randaugment_magnitude=9,
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
  ))

  # ---- Model.
  c.model = ml_collections.ConfigDict(dict(
      depth=50,               # 10, 18, 34 or 50.
      width=64,               # Channels of the first stage's 3x3 convs.
      stem="imagenet",        # "imagenet" (7x7/2 + maxpool) or "cifar" (3x3/1).
      embed_dim=128,
      # Hidden width of each global head; the paper gives only Res5 (2048,
      # MoCo v2). Choice recorded here: hidden = channels of that stage.
      global_hidden=ml_collections.ConfigDict(dict(
          res2=256, res3=512, res4=1024, res5=2048)),
      # Hidden width of each jigsaw head (input 9 x C). Moderate on purpose:
      # hidden = 9C at Res5 would be an 18432^2 (340M parameter) layer.
      local_hidden=2048,
      dtype="float32",        # Compute dtype; params stay float32.
      remat=False,            # Rematerialise backbone stages.
  ))

  # ---- Loss. Effective stage weights: `stage_weights` if `multi_level`,
  # else Res5 only. Effective terms: gg, ll, gl if `global_local`, else gg.
  c.loss = ml_collections.ConfigDict(dict(
      temperature=0.2,
      stage_weights=ml_collections.ConfigDict(dict(
          res2=0.1, res3=0.4, res4=0.7, res5=1.0)),
      multi_level=True,
      global_local=True,
      symmetric_gl=False,     # Extra global-query/local-key term (not in paper).
  ))

  # ---- Momentum encoder, queues and batch norm.
  c.queue_size = 65536
  c.ema_momentum = 0.999
  c.ema_cosine = False        # Cosine-schedule the momentum towards 1 (BYOL).
  c.bn = "shuffle"            # "shuffle" (MoCo) or "sync" (global batch).
  c.bn_groups = 8             # BN sub-batches; independent of device count.
  # Images per BN sub-batch instead: > 0 sets bn_groups = batch_size //
  # bn_group_size (the batch must be a multiple), so the groups keep their
  # size when the batch grows (32: MoCo's per-GPU batch; `batch=N` sets
  # it). 0: `bn_groups` as set.
  c.bn_group_size = 0
  # What BN's running averages (and the key encoder's EMA of them) are made
  # of: "views" (the global views alone; patches are normalised with their
  # own batch statistics) or "views_and_patches" (both, as PyTorch ports
  # do, which blends two input sizes into every evaluation-mode statistic).
  c.bn_stats = "views"

  # ---- Optimisation.
  c.batch_size = 256          # Global batch, all processes together.
  c.num_epochs = 200
  c.num_train_examples = 1_281_167
  c.optimizer = "sgd"         # "sgd" or "lars".
  c.base_lr = 0.03            # At batch `lr_base_batch`, scaled linearly.
  c.lr_base_batch = 256
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.warmup_epochs = 0.0

  # ---- Loop, checkpoints, logging.
  c.total_steps = -1          # > 0 overrides num_epochs.
  c.log_every = 50
  c.checkpoint_every = 2500
  c.keep_checkpoints = 3
  c.write_views_image = True
  c.profile_steps = ()        # e.g. (100, 110): profiler window.

  # ---- kNN monitor on the query backbone (detco_jax/eval/knn.py): weighted
  # kNN of res5 features, a train subset against a test subset (test
  # transform, `eval_views`). 0 steps: off.
  c.knn = common.knn(every_steps=0)
  return c


def _demo(c: ml_collections.ConfigDict) -> None:
  """The built-in dataset, narrow ResNet-18, 32 px; 22 min on a 2-core CPU.

  Its choices for a short run (measured in docs/results.md, "Demo
  pretraining"): 10 epochs keep the run under 30 minutes on 2-core VMs up
  to a third slower than the one measured; 32 px views buy the several
  epochs the linear probe needs to see shape, in the time 3 epochs took at
  48 px; a 1024-key queue keeps negatives at most 16 steps stale, so "fresh
  key vs old keys" is a weaker shortcut; BN groups of 32 images (MoCo's
  per-GPU batch) keep the key's batch-statistics noise below the gap
  between images.
  """
  common.builtin_demo(c)
  c.num_train_examples = c.data.builtin_num_train
  c.views.global_size = common.DEMO_CROP_SIZE
  c.views.local_size = 36
  c.views.patch_size = 10
  c.eval_views = common.eval_views(common.DEMO_CROP_SIZE,
                                   common.DEMO_RESIZE_SIZE)
  c.model.depth = 18
  c.model.width = 16
  c.model.stem = "cifar"
  c.model.global_hidden = ml_collections.ConfigDict(dict(
      res2=16, res3=32, res4=64, res5=128))
  c.model.local_hidden = 256
  c.batch_size = 64
  c.queue_size = 1024
  c.bn_groups = 2
  c.base_lr = 0.5
  c.warmup_epochs = 0.25
  # A short run needs a key encoder that moves: 0.999 would keep it within
  # a third of the way from its initialisation after 400 steps.
  c.ema_momentum = 0.99
  c.num_epochs = 10
  c.log_every = 20
  c.checkpoint_every = 200
  # The kNN monitor after every epoch: the run's learning curve in
  # TensorBoard (`knn/top1`) for about a tenth of its time.
  c.knn.train_examples = 5_000
  _knn_epochs(c, 1)


def _tiny(c: ml_collections.ConfigDict) -> None:
  """A smoke configuration for tests: the demo's 32 px views on 32 px images,
  ResNet-10 of width 8, a few steps."""
  _demo(c)
  common.builtin_tiny(c)
  c.num_train_examples = c.data.builtin_num_train
  c.model.depth = 10
  c.model.width = 8
  c.model.global_hidden = ml_collections.ConfigDict(dict(
      res2=8, res3=16, res4=32, res5=64))
  c.model.local_hidden = 32
  c.model.embed_dim = 16
  c.batch_size = 16
  c.queue_size = 64
  c.total_steps = 6
  c.log_every = 2
  c.checkpoint_every = 3
  c.knn.every_steps = 0


def _smoke(c: ml_collections.ConfigDict) -> None:
  """`tiny` for 24 steps with every output a real run has: about a minute.

  Checkpoints at steps 12 and 24, the kNN monitor at both, a log line every
  4 steps and the picture of one sample's views.
  """
  _tiny(c)
  c.total_steps = 24
  c.log_every = 4
  c.checkpoint_every = 12
  c.knn.every_steps = 12
  c.write_views_image = True


def _ablation(c: ml_collections.ConfigDict) -> None:
  """The demo for 3 epochs: the README's ablation scale.

  Eight of these (four methods x two seeds) and their probes take about
  an hour of a 2-core CPU (experiments/ablation.py).
  """
  _demo(c)
  c.num_epochs = 3
  c.knn.every_steps = 0
  c.write_views_image = False


def _800ep(c: ml_collections.ConfigDict) -> None:
  c.num_epochs = 800


def _aa(c: ml_collections.ConfigDict) -> None:
  c.aug.randaugment = True


def _single_level(c: ml_collections.ConfigDict) -> None:
  c.loss.multi_level = False


def _global_only(c: ml_collections.ConfigDict) -> None:
  c.loss.global_local = False


def _mocov2(c: ml_collections.ConfigDict) -> None:
  _single_level(c)
  _global_only(c)


def _pretext(c: ml_collections.ConfigDict, method: str,
             **settings) -> None:
  """Switches to a pretext method with its `pretext` block.

  The heads' widths default (None) to the scale of the res5 global head:
  see each task's module in detco_jax/methods/.
  """
  c.method = method
  c.pretext = ml_collections.ConfigDict(dict(
      tile_hidden=common.placeholder(int), hidden=common.placeholder(int),
      **settings))


def _rotation(c: ml_collections.ConfigDict) -> None:
  _pretext(c, "rotation", angles="all")


def _jigsaw_perm(c: ml_collections.ConfigDict) -> None:
  _pretext(c, "jigsaw_perm", num_permutations=100, permutation_seed=0)


def _rel_patch(c: ml_collections.ConfigDict) -> None:
  # None: the paper's proportions of views.patch_size (rel_patch.geometry).
  _pretext(c, "rel_patch", patch_size=common.placeholder(int),
           gap=common.placeholder(int), jitter=common.placeholder(int))


def _supervised(c: ml_collections.ConfigDict) -> None:
  _pretext(c, "supervised")


VARIANTS = {
    "demo": _demo,
    "tiny": _tiny,
    "smoke": _smoke,
    "ablation": _ablation,
    "800ep": _800ep,
    "aa": _aa,
    "single_level": _single_level,
    "global_only": _global_only,
    "mocov2": _mocov2,
    "rotation": _rotation,
    "jigsaw_perm": _jigsaw_perm,
    "rel_patch": _rel_patch,
    "supervised": _supervised,
}


def _knn_epochs(c: ml_collections.ConfigDict, epochs: int) -> None:
  """`knn_epochs=N`: the kNN monitor after every N epochs (0: off)."""
  # An epoch in steps, as detco_jax.config_lib.steps_per_epoch counts it.
  c.knn.every_steps = epochs * max(c.num_train_examples // c.batch_size, 1)


# The large-batch recipe's (`batch=N`) settings.
LARGE_BATCH_WARMUP_EPOCHS = 5.0
LARGE_BATCH_BN_GROUP_SIZE = 32


def _batch(c: ml_collections.ConfigDict, batch: int) -> None:
  """`batch=N`: a global batch of N images, with the settings it needs.

  The learning rate follows the batch by itself (`base_lr` at
  `lr_base_batch`, scaled linearly: MoCo's rule for SGD, 0.03 x N/256).
  Above `lr_base_batch`, a linear warm-up of 5 epochs, as large-batch SGD
  uses (Goyal et al. 2017). Shuffle-BN groups of 32 images at any N
  (`bn_group_size`), MoCo's per-GPU batch, instead of a fixed 8 groups
  that grow with the batch.

  Args:
    c: the config, changed in place.
    batch: the global batch.
  """
  before = max(c.num_train_examples // c.batch_size, 1)
  c.batch_size = batch
  after = max(c.num_train_examples // batch, 1)
  if c.knn.every_steps > 0:  # A variant set it in epochs (`_knn_epochs`).
    c.knn.every_steps = max(1, round(c.knn.every_steps * after / before))
  c.bn_group_size = LARGE_BATCH_BN_GROUP_SIZE
  if batch > c.lr_base_batch:
    c.warmup_epochs = LARGE_BATCH_WARMUP_EPOCHS


# `batch` before `knn_epochs`: the kNN period in steps follows the batch.
ARGUMENTS = common.run_arguments(
    batch=common.Argument(_batch, 256),
    knn_epochs=common.Argument(_knn_epochs, 0))

get_config = common.make_get_config(base_config, VARIANTS, ARGUMENTS)
