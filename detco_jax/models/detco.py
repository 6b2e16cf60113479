"""The DetCo encoder: one backbone, per-stage global and jigsaw heads.

The same module is the query encoder (trained) and the key encoder (its
parameters an EMA of the query's). It embeds a batch of whole views and a
batch of 9-patch sets; the patches go through the same backbone one by one.
`__call__` is `stage_maps` (the backbone) then `heads`; each is a method of
its own so that either can be applied alone (the benchmark times the heads
on given stage maps).
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detco_jax.models import heads as heads_lib
from detco_jax.models import resnet

Embeddings = dict[str, dict[str, jax.Array]]
StageMaps = dict[str, jax.Array]


class DetCoEncoder(nn.Module):
  """Backbone plus global and local heads on the chosen stages.

  Attributes:
    depth, width, stem, dtype, remat: the ResNet's (see `resnet.ResNet`).
    bn_groups: sub-batches for batch-norm statistics (1: sync BN).
    stages: stages that get heads, e.g. ("res5",) for MoCo v2.
    global_hidden: hidden width of each stage's global head.
    local_hidden: hidden width of every jigsaw head.
    embed_dim: embedding size.
    use_local: build jigsaw heads and embed patch sets.
    patch_bn_stats: fold the patches' BN statistics into the running
      averages too. False (the default) accumulates those of the global
      views alone: evaluation (probes, export, detection) sees whole
      images, and patches 3x smaller than the views would otherwise make
      up about half of every running statistic. Patches are normalised
      with their own batch statistics either way.
  """
  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  bn_groups: int = 1
  stages: Sequence[str] = resnet.STAGES
  global_hidden: Mapping[str, int] | None = None
  local_hidden: int = 2048
  embed_dim: int = 128
  use_local: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  patch_bn_stats: bool = False

  def setup(self):
    self.backbone = resnet.ResNet(self.depth, self.width, self.stem,
                                  self.bn_groups, self.dtype, self.remat)
    hidden = self.global_hidden or resnet.stage_channels(self.depth,
                                                         self.width)
    self.global_heads = {
        s: heads_lib.GlobalHead(hidden[s], self.embed_dim, self.dtype)
        for s in self.stages}
    if self.use_local:
      self.local_heads = {
          s: heads_lib.JigsawHead(self.local_hidden, self.embed_dim,
                                  self.dtype)
          for s in self.stages}

  def __call__(self, views: jax.Array, patches: jax.Array | None,
               train: bool) -> Embeddings:
    """Embeds global views and (optionally) jigsaw patch sets.

    Args:
      views: [B, H, W, 3] normalised global views.
      patches: [B, 9, h, w, 3] normalised patch sets, or None.
      train: batch statistics in BN (and running-average updates).

    Returns:
      `{"global": {stage: [B, D]}, "local": {stage: [B, D]}}` of unit
      vectors (float32); "local" is empty without patches.
    """
    return self.heads(*self.stage_maps(views, patches, train))

  def stage_maps(self, views: jax.Array, patches: jax.Array | None,
                 train: bool) -> tuple[StageMaps, StageMaps | None]:
    """The backbone's stage maps of the views and of every patch.

    Args:
      views: [B, H, W, 3] normalised global views.
      patches: [B, 9, h, w, 3] normalised patch sets, or None.
      train: batch statistics in BN (and running-average updates).

    Returns:
      (maps, patch_maps): `{stage: [B, h_s, w_s, C_s]}` of the views and
      `{stage: [B * 9, ...]}` of the patches, one by one in set order
      (None without patches).
    """
    maps = self.backbone(views, train)
    if patches is None:
      return maps, None
    b, p = patches.shape[:2]
    return maps, self.backbone(
        patches.reshape((b * p,) + patches.shape[2:]), train,
        accumulate_stats=self.patch_bn_stats)

  def heads(self, maps: StageMaps,
            patch_maps: StageMaps | None) -> Embeddings:
    """Embeds stage maps: a global head per stage, a jigsaw head per stage.

    Args:
      maps: `{stage: [B, h_s, w_s, C_s]}` of the global views.
      patch_maps: `{stage: [B * 9, ...]}` of the patch sets, or None.

    Returns:
      As `__call__`.
    """
    out = {"global": {s: self.global_heads[s](maps[s]) for s in self.stages},
           "local": {}}
    if patch_maps is not None:
      if not self.use_local:
        raise ValueError("Patches given to an encoder built without jigsaw "
                         "heads (use_local=False).")
      out["local"] = {s: self.local_heads[s](patch_maps[s])
                      for s in self.stages}
    return out

  def features(self, views: jax.Array) -> StageMaps:
    """The backbone's stage maps in evaluation mode (for probes)."""
    return self.backbone(views, train=False)
