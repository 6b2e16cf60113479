"""What the probe jobs share: their state, fixed feature statistics, batch
checks and the header of their result files.

The linear and dense probes train small heads on a frozen backbone through
the job loop (`detco_jax.loop`); the kNN job trains nothing but reports the
same header.
"""

from typing import Any, Callable, Iterable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.eval import features

Stats = dict[str, dict[str, Any]]


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
