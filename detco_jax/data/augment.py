"""Device-side photometric augmentation: MoCo v2 colour ops, blur, the views.

Everything here is a pure JAX function of `(images, rng) -> images`, meant to
run inside the jitted train step, on the accelerator. The host
delivers uint8 views whose geometry (crops, flips, jigsaw) is already done;
this module applies, in MoCo v2's order,

  1. colour jitter (brightness, contrast, saturation, hue in a random order),
     with probability `aug.jitter_prob`;
  2. grayscale with probability `aug.gray_prob`;
  3. Gaussian blur with probability `aug.blur_prob`;
  4. normalisation `(x - mean) / std`;

and optionally RandAugment (`randaugment`) on the global views first
("DetCo+AA"). `augment_views` runs all of it on a DetCo batch.

Conventions:
  * Images are float32 in [0, 1] with a trailing RGB axis: `[..., H, W, 3]`.
  * An "image group" is an array `[S, H, W, 3]` whose S images share every
    random parameter: S = 1 for a global view, S = 9 for a jigsaw patch set
    (the paper jitters and blurs the whole local crop before cutting it).
  * Random decisions are made by selecting parameters or images with
    `jnp.where`, never by `lax.cond`: under `vmap` a `cond` is lowered to a
    select of both branches anyway, and selecting a parameter (a factor of 1,
    a delta kernel) is cheaper than computing and selecting an image.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from detco_jax.data import colorspace
from detco_jax.data import randaugment

Array = jax.Array
Config = Any  # An `ml_collections.ConfigDict` or anything with attributes.

# Blur sigmas in the config are in pixels of a 224 px view (MoCo v2).
_REFERENCE_SIDE = 224


# ----------------------------------------------------------------------------
# Colour ops.


def _blend_op(image: Array, a: Array, b: Array, c: Array) -> Array:
  """`clip(a x + b gray(x) + c mean(gray(x)), 0, 1)`, the group-wide mean.

  Brightness, contrast and saturation are all of this form (torchvision's
  `_blend` followed by its clamp), and so is the identity (a=1, b=c=0, which
  is exact in float arithmetic for x in [0, 1]). One generic op with selected
  scalar coefficients lets `color_jitter` apply the ops in a random order
  without evaluating all of them at every position.
  """
  gray = colorspace.luma(image)
  mean = colorspace.mean_luma(image)
  out = a * image + b * gray[..., None] + c * mean
  return jnp.clip(out, 0.0, 1.0)


def adjust_brightness(image: Array, factor: Array | float) -> Array:
  """torchvision `adjust_brightness`: `clip(factor * x, 0, 1)`."""
  return _blend_op(image, factor, 0.0, 0.0)


def adjust_contrast(image: Array, factor: Array | float) -> Array:
  """torchvision `adjust_contrast`: blend with the mean of the grayscale.

  The mean is taken over the whole array, i.e. over all images of a group.
  """
  return _blend_op(image, factor, 0.0, 1.0 - factor)


def adjust_saturation(image: Array, factor: Array | float) -> Array:
  """torchvision `adjust_saturation`: blend with the grayscale image."""
  return _blend_op(image, factor, 1.0 - factor, 0.0)


def adjust_hue(image: Array, delta: Array | float) -> Array:
  """Rotates the hue by `delta` turns, as an RGB -> HSV -> RGB round trip.

  A hue shift keeps V = max(R, G, B) and S, hence also the chroma
  C = max - min = V S. So the result is computed directly as
  `V - C * clip(min(k, 4 - k), 0, 1)` with `k = (n + 6 H') mod 6`,
  n = 5, 3, 1 for R, G, B (the branch-free HSV -> RGB formula), where H' is
  the shifted hue. This equals torchvision's `_rgb2hsv`/`_hsv2rgb` round trip
  up to float rounding, avoids the division by V, and is purely elementwise.

  Args:
    image: float array `[..., H, W, 3]` in [0, 1].
    delta: hue shift in units of a full turn (torchvision's `hue_factor`).

  Returns:
    The hue-shifted image, clipped to [0, 1].
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  # Per-channel planes and elementwise max/min: a reduction over the size-3
  # channel axis and `jnp.mod` compile to much slower code (9x on XLA:CPU).
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  chroma = maxc - minc
  safe = jnp.where(chroma > 0, chroma, 1.0)
  # Hue in sixths of a turn, plus the shift; ties resolved R, then G, then B
  # as in torchvision (any choice gives the same colour). One division.
  is_r, is_g = maxc == r, maxc == g
  num = jnp.where(is_r, g - b, jnp.where(is_g, b - r, r - g))
  offset = jnp.where(is_r, 0.0, jnp.where(is_g, 2.0, 4.0))
  hue6 = offset + num / safe + 6.0 * delta

  def channel(n):
    k = n + hue6
    k = k - 6.0 * jnp.floor(k * (1.0 / 6.0))  # k mod 6.
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    return jnp.clip(maxc - chroma * ramp, 0.0, 1.0)

  return jnp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def color_jitter(image: Array, rng: Array, *, brightness: float,
                 contrast: float, saturation: float, hue: float) -> Array:
  """torchvision `ColorJitter` on one image group, float32 in [0, 1].

  Factors are drawn as torchvision draws them: brightness, contrast and
  saturation from U[max(0, 1 - v), 1 + v], the hue shift from U[-hue, hue];
  the four ops are applied in a random order (a fresh permutation per call)
  and every op clips to [0, 1]. An op whose strength is 0 becomes the
  identity, as torchvision skips it.

  Implementation: brightness, contrast and saturation are the same blend op
  with different coefficients (`_blend_op`), so each of the four positions
  of the random order is one generic blend (the identity when the position
  holds the hue) followed by a hue shift (by 0 unless the position holds
  the hue): 4 blends and 4 hue shifts in a 4-step `lax.scan`, instead of
  the 16 op evaluations a `lax.switch` per position costs under `vmap`.

  Args:
    image: float array `[..., H, W, 3]` in [0, 1]; all leading axes form one
      group that shares the draw (contrast's mean is over the whole group).
    rng: a PRNG key.
    brightness: brightness strength (0.4 in MoCo v2).
    contrast: contrast strength.
    saturation: saturation strength.
    hue: maximum hue shift in turns, at most 0.5.

  Returns:
    The jittered image, same shape, in [0, 1].
  """
  # One draw of 8 uniforms (a single threefry call keeps the graph small):
  # 4 sort keys for the order, then the brightness, contrast, saturation and
  # hue parameters.
  u = jax.random.uniform(rng, (8,), jnp.float32)

  def factor(v, strength):
    lo = max(0.0, 1.0 - strength)
    return lo + (1.0 + strength - lo) * v

  f_b = factor(u[4], brightness)
  f_c = factor(u[5], contrast)
  f_s = factor(u[6], saturation)
  delta = hue * (2.0 * u[7] - 1.0)

  # Blend coefficients (a, b, c) of `_blend_op` per op; the hue (row 3) is
  # the identity blend, its shift is applied separately.
  one, zero = jnp.float32(1.0), jnp.float32(0.0)
  coeffs = jnp.stack([
      jnp.stack([f_b, zero, zero]),
      jnp.stack([f_c, zero, one - f_c]),
      jnp.stack([f_s, one - f_s, zero]),
      jnp.stack([one, zero, zero]),
  ])
  # A uniformly random permutation (argsort of iid uniforms); 3 is the hue.
  order = jnp.argsort(u[:4])
  # Per position: its blend coefficients and its hue shift (0 unless the
  # position holds the hue). Made with a one-hot product, not a gather: XLA
  # can fuse a gather into the per-pixel loop and re-run it for every pixel.
  onehot = jax.nn.one_hot(order, 4, dtype=jnp.float32)       # [pos, op]
  pos_coeffs = jnp.matmul(onehot, coeffs,                     # [pos, 3]
                          precision=lax.Precision.HIGHEST)
  pos_delta = onehot[:, 3] * delta                            # [pos]

  def position(x, per_pos):
    a, b, c, d = per_pos[0], per_pos[1], per_pos[2], per_pos[3]
    x = _blend_op(x, a, b, c)
    if hue:  # torchvision skips a zero-strength hue op entirely.
      # A zero shift is the identity up to one rounding of the min and mid
      # channels; shifting rather than selecting keeps the loop body fast
      # (an image-sized select on a per-group flag is 4x slower on XLA:CPU).
      x = adjust_hue(x, d)
    return x, None

  # A loop, not unrolled Python: its carry is materialised between
  # positions, which stops XLA from fusing (and so recomputing) the whole
  # chain of previous ops into every later one.
  # One packed [4, 4] array: XLA then slices each step's parameters once,
  # instead of re-slicing four arrays inside the per-pixel loop.
  xs = jnp.concatenate([pos_coeffs, pos_delta[:, None]], axis=1)
  image, _ = lax.scan(position, image, xs)
  return image


# ----------------------------------------------------------------------------
# Gaussian blur.


def _reflect_index(n: int, kernel_size: int) -> np.ndarray:
  """Source row of each (output row, tap) under reflect padding, `[n, K]`.

  Reflect (mirror without repeating the edge, as torchvision and `np.pad`
  "reflect") is applied as often as needed, so any kernel size is valid.
  """
  radius = kernel_size // 2
  idx = np.arange(n)[:, None] + np.arange(kernel_size)[None, :] - radius
  if n == 1:
    return np.zeros_like(idx)
  period = 2 * (n - 1)
  idx = np.mod(idx, period)
  return np.where(idx > n - 1, period - idx, idx)


def _blur_matrix(weights: Array, n: int) -> Array:
  """`[n, n]` matrix of a 1-D convolution with reflect padding folded in."""
  kernel_size = weights.shape[-1]
  onehot = jax.nn.one_hot(_reflect_index(n, kernel_size), n,
                          dtype=weights.dtype)  # [n, K, n], static.
  # HIGHEST: a bf16 pass (the TPU default) would round the taps, and the
  # kernel would no longer sum to 1.
  return jnp.einsum("k,ikj->ij", weights, onehot,
                    precision=lax.Precision.HIGHEST)


def gaussian_kernel1d(sigma: Array | float, kernel_size: int) -> Array:
  """Normalised 1-D Gaussian taps `[kernel_size]` centred on the middle tap."""
  radius = kernel_size // 2
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def blur_with_kernel(image: Array, weights: Array) -> Array:
  """Separable blur of each image with the same 1-D kernel on H and W.

  Each axis is one matrix product with an `[n, n]` banded matrix that holds
  the kernel with reflect padding folded in. Matrix products run on the
  MXU / tensor cores, need no padded copy, and measured faster on CPU than
  both a shifted-sum and a depthwise `conv_general_dilated` (whose batching
  rule under `vmap` with a per-group kernel is slow on CPU). `HIGHEST`
  precision keeps float32 accuracy on TPU (the default there is one bf16
  pass), so a delta kernel is an exact identity.

  Args:
    image: float array `[..., H, W, C]`; each image is blurred separately.
    weights: odd-length 1-D kernel `[K]` (summing to 1).

  Returns:
    The blurred images, same shape.
  """
  h, w = image.shape[-3], image.shape[-2]
  m_h = _blur_matrix(weights, h)
  m_w = _blur_matrix(weights, w)
  hi = lax.Precision.HIGHEST
  out = jnp.einsum("ij,...jwc->...iwc", m_h, image, precision=hi)
  return jnp.einsum("ij,...hjc->...hic", m_w, out, precision=hi)


def gaussian_blur(image: Array, rng: Array, *, sigma_range: Sequence[float],
                  kernel_size: int) -> Array:
  """Gaussian blur with sigma ~ U[sigma_range], one sigma for the group.

  Args:
    image: float array `[..., H, W, 3]`; each image (e.g. each jigsaw patch)
      is blurred separately, with reflect padding at its borders so that the
      borders are not darkened.
    rng: a PRNG key.
    sigma_range: `(low, high)` of the uniform sigma, in pixels.
    kernel_size: static odd number of taps.

  Returns:
    The blurred image, same shape.
  """
  _check_kernel_size(kernel_size)
  sigma = jax.random.uniform(rng, (), jnp.float32, *sigma_range)
  return blur_with_kernel(image, gaussian_kernel1d(sigma, kernel_size))


def _check_kernel_size(kernel_size: int) -> None:
  if kernel_size < 1 or kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be a positive odd int, got "
                     f"{kernel_size}.")


