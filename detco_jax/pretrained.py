"""The pretrained backbone: from a pretraining workdir or a checkpoint file.

Probes (`detco_jax.eval`), the detection transfer and the export
(`detco_jax.export`) start from a ResNet with its parameters and BN running
statistics. It comes from one of three sources:

* a pretraining run's workdir (`load`): the query encoder's ResNet as the
  pretraining job saved it. The workdir's `config.json` (written at step 0)
  says which ResNet that is and how its input is normalised. Only the
  ResNet's variables are read from the checkpoint (an orbax partial
  restore), never the rest of the train state;
* a checkpoint file (`load_file`): a torchvision state dict, a MoCo / DetCo
  training checkpoint or a detectron2 `.pkl`, read without running code
  from it (`interop.backbone_file`). The tensors say which ResNet it is;
  the input normalisation is a setting (`file_settings`: torchvision's by
  default);
* `random_init`: the same network untrained, the floor a probe must beat.

`for_probe` picks the source that a job's `--config.pretrained` names.
"""

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import config_checks
from detco_jax import config_lib
from detco_jax import sharding
from detco_jax.interop import backbone_file
from detco_jax.models import resnet

# Where the ResNet sits inside the DetCo encoder's parameter tree.
BACKBONE_KEY = "backbone"

# A checkpoint file's settings (the probe configs' `pretrained_file`):
#   depth, width, stem: the architecture; None: inferred from the tensors
#     (set, the file must fit it);
#   mean, std, pixel_range, channels: the input the network expects:
#     images scaled to 0..pixel_range, channels in this order ("RGB" or
#     "BGR"), then (x - mean) / std per channel. torchvision's convention,
#     which MoCo's and DetCo's releases follow;
#   bn_batches: 0 takes the BN running statistics from the file (a file
#     without them is refused); N > 0 measures them on N batches of a
#     probe's training images instead.
FILE_DEFAULTS = {
    "depth": None, "width": None, "stem": None,
    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    "pixel_range": 1.0, "channels": "RGB",
    "bn_batches": 0,
}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A ResNet and its variables, to be applied in evaluation mode.

  Attributes:
    module: the ResNet (training-time BN grouping is irrelevant here).
    variables: `{"params": ..., "batch_stats": ...}` of the ResNet alone.
    config: the pretraining config (model, views, normalisation); for a
      checkpoint file, one made of its settings (`file_config`).
    step: the checkpoint's step; 0 for a random initialisation or a file.
    source: where it came from, for logs and result files.
  """
  module: resnet.ResNet
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  step: int
  source: str

  @property
  def channels(self) -> dict[str, int]:
    """Channels of each stage's map, e.g. {"res2": 256, ..., "res5": 2048}."""
    return resnet.stage_channels(self.module.depth, self.module.width)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a pretraining run recorded in `<workdir>/config.json`.

  Args:
    workdir: the pretraining run's directory (local or gs://).

  Returns:
    The config.

  Raises:
    FileNotFoundError: when the workdir holds no config.json.
  """
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: --config.pretrained must be the --workdir of a "
        "pretraining run (python -m detco_jax.main ...), which writes "
        "config.json and checkpoints/ there.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def resnet_of(config: ml_collections.ConfigDict) -> resnet.ResNet:
  """The evaluation-mode ResNet that `config.model` describes."""
  m = config.model
  return resnet.ResNet(depth=m.depth, width=m.width, stem=m.stem,
                       dtype=config_lib.DTYPES[m.dtype])


def _init_fn(module: resnet.ResNet, config: ml_collections.ConfigDict):
  """`rng -> variables` of `module` for the config's global view size."""
  size = config.views.global_size
  return lambda rng: module.init(rng, jnp.zeros((1, size, size, 3)),
                                 train=False)


def from_encoder(config: ml_collections.ConfigDict, params: Any,
                 batch_stats: Any, step: int = 0,
                 source: str = "in-memory") -> Backbone:
  """The backbone part of a DetCo encoder's variables (no copy).

  Args:
    config: the pretraining config.
    params: the encoder's params (a train state's `params`).
    batch_stats: the encoder's BN statistics.
    step: the training step they belong to.
    source: a description for logs.

  Returns:
    The backbone.
  """
  variables = {"params": params[BACKBONE_KEY],
               "batch_stats": batch_stats[BACKBONE_KEY]}
  return Backbone(resnet_of(config), variables, config, step, source)


