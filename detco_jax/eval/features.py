"""Frozen-backbone features shared by every probe.

The probes see the backbone as the pretraining run left it: evaluation-mode
BN (running statistics), the pretraining run's normalisation, no gradient.
"""

from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from detco_jax import sharding
from detco_jax.data import augment
from detco_jax.pretrained import Backbone

Array = jax.Array


def preprocess(images: Array, norm: Any) -> Array:
  """uint8 [..., H, W, 3] -> float32, normalised as the backbone expects.

  Args:
    images: uint8 (or float in 0..255) RGB images.
    norm: the backbone's `config.aug`: `mean` and `std` (of images in
      0..1), and for a checkpoint file also `pixel_range` (images are
      scaled to 0..pixel_range before mean and std apply; default 1) and
      `channels` ("RGB", or "BGR" to reverse them first).

  Returns:
    Normalised float32 images.
  """
  x = images.astype(jnp.float32)
  pixel_range = norm.get("pixel_range", 1.0)
  x = x / 255.0 if pixel_range == 1.0 else x * (pixel_range / 255.0)
  if norm.get("channels", "RGB") == "BGR":
    x = x[..., ::-1]
  return augment.normalize(x, norm)


def stage_maps(backbone: Backbone, variables: Any, images: Array,
               stages: Sequence[str] | None = None) -> dict[str, Array]:
  """The frozen backbone's stage maps of uint8 images (traceable).

  Args:
    backbone: the backbone (its module and pretraining config are used).
    variables: its variables (passed separately so jit sees arrays).
    images: uint8 [B, H, W, 3].
    stages: which maps to return; default all four.

  Returns:
    `{stage: float32 [B, h, w, C]}`, gradients stopped.
  """
  x = preprocess(images, backbone.config.aug)
  maps = backbone.module.apply(variables, x, train=False)
  stages = tuple(maps) if stages is None else tuple(stages)
  return {s: jax.lax.stop_gradient(maps[s].astype(jnp.float32))
          for s in stages}


def pooled(maps: dict[str, Array]) -> dict[str, Array]:
  """Global average pooling of each stage map: [B, h, w, C] -> [B, C]."""
  return {s: m.mean(axis=(1, 2)) for s, m in maps.items()}


def extract_pooled(backbone: Backbone, batches: Iterable[dict[str, Any]],
                   mesh: Mesh, stages: Sequence[str], max_examples: int
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pooled stage features and labels of up to `max_examples` images.

  Args:
    backbone: the frozen backbone.
    batches: this process's padded test-transform batches ("image",
      "label", "mask").
    mesh: the device mesh.
    stages: which stages' pooled maps.
    max_examples: stop after this many real examples (all processes).

  Returns:
    ({stage: float32 [n, C]}, int32 [n] labels) of the real examples, the
    same on every process.
  """
  stages = tuple(stages)

  @jax.jit
  def embed(variables, images):
    return pooled(stage_maps(backbone, variables, images, stages))

  feats, labels, seen = {s: [] for s in stages}, [], 0
  for batch in batches:
    out = embed(backbone.variables,
                sharding.host_to_global(batch["image"], mesh))
    # All processes need all rows: gather the global arrays to every host.
    out, label, mask = (multihost_utils.process_allgather(x, tiled=True)
                        for x in (out, batch["label"], batch["mask"]))
    keep = np.asarray(mask) > 0
    for s in stages:
      feats[s].append(np.asarray(out[s])[keep])
    labels.append(np.asarray(label)[keep])
    seen += int(keep.sum())
    if seen >= max_examples:
      break
  return ({s: np.concatenate(v)[:max_examples] for s, v in feats.items()},
          np.concatenate(labels)[:max_examples].astype(np.int32))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """Rows of `x` scaled to unit L2 norm (zero rows stay zero)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def batch_moments(x: Array) -> tuple[Array, Array]:
  """Per-channel mean and variance over every axis but the last."""
  axes = tuple(range(x.ndim - 1))
  return x.mean(axes), x.var(axes)


def combine_moments(per_batch: Sequence[tuple[Any, Any]],
                    eps: float = 1e-5) -> dict[str, Any]:
  """Channel statistics of equal-sized batches, for standardisation.

  Args:
    per_batch: (mean [C], variance [C]) of each batch, host arrays.
    eps: added to the variance.

  Returns:
    {"mean": [C], "inv_std": [C]} float32 over all batches together.
  """
  means = np.stack([np.asarray(m) for m, _ in per_batch])
  variances = np.stack([np.asarray(v) for _, v in per_batch])
  # Law of total variance over equal-sized batches.
  var = variances.mean(0) + means.var(0)
  return {"mean": means.mean(0).astype(np.float32),
          "inv_std": (1 / np.sqrt(var + eps)).astype(np.float32)}


def standardize(x: Array, stats: dict[str, Array]) -> Array:
  """(x - mean) * inv_std per channel: a fixed affine map, still linear."""
  return (x - stats["mean"]) * stats["inv_std"]
