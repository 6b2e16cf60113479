"""Contrastive projection heads: one global and one jigsaw head per stage.

Both are MoCo v2's MLP (Dense -> ReLU -> Dense -> L2-normalise) on pooled
features. The global head pools one view's map; the jigsaw (local) head pools
each of the 9 patches' maps separately and concatenates the 9 vectors in
patch order before the MLP, so it sees the patch arrangement (PIRL, DetCo).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_PATCHES = 9


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Scales the last axis to unit L2 norm, in float32.

  Args:
    x: [..., D] vectors.
    eps: guards the division for all-zero vectors.

  Returns:
    float32 unit vectors of the same shape.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True),
                                       eps * eps))


class MLPHead(nn.Module):
  """Dense(hidden) -> ReLU -> Dense(out) -> L2-normalise.

  Attributes:
    hidden: hidden width.
    out: embedding size (128 in MoCo v2 and DetCo).
    dtype: compute dtype of the Dense layers; the output is float32.
  """
  hidden: int
  out: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Projects [N, F] features to [N, out] unit vectors."""
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.Dense(self.out, dtype=self.dtype, name="fc2")(nn.relu(x))
    return l2_normalize(x)


class GlobalHead(nn.Module):
  """Global average pool of one view's stage map, then the MLP."""
  hidden: int
  out: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, fmap: jax.Array) -> jax.Array:
    """Embeds [B, h, w, C] maps as [B, out] unit vectors."""
    pooled = fmap.astype(jnp.float32).mean(axis=(1, 2))
    return MLPHead(self.hidden, self.out, self.dtype, name="mlp")(pooled)


class JigsawHead(nn.Module):
  """Pools each patch's map, concatenates the 9 vectors in order, then MLP."""
  hidden: int
  out: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, fmap: jax.Array) -> jax.Array:
    """Embeds patch maps [B * 9, h, w, C] (sample-major) as [B, out]."""
    n, c = fmap.shape[0], fmap.shape[-1]
    if n % NUM_PATCHES:
      raise ValueError(f"Jigsaw head needs a multiple of {NUM_PATCHES} "
                       f"patch maps, got {n}.")
    pooled = fmap.astype(jnp.float32).mean(axis=(1, 2))
    concat = pooled.reshape(n // NUM_PATCHES, NUM_PATCHES * c)
    return MLPHead(self.hidden, self.out, self.dtype, name="mlp")(concat)