def load(workdir: str, step: int | None = None,
         mesh: Mesh | None = None) -> Backbone:
  """Restores the query backbone of a pretraining checkpoint.

  Args:
    workdir: the pretraining run's directory.
    step: which checkpoint; None for the latest complete one.
    mesh: the mesh to place the (replicated) variables on; default all
      devices.

  Returns:
    The backbone at that step.

  Raises:
    FileNotFoundError: with no config.json or no such complete checkpoint.
    ValueError: when the checkpoint holds no backbone (not a pretraining
      run's, e.g. a probe's).
  """
  config = load_config(workdir)
  mesh = sharding.make_mesh() if mesh is None else mesh
  module = resnet_of(config)
  # Replicated, as the probes and the export read the whole ResNet.
  replicated = sharding.replicated(mesh)
  variables = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(_init_fn(module, config), jax.random.key(0)))
  # Where the train state keeps the query backbone, and its step (an int32
  # scalar): the only parts read.
  target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
            "params": {BACKBONE_KEY: variables["params"]},
            "batch_stats": {BACKBONE_KEY: variables["batch_stats"]}}
  ckpt = checkpoint_lib.Checkpointer(workdir, asynchronous=False)
  try:
    restored = ckpt.restore_subtrees(target, step)
  except checkpoint_lib.MissingSubtreesError as e:
    raise ValueError(
        f"{workdir} holds no pretrained backbone: {e} Is it a probe's "
        "workdir? Pass (as --config.pretrained, or the export's --workdir) "
        "the --workdir of a pretraining run (python -m detco_jax.main "
        "--config=configs/detco.py ...), which saves the whole DetCo state "
        "with the query ResNet under params/backbone.") from e
  finally:
    ckpt.close()
  restored_step = int(restored["step"])
  return from_encoder(config, restored["params"], restored["batch_stats"],
                      restored_step, f"{workdir} step {restored_step}")