def _odd(n: int) -> int:
  return n if n % 2 == 1 else n + 1


def blur_kernel_size_for(side: int, frac: float) -> int:
  """`odd(round(frac * side))`: 23 taps at 224 px for MoCo v2's 0.1.

  Args:
    side: the side in pixels of the image the blur is conceptually applied
      to (the view, or the local crop for jigsaw patches).
    frac: kernel side as a fraction of `side` (`aug.blur_kernel_frac`).

  Returns:
    A positive odd kernel size.
  """
  return max(1, _odd(int(math.floor(frac * side + 0.5))))


def blur_sigma_for(sigma: Sequence[float], side: int) -> tuple[float, float]:
  """Scales the config's sigma range (pixels at 224 px) to a `side` px image."""
  scale = side / _REFERENCE_SIDE
  return (float(sigma[0]) * scale, float(sigma[1]) * scale)


# ----------------------------------------------------------------------------
# The MoCo v2 pipeline on one group, and on batches of groups.


def photometric(image: Array, rng: Array, cfg: Config, *,
                blur_sigma: Sequence[float] | None = None,
                blur_kernel_size: int | None = None) -> Array:
  """MoCo v2's photometric ops on ONE image group, float32 in [0, 1].

  Colour jitter with probability `cfg.jitter_prob`, then grayscale with
  probability `cfg.gray_prob`, then Gaussian blur with probability
  `cfg.blur_prob`. All images of the group share every draw.

  The decisions are branch-free: the jitter and grayscale results are picked
  with `jnp.where`; the blur always runs, with a delta kernel (an exact
  identity) when it is not applied, which costs no extra image pass.

  Args:
    image: float32 `[..., H, W, 3]` in [0, 1]; the leading axes form the
      group (`[S, H, W, 3]`).
    rng: a PRNG key.
    cfg: the `aug` config section (jitter_prob, brightness, contrast,
      saturation, hue, gray_prob, blur_prob, blur_sigma, blur_kernel_frac).
    blur_sigma: sigma range in pixels of this image; default: `cfg.blur_sigma`
      scaled by `side / 224` with `side = min(H, W)` (right for global views).
    blur_kernel_size: static odd kernel size; default
      `blur_kernel_size_for(side, cfg.blur_kernel_frac)`.

  Returns:
    The augmented group, same shape, float32 in [0, 1].
  """
  side = min(image.shape[-3], image.shape[-2])
  if blur_sigma is None:
    blur_sigma = blur_sigma_for(cfg.blur_sigma, side)
  if blur_kernel_size is None:
    blur_kernel_size = blur_kernel_size_for(side, cfg.blur_kernel_frac)
  _check_kernel_size(blur_kernel_size)

  # The colour jitter gets its own key; the decisions and sigma are one draw.
  k_jit, k_draw = jax.random.split(rng)
  u_jit, u_gray, u_blur, u_sigma = jax.random.uniform(k_draw, (4,))
  image = image.astype(jnp.float32)

  if cfg.jitter_prob > 0:
    jittered = color_jitter(
        image, k_jit, brightness=cfg.brightness, contrast=cfg.contrast,
        saturation=cfg.saturation, hue=cfg.hue)
    apply = u_jit < cfg.jitter_prob
    image = jnp.where(apply, jittered, image)

  if cfg.gray_prob > 0:
    apply = u_gray < cfg.gray_prob
    image = jnp.where(apply, colorspace.to_grayscale(image), image)

  if cfg.blur_prob > 0 and blur_kernel_size > 1:
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u_sigma
    gauss = gaussian_kernel1d(sigma, blur_kernel_size)
    delta = jnp.zeros_like(gauss).at[blur_kernel_size // 2].set(1.0)
    apply = u_blur < cfg.blur_prob
    image = blur_with_kernel(image, jnp.where(apply, gauss, delta))
  return image


def normalize(image: Array, cfg: Config) -> Array:
  """`(x - cfg.mean) / cfg.std` per channel, for x in [0, 1]."""
  mean = jnp.asarray(cfg.mean, jnp.float32)
  std = jnp.asarray(cfg.std, jnp.float32)
  return (image - mean) / std


def augment_group_batch(images_uint8: Array, rng: Array, cfg: Config, *,
                        blur_sigma: Sequence[float] | None = None,
                        blur_kernel_size: int | None = None,
                        randaugment_global: bool = False) -> Array:
  """Augments N independent image groups and normalises them.

  Args:
    images_uint8: uint8 `[N, S, H, W, 3]`; the S images of a group share
      one draw of every random parameter.
    rng: a PRNG key; group i uses `jax.random.split(rng, N)[i]`.
    cfg: the `aug` config section.
    blur_sigma: sigma range in pixels for these images (see `photometric`).
    blur_kernel_size: static odd kernel size (see `photometric`).
    randaugment_global: apply `randaugment.randaugment` (one draw per
      group, shared by its S images) before the photometric ops.

  Returns:
    float32 `[N, S, H, W, 3]`, photometrically augmented and normalised.
  """
  keys = jax.random.split(rng, images_uint8.shape[0])

  def one_group(group, key):
    x = group.astype(jnp.float32) / 255.0
    if randaugment_global:
      k_ra, key = jax.random.split(key)
      x = jax.vmap(lambda im: randaugment.randaugment(
          im, k_ra, num_layers=cfg.randaugment_layers,
          magnitude=cfg.randaugment_magnitude))(x)
    x = photometric(x, key, cfg, blur_sigma=blur_sigma,
                    blur_kernel_size=blur_kernel_size)
    return normalize(x, cfg)

  return jax.vmap(one_group)(images_uint8, keys)


def augment_views(batch: Mapping[str, Array], rng: Array, cfg: Config,
                  views_cfg: Config) -> dict[str, Array]:
  """Photometric augmentation + normalisation of a DetCo (or MoCo v2) batch.

  Every one of the 2B global views and 2B jigsaw patch sets gets its own
  independent draw; the 9 patches of a set share theirs. With
  `cfg.randaugment`, the global views first go through RandAugment
  (`cfg.randaugment_layers` ops at `cfg.randaugment_magnitude`, "DetCo+AA");
  the patch sets never do.

  Blur scaling, so that small images are blurred like large ones:
    * global views (side H): sigma range `cfg.blur_sigma * H / 224`, kernel
      `odd(round(cfg.blur_kernel_frac * H))` (23 taps at 224 px);
    * patch sets: the patches are cut from a `views_cfg.local_size` crop,
      which is what the paper blurs, so the sigma range is
      `cfg.blur_sigma * local_size / 224` and the kernel
      `odd(round(cfg.blur_kernel_frac * local_size))` (27 taps at 255 px);
      each patch is then blurred separately with reflect padding at its
      own borders (an approximation of blurring the crop before cutting).

  Args:
    batch: `{"global": uint8 [B, 2, H, W, 3], "local": uint8
      [B, 2, 9, h, w, 3]}`; "local" may be absent (MoCo v2). Other keys are
      passed through unchanged.
    rng: a PRNG key.
    cfg: the `aug` config section.
    views_cfg: the `views` config section (for `local_size`).

  Returns:
    A dict with the same keys; "global" and "local" are float32 normalised
    arrays of the input shapes.
  """
  k_global, k_local = jax.random.split(rng)
  out = dict(batch)

  g = batch["global"]
  b, v, h, w, c = g.shape
  side = min(h, w)
  g = augment_group_batch(
      g.reshape(b * v, 1, h, w, c), k_global, cfg,
      blur_sigma=blur_sigma_for(cfg.blur_sigma, side),
      blur_kernel_size=blur_kernel_size_for(side, cfg.blur_kernel_frac),
      randaugment_global=bool(cfg.randaugment))
  out["global"] = g.reshape(b, v, h, w, c)

  if "local" in batch:
    loc = batch["local"]
    b, v, s, h, w, c = loc.shape
    crop = views_cfg.local_size
    loc = augment_group_batch(
        loc.reshape(b * v, s, h, w, c), k_local, cfg,
        blur_sigma=blur_sigma_for(cfg.blur_sigma, crop),
        blur_kernel_size=blur_kernel_size_for(crop, cfg.blur_kernel_frac))
    out["local"] = loc.reshape(b, v, s, h, w, c)
  return out
