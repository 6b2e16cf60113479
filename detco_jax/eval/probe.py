"""What the probe jobs share: their backbone (the floor's BN statistics
measured on data), their state, fixed feature statistics, batch checks and
the header of their result files.

The linear and dense probes train small heads on a frozen backbone through
the job loop (`detco_jax.loop`); the kNN job trains nothing but reports the
same header.
"""

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.eval import features

Stats = dict[str, dict[str, Any]]


def calibrate_bn(backbone: pretrained.Backbone, mesh: Mesh,
                 images: Iterable[np.ndarray],
                 num_batches: int) -> pretrained.Backbone:
  """The backbone with BN running statistics measured on `images`.

  An untrained ResNet's running statistics are their init (mean 0, var 1),
  so in evaluation mode it is a network without normalisation, whose
  features grow from stage to stage: a floor no pretrained network faces.
  Here every BN layer's running mean and variance become the average over
  `num_batches` batches of its training-mode batch statistics (what a long
  run's running averages estimate, as PreciseBN measures them).

  Args:
    backbone: the backbone (its parameters are kept).
    mesh: the device mesh.
    images: this process's uint8 image batches.
    num_batches: how many batches at most (fewer if `images` ends first).

  Returns:
    The backbone with the measured statistics.

  Raises:
    ValueError: when `images` is empty.
  """
  # Momentum 0: a training-mode pass leaves exactly the batch's statistics.
  module = backbone.module.clone(bn_momentum=0.0)

  def batch_stats(variables, batch):
    x = features.preprocess(batch, backbone.config.aug)
    _, updated = module.apply(variables, x, train=True,
                              mutable=["batch_stats"])
    return updated["batch_stats"]

  rep = sharding.replicated(mesh)
  batch_stats = jax.jit(batch_stats,
                        in_shardings=(rep, sharding.batch_sharded(mesh)),
                        out_shardings=rep)
  total, n = None, 0
  for batch in itertools.islice(images, max(1, int(num_batches))):
    stats = batch_stats(backbone.variables,
                        sharding.host_to_global(batch, mesh))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    n += 1
  if total is None:
    raise ValueError("No images to measure BN statistics on: the training "
                     "split has fewer examples than one batch.")
  variables = dict(backbone.variables,
                   batch_stats=jax.tree.map(lambda x: x / n, total))
  return dataclasses.replace(
      backbone, variables=variables,
      source=f"{backbone.source}, BN statistics of {n} batches")