def random_init(config: ml_collections.ConfigDict, seed: int = 0,
                mesh: Mesh | None = None) -> Backbone:
  """The backbone of `config` at its random initialisation (the floor).

  Args:
    config: a pretraining config (its `model` and `views` are used).
    seed: initialisation seed.
    mesh: the mesh to place the variables on (replicated).

  Returns:
    The untrained backbone (BN running statistics at their init: 0 and 1).
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  module = resnet_of(config)
  variables = jax.jit(_init_fn(module, config),
                      out_shardings=sharding.replicated(mesh))(
                          jax.random.key(seed))
  return Backbone(module, dict(variables), config, 0, f"random init {seed}")


def is_file(path: str) -> bool:
  """Whether `path` is a checkpoint file rather than a workdir."""
  return epath.Path(path).is_file()


def file_settings(settings: Mapping[str, Any] | None = None
                  ) -> ml_collections.ConfigDict:
  """`FILE_DEFAULTS` with `settings` over them, checked.

  Args:
    settings: e.g. a probe config's `pretrained_file`; None for the
      defaults.

  Returns:
    The settings.

  Raises:
    ValueError: for an unknown setting or a bad value.
  """
  out = ml_collections.ConfigDict(FILE_DEFAULTS)
  for key, value in (settings or {}).items():
    if key not in out:
      raise ValueError(f"Bad config: pretrained_file.{key} is no setting; "
                       f"they are {sorted(FILE_DEFAULTS)}.")
    out[key] = value
  if out.channels not in ("RGB", "BGR"):
    raise ValueError("Bad config: pretrained_file.channels must be 'RGB' or "
                     f"'BGR', got {out.channels!r}.")
  if not out.pixel_range > 0:
    raise ValueError("Bad config: pretrained_file.pixel_range must be "
                     f"positive (1 or 255), got {out.pixel_range}.")
  for key in ("mean", "std"):
    if len(out[key]) != 3:
      raise ValueError(f"Bad config: pretrained_file.{key} needs 3 values "
                       f"(one per channel), got {out[key]}.")
  return out


def file_config(arch: backbone_file.Arch,
                settings: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """The config a file backbone carries: its model and input normalisation.

  Args:
    arch: the file's architecture.
    settings: from `file_settings`.

  Returns:
    A config with `model` (as a pretraining config's), `aug` (mean, std,
    pixel_range, channels: what `eval.features.preprocess` reads) and
    `views.global_size` (224 for the ImageNet stem, 32 for CIFAR's: the
    size `random_init` traces at).
  """
  return ml_collections.ConfigDict(dict(
      model=dict(depth=arch.depth, width=arch.width, stem=arch.stem,
                 dtype="float32"),
      aug=dict(mean=tuple(settings.mean), std=tuple(settings.std),
               pixel_range=float(settings.pixel_range),
               channels=settings.channels),
      views=dict(global_size=224 if arch.stem == "imagenet" else 32)))


def load_file(path: str, settings: Mapping[str, Any] | None = None,
              mesh: Mesh | None = None) -> Backbone:
  """The ResNet backbone of a torch or detectron2 checkpoint file.

  Args:
    path: the file (see `interop.backbone_file` for what is taken from it).
    settings: overrides of `FILE_DEFAULTS` (a probe config's
      `pretrained_file`).
    mesh: the mesh to place the (replicated) variables on; default all
      devices.

  Returns:
    The backbone (step 0). Its BN statistics are at their init when the
    file has none and `bn_batches > 0` (the caller measures them).

  Raises:
    FileNotFoundError: when there is no such file.
    ValueError: for a file that is not such a checkpoint, or does not fit
      the architecture the settings name (the message names the key).
  """
  settings = file_settings(settings)
  imported = backbone_file.read(path, settings,
                                require_bn_stats=settings.bn_batches <= 0)
  logging.info("Backbone from %s", imported.summary)
  config = file_config(imported.arch, settings)
  mesh = sharding.make_mesh() if mesh is None else mesh
  replicated = sharding.replicated(mesh)
  variables = jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(replicated, x),
      imported.variables)
  return Backbone(resnet_of(config), variables, config, 0,
                  f"{path} ({imported.arch})")


def load_source(path: str, step: int | None = None,
                settings: Mapping[str, Any] | None = None,
                mesh: Mesh | None = None) -> Backbone:
  """The backbone of a pretraining workdir (`load`) or a file (`load_file`).

  Args:
    path: a pretraining run's workdir, or a checkpoint file.
    step: a workdir's checkpoint; None for the latest. Must be None for a
      file.
    settings: a file's settings (`file_settings`); ignored for a workdir,
      whose config.json records its own.
    mesh: the mesh for the replicated variables; default all devices.

  Returns:
    The backbone.

  Raises:
    FileNotFoundError: when `path` is neither, or a workdir without a
      checkpoint (`step`'s).
    ValueError: for a step with a file, or a source without a backbone.
  """
  # The command line ran the same checks before JAX loaded.
  config_checks.check_source(path, step)
  if is_file(path):
    return load_file(path, settings, mesh)
  return load(path, step, mesh)


def for_probe(config: ml_collections.ConfigDict,
              mesh: Mesh | None = None) -> Backbone:
  """The backbone a probe config names: restored, or untrained (floor).

  Args:
    config: a probe config (`pretrained`: a pretraining workdir or a
      checkpoint file; `pretrained_step`, `pretrained_file`, `random_init`,
      `seed`).
    mesh: the mesh for the replicated variables; default all devices.

  Returns:
    The backbone.

  Raises:
    ValueError: when `config.pretrained` is unset, or a step is named for
      a file.
  """
  if not config.pretrained:
    raise ValueError(config_checks.PRETRAINED_UNSET)
  settings = file_settings(config.get("pretrained_file"))
  if not config.random_init:
    return load_source(config.pretrained, config.pretrained_step, settings,
                       mesh)
  if not is_file(config.pretrained):
    return random_init(load_config(config.pretrained), config.seed, mesh)
  # Only the architecture is taken from the file.
  imported = backbone_file.read(config.pretrained, settings,
                                require_bn_stats=False)
  return random_init(file_config(imported.arch, settings), config.seed, mesh)
