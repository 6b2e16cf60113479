r"""Linear probe of a pretrained backbone (MoCo protocol), one head per stage.

The paper's setting (ImageNet, 100 epochs, batch 256, SGD lr 30, x0.1 at
epochs 60 and 80; RandomResizedCrop + flip for training, resize 256 + centre
crop 224 for test):

  python -m detco_jax.eval.linear --config=configs/linear_probe.py \
      --config.pretrained=$PRETRAIN_WORKDIR --workdir=$PROBE_WORKDIR

Expected for DetCo ResNet-50, 200 epochs (paper, Table 12 / Table 1): Res5
top-1 68.6, top-5 88.5. The frozen backbone is the query encoder of the
latest checkpoint (`--config.pretrained_step` picks another); its
architecture and input normalisation come from the pretraining run's
config.json. `--config.pretrained` may also be a checkpoint file (a
torchvision / MoCo / DetCo .pth(.tar), a detectron2 .pkl): its tensors give
the architecture, `pretrained_file` the input normalisation (torchvision's
by default); docs/checkpoints.md. `--config.random_init=True` probes the
same architecture untrained: the floor.

Variants (`--config=configs/linear_probe.py:VARIANT`):

  demo   the built-in dataset after the README's demo pretraining
         (`configs/detco.py:demo`): 32 px crops, 10 epochs, standardised
         features with lr 0.5, a few minutes on a 2-core CPU.
  tiny   a few steps at 32 px for tests.

Arguments (`name=value`, in any order with the variants; configs/common.py):

  epochs=N  train N epochs with the decay milestones at the same fractions
            of the schedule (60% and 80%), e.g.
            `--config=configs/linear_probe.py:demo,epochs=20`.
  seed=N    the probe's seed (data order, crops, head initialisation).
"""

import ml_collections

from configs import common


def base_config() -> ml_collections.ConfigDict:
  """The MoCo linear-probe protocol on ImageNet."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  common.add_backbone_source(c)
  c.data = common.data()
  # Training crops: RandomResizedCrop(crop_size, area (0.08, 1)) + flip.
  c.views = ml_collections.ConfigDict(dict(flip_prob=0.5))
  # Test: resize the shorter side to resize_size, centre crop crop_size.
  c.eval_views = common.eval_views()

  # One linear classifier per stage on global-average-pooled features.
  c.stages = common.STAGES
  c.batch_size = 256           # Global, all processes together.
  c.num_epochs = 100
  c.num_train_examples = -1    # -1: the train split's size.
  c.lr = 30.0                  # Not scaled with the batch (MoCo).
  # "none": raw pooled features (MoCo). "standardize": per-channel mean and
  # std from `stats_batches` train batches, fixed before training; needed
  # where pooled features are large (narrow or untrained backbones), where
  # lr 30 on raw features diverges.
  c.feature_norm = "none"
  c.stats_batches = 8
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.lr_decay_epochs = (60, 80)
  c.lr_decay_factor = 0.1

  c.log_every = 100
  c.checkpoint_every = 1000
  c.eval_every = 0             # Steps between test passes; 0: at the end.
  c.keep_checkpoints = 2

  # The kNN monitor (`python -m detco_jax.eval.knn`) reads the same config.
  c.knn = common.knn()
  return c


def _demo(c: ml_collections.ConfigDict) -> None:
  """The built-in dataset at the demo pretraining's sizes."""
  common.builtin_demo(c)
  c.eval_views = common.eval_views(common.DEMO_CROP_SIZE,
                                   common.DEMO_RESIZE_SIZE)
  c.num_epochs = 10
  c.lr_decay_epochs = (6, 8)
  # The demo's narrow ResNet has large pooled features: lr 30 on them
  # diverges (a loss in the thousands), so standardise them first.
  c.feature_norm = "standardize"
  c.lr = 0.5
  c.log_every = 20
  c.checkpoint_every = 200


def _tiny(c: ml_collections.ConfigDict) -> None:
  """A few steps on the tiny built-in dataset (tests)."""
  _demo(c)
  common.builtin_tiny(c)
  c.batch_size = 32
  c.num_epochs = 1
  c.lr_decay_epochs = (0.5, 0.75)
  c.log_every = 2
  c.checkpoint_every = 4


VARIANTS = {"demo": _demo, "tiny": _tiny}


def _epochs(c: ml_collections.ConfigDict, epochs: int) -> None:
  """`epochs=N`: N epochs, the step decays at the same fractions of them."""
  scale = epochs / c.num_epochs
  c.lr_decay_epochs = tuple(e * scale for e in c.lr_decay_epochs)
  c.num_epochs = epochs


ARGUMENTS = common.run_arguments(
    epochs=common.Argument(_epochs, default=100))

get_config = common.make_get_config(base_config, VARIANTS, ARGUMENTS)