def train_images(config: ml_collections.ConfigDict) -> Iterator[np.ndarray]:
  """Test-transform uint8 image batches of the train split from its start,
  the same on every call: what the probes' statistics are measured on.

  Args:
    config: a probe config (`data`, `eval_views`, `batch_size`).

  Returns:
    This process's parts of the split's full global batches of
    `config.batch_size` (the padded last one is left out: its padding is
    not data).
  """
  batches = pipeline.make_eval_iterator(config, config.data.train_split,
                                        train=False,
                                        batch_size=config.batch_size)
  full = sources.num_examples(config.data, config.data.train_split)
  return (b["image"] for b in itertools.islice(
      batches, full // config.batch_size))


def backbone_for(config: ml_collections.ConfigDict, mesh: Mesh,
                 images: Callable[[], Iterable[np.ndarray]]
                 ) -> pretrained.Backbone:
  """The backbone a probe config names, BN measured on data where asked.

  BN running statistics are measured for a random-init floor with
  `random_init_bn_batches > 0`, and for a checkpoint file with
  `pretrained_file.bn_batches > 0` (a file without them needs it).

  Args:
    config: a probe config (`pretrained`, `pretrained_step`,
      `pretrained_file`, `random_init`, `random_init_bn_batches`, `seed`).
    mesh: the device mesh.
    images: `images() -> uint8 batches` of the probe's training data, read
      only to measure BN statistics. They must be the same on every call (a
      resumed probe measures again).

  Returns:
    The backbone.
  """
  backbone = pretrained.for_probe(config, mesh)
  if config.random_init:
    batches = config.random_init_bn_batches
  elif pretrained.is_file(config.pretrained):
    batches = pretrained.file_settings(config.get("pretrained_file")).bn_batches
  else:
    batches = 0
  if batches > 0:
    backbone = calibrate_bn(backbone, mesh, images(), batches)
  return backbone


@flax.struct.dataclass
class ProbeState:
  """A probe's state; the frozen backbone is not part of it.

  Attributes:
    step: optimiser steps taken.
    params: the heads, `{stage: {...}}`.
    opt_state: their optimiser's state.
    stats: fixed per-stage feature statistics, `{stage: {"mean",
      "inv_std"}}` (mean 0 and inv_std 1 when not standardising).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  stats: Stats


def create_state(init_params: Callable[[jax.Array], Any], tx: Any,
                 stats: Stats, mesh: Mesh, seed: int) -> ProbeState:
  """A fresh probe state at step 0, replicated over the mesh.

  Args:
    init_params: `init_params(rng) -> heads' params` (traceable).
    tx: the heads' optimiser.
    stats: the feature statistics (host or device arrays).
    mesh: the device mesh.
    seed: the heads' initialisation seed.

  Returns:
    The state.
  """
  def init(rng, stats):
    params = init_params(rng)
    return ProbeState(jnp.zeros((), jnp.int32), params, tx.init(params),
                      stats)
  return jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.key(seed), stats)


def identity_stats(channels: dict[str, int], stages: Sequence[str]) -> Stats:
  """Statistics that leave features as they are (also a restore target)."""
  return {s: {"mean": np.zeros(channels[s], np.float32),
              "inv_std": np.ones(channels[s], np.float32)} for s in stages}


def measure_stats(backbone: pretrained.Backbone, mesh: Mesh,
                  images: Iterable[np.ndarray], stages: Sequence[str],
                  num_batches: int, pool: bool, eps: float = 1e-5) -> Stats:
  """Per-channel mean and inverse std of stage features over a few batches.

  A fixed affine map measured once, so a probe stays linear: narrow or
  untrained backbones have features large enough to make a protocol's
  learning rate diverge.

  Args:
    backbone: the frozen backbone.
    mesh: the device mesh.
    images: this process's uint8 image batches.
    stages: which stages.
    num_batches: how many batches (at least 1).
    pool: statistics of globally pooled features (True) or of every pixel
      of the maps (False).
    eps: added to the variance.

  Returns:
    `{stage: {"mean": [C], "inv_std": [C]}}`, host float32 arrays.
  """
  stages = tuple(stages)

  def moments(variables, batch):
    maps = features.stage_maps(backbone, variables, batch, stages)
    if pool:
      maps = features.pooled(maps)
    return {s: features.batch_moments(m) for s, m in maps.items()}

  rep = sharding.replicated(mesh)
  moments = jax.jit(moments, in_shardings=(rep, sharding.batch_sharded(mesh)),
                    out_shardings=rep)
  images = iter(images)
  per_batch = jax.device_get([
      moments(backbone.variables, sharding.host_to_global(next(images), mesh))
      for _ in range(max(1, int(num_batches)))])
  return {s: features.combine_moments([b[s] for b in per_batch], eps)
          for s in stages}


def check_batch_sizes(config: ml_collections.ConfigDict,
                      keys: Sequence[str] = ("batch_size",)) -> None:
  """Rejects batch sizes that the devices cannot split evenly.

  Args:
    config: the probe config.
    keys: the config's batch-size settings.

  Raises:
    ValueError: naming the setting and a value that would work.
  """
  n = jax.device_count()
  for key in keys:
    b = config[key]
    if b <= 0 or b % n:
      raise ValueError(
          f"Bad config: {key}={b} must be a positive multiple of the {n} "
          f"devices; e.g. --config.{key}={max(n, -(-b // n) * n)}.")


def results_header(config: ml_collections.ConfigDict,
                   backbone: pretrained.Backbone) -> dict[str, Any]:
  """What every probe's result file starts with: the backbone and data."""
  return {"pretrained": config.pretrained,
          "pretrained_step": backbone.step,
          "random_init": bool(config.random_init),
          "backbone": backbone.source,
          "dataset": config.data.dataset,
          "eval_split": config.data.eval_split}
