"""The pretrained backbone, read back from a pretraining workdir.

Probes (`detco_jax.eval`) and the export (`detco_jax.export`) start from the
query encoder's ResNet: its parameters and BN running statistics as the
pretraining job saved them. The workdir's `config.json` (written by the
pretraining job at step 0) says which ResNet that is, so a probe needs only
the workdir. `load` reads only the ResNet's variables from a checkpoint (an
orbax partial restore), never the rest of the train state. `random_init`
gives the same network untrained: the floor a probe must beat.
"""

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import Mesh

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import config_lib
from detco_jax import sharding
from detco_jax.models import resnet

# Where the ResNet sits inside the DetCo encoder's parameter tree.
BACKBONE_KEY = "backbone"


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A ResNet and its variables, to be applied in evaluation mode.

  Attributes:
    module: the ResNet (training-time BN grouping is irrelevant here).
    variables: `{"params": ..., "batch_stats": ...}` of the ResNet alone.
    config: the pretraining config (model, views, normalisation).
    step: the checkpoint's step; 0 for a random initialisation.
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


def for_probe(config: ml_collections.ConfigDict,
              mesh: Mesh | None = None) -> Backbone:
  """The backbone a probe config names: restored, or untrained (floor).

  Args:
    config: a probe config (`pretrained`, `pretrained_step`,
      `random_init`, `seed`).
    mesh: the mesh for the replicated variables; default all devices.

  Returns:
    The backbone.

  Raises:
    ValueError: when `config.pretrained` is unset.
  """
  if not config.pretrained:
    raise ValueError(
        "Set --config.pretrained=PRETRAIN_WORKDIR: the probe takes the "
        "backbone (and, with --config.random_init=True, just its "
        "architecture) from a pretraining run's workdir.")
  if config.random_init:
    return random_init(load_config(config.pretrained), config.seed, mesh)
  return load(config.pretrained, config.pretrained_step, mesh)
