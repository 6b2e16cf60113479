"""Luma and grayscale of RGB images, for the photometric ops and RandAugment.

`augment` (colour jitter, grayscale) and `randaugment` (its color and contrast
ops) both blend towards these; one definition keeps the two bit-identical to
each other and to PIL's "L" conversion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# ITU-R 601-2 luma (PIL's "L" conversion).
_LUMA = (0.299, 0.587, 0.114)


def luma(image: Array) -> Array:
  """Grayscale intensity `[..., H, W]` of an RGB image `[..., H, W, 3]`."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def mean_luma(image: Array) -> Array:
  """Mean grayscale intensity over all pixels of `[..., 3]`, a scalar.

  Computed as the luma of the mean colour (the same number, as luma is
  linear): a per-channel reduction compiles to faster code than reducing the
  grayscale image, notably on XLA:CPU.
  """
  return luma(jnp.mean(image.reshape(-1, 3), axis=0))


def to_grayscale(image: Array) -> Array:
  """Converts RGB to grayscale, replicated over the 3 channels.

  Args:
    image: float array `[..., H, W, 3]`.

  Returns:
    An array of the same shape whose three channels all equal
    `0.299 R + 0.587 G + 0.114 B` (ITU-R 601-2 luma).
  """
  gray = luma(image)[..., None]
  return jnp.broadcast_to(gray, image.shape)
