"""ResNet-10/18/34/50 (torchvision v1.5 layout) returning the four stage maps.

The layout follows torchvision so that weights export one-to-one to
torchvision and detectron2: the stride of a bottleneck sits in its 3x3 conv,
convolutions have no bias and use explicit symmetric padding (PyTorch's
`padding=k//2`, not XLA's asymmetric "SAME"), and module names mirror
torchvision's (`conv1`, `bn1`, `layer3_2/conv2`, `layer2_0/downsample_bn`).

Batch norm is `GroupBatchNorm`: in training its statistics come from
`groups` equal sub-batches of the batch axis. With `groups > 1` this is
MoCo's per-GPU ("shuffle") BN, expressed as a property of the model rather
than of the device count; with `groups = 1` it is global-batch (sync) BN.

A convolution on a map of no more pixels than its kernel has taps (DetCo's
3x3 and 2x2 patch maps at res4 and res5) runs as a dense layer over the
whole map (`conv_general_dilated`), which XLA:CPU runs up to 15x faster.
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

STAGES = ("res2", "res3", "res4", "res5")

# torchvision's init: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class GroupBatchNorm(nn.Module):
  """Batch norm whose training statistics come from `groups` sub-batches.

  Attributes:
    groups: number of equal sub-batches along axis 0 that get their own
      statistics in training; 1 is global-batch BN.
    momentum: decay of the running averages (Flax convention: 0.9 is
      PyTorch's momentum 0.1).
    epsilon: added to the variance.
    dtype: output dtype; statistics are always computed in float32.
    scale_init: initialiser of the scale (gamma).
    use_running_average: normalise with the running averages (evaluation)
      instead of sub-batch statistics (training); may be given at call time.
    accumulate: in training, fold the batch's statistics into the running
      averages; False normalises with them and keeps the averages as they
      are (DetCo's jigsaw patches, see `DetCoEncoder`).
  """
  groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  use_running_average: bool | None = None
  accumulate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array,
               use_running_average: bool | None = None) -> jax.Array:
    """Normalises `x` ([N, ..., C]) with batch or running statistics.

    Args:
      x: activations, channels last.
      use_running_average: overrides the attribute of the same name.

    Returns:
      The normalised activations in `self.dtype`.
    """
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if use_ra:
      return self._affine(x, ra_mean.value, ra_var.value, scale, bias)

    n = x.shape[0]
    if n % self.groups:
      raise ValueError(
          f"Batch norm over {self.groups} groups needs a batch divisible by "
          f"{self.groups}, got {n}: set `bn_groups` to a divisor of the "
          "per-step batch.")
    xg = x.astype(jnp.float32).reshape((self.groups, n // self.groups)
                                       + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = xg.mean(axes, keepdims=True)
    # Two-pass variance: E[x^2] - E[x]^2 loses precision for large means.
    var = jnp.square(xg - mean).mean(axes, keepdims=True)
    y = self._affine(xg, mean, var, scale, bias).reshape(x.shape)
    if self.accumulate and not self.is_initializing():
      m = self.momentum
      # Running stats average the groups' statistics (MoCo keeps one GPU's).
      ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0).reshape(c)
      ra_var.value = m * ra_var.value + (1 - m) * var.mean(0).reshape(c)
    return y

  def _affine(self, x, mean, var, scale, bias):
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((x - mean) * inv + bias).astype(self.dtype)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _tap_index(h: int, w: int, kh: int, kw: int, strides: Sequence[int],
               padding: Sequence[tuple[int, int]]
               ) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Which kernel tap joins each input pixel to each output pixel.

  Returns:
    (tap [h * w, ho * wo] int, valid [h * w, ho * wo] bool, ho, wo): the
    flat tap index `i * kw + j` of the kernel row and column that reads
    input pixel p for output pixel q, and whether one does.
  """
  (top, bottom), (left, right) = padding
  ho = (h + top + bottom - kh) // strides[0] + 1
  wo = (w + left + right - kw) // strides[1] + 1
  iy, ix = np.divmod(np.arange(h * w), w)
  oy, ox = np.divmod(np.arange(ho * wo), wo)
  i = iy[:, None] - oy[None, :] * strides[0] + top
  j = ix[:, None] - ox[None, :] * strides[1] + left
  valid = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
  return np.where(valid, i * kw + j, 0), valid, ho, wo


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int],
                         padding: Sequence[tuple[int, int]], *,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         precision: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, as a dense layer on maps within the kernel.

  On a map of at most as many pixels as the kernel has taps (3x3 or 2x2
  under a 3x3 kernel: DetCo's res4 and res5 patch maps) a convolution is a
  dense layer from the whole map to the whole output map, whose
  [h * w * C, ho * wo * O] matrix holds the kernel tap that joins each
  pair of pixels (zero where none does): one matrix product, with no more
  multiplications than the convolution's taps, and a backward of matrix
  products. XLA:CPU runs such convolutions far below their FLOPs: it swaps
  the operands of a convolution whose kernel outnumbers its input's pixels
  and runs the swapped form in a plain loop (a 3x3 conv on 2x2 maps, 15x
  slower than its FLOPs say), and its backward on 3x3 maps runs at a third
  of the speed of the dense form. Every other convolution goes to
  `lax.conv_general_dilated` unchanged.

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
    dimension_numbers, feature_group_count, precision: as for
      `lax.conv_general_dilated` (the keywords `flax.linen.Conv` passes).

  Returns:
    The convolution, as `lax.conv_general_dilated` returns it; the same sum
    in another order on small maps.
  """
  n, h, w, c = lhs.shape if lhs.ndim == 4 else (0, 0, 0, 0)
  kh, kw, _, out = rhs.shape if rhs.ndim == 4 else (0, 0, 0, 0)
  dense = (lhs.ndim == 4 and 0 < h * w <= kh * kw
           and not isinstance(padding, str)
           and all(d == 1 for d in (lhs_dilation or ()))
           and all(d == 1 for d in (rhs_dilation or ()))
           and feature_group_count == 1
           and dimension_numbers == lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, _NHWC))
  if not dense:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)
  tap, valid, ho, wo = _tap_index(h, w, kh, kw, window_strides, padding)
  # A gather, not a product with a 0/1 tensor: exact at any precision.
  taps = rhs.reshape(kh * kw, c, out)[tap]              # [hw, howo, C, O]
  matrix = jnp.where(valid[:, :, None, None], taps, 0)
  matrix = matrix.transpose(0, 2, 1, 3).reshape(h * w * c, ho * wo * out)
  y = jnp.dot(lhs.reshape(n, h * w * c), matrix, precision=precision)
  return y.reshape(n, ho, wo, out)


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Any):
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name,
                 conv_general_dilated=conv_general_dilated)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""
  features: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _conv(self.features, 3, self.strides, "conv1", self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _conv(self.features, 3, 1, "conv2", self.dtype)(y)
    y = self.norm(name="bn2")(y)
    return nn.relu(y + _shortcut(self, x, self.features))


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 x4 (ResNet-50)."""
  features: int
  strides: int
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = _conv(self.features, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = _conv(self.features, 3, self.strides, "conv2", self.dtype)(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = _conv(self.features * 4, 1, 1, "conv3", self.dtype)(y)
    y = self.norm(name="bn3")(y)
    return nn.relu(y + _shortcut(self, x, self.features * 4))


def _shortcut(block: nn.Module, x: jax.Array, out: int) -> jax.Array:
  """Identity, or a strided 1x1 conv + BN when the shape changes."""
  if x.shape[-1] == out and block.strides == 1:
    return x
  y = _conv(out, 1, block.strides, "downsample_conv", block.dtype)(x)
  return block.norm(name="downsample_bn")(y)


ARCHS: Mapping[int, tuple[type[nn.Module], Sequence[int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),  # For tests and tiny experiments.
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (BottleneckBlock, (3, 4, 6, 3)),
}


def stage_channels(depth: int, width: int = 64) -> dict[str, int]:
  """Channels of each stage's output, e.g. 256..2048 for ResNet-50."""
  block, _ = ARCHS[depth]
  return {s: width * 2**i * block.expansion for i, s in enumerate(STAGES)}


class ResNet(nn.Module):
  """ResNet backbone returning `{"res2", "res3", "res4", "res5"}` maps.

  Attributes:
    depth: 10, 18, 34 or 50 (10 is one basic block per stage, for tests).
    width: channels of the first stage's 3x3 convs (64 in the paper).
    stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, strides 4..32) or "cifar"
      (3x3/1 conv, no pool, strides 1..8) for small images.
    bn_groups: sub-batches for batch-norm statistics in training.
    dtype: compute dtype (params stay float32).
    remat: rematerialise each residual block in the backward pass.
    bn_momentum: decay of the BN running averages in training (0.0 makes
      them the last batch's statistics, which BN calibration uses).
    frozen_bn_stages: a FREEZE_AT-style prefix (1 the stem, 2 the stem and
      res2, ..., 5 every stage) whose BN normalises with its running
      statistics even in training and never updates them: detectron2's
      FrozenBatchNorm in the frozen stages of a fine-tune. 0: none.
  """
  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  bn_groups: int = 1
  dtype: Any = jnp.float32
  remat: bool = False
  bn_momentum: float = 0.9
  frozen_bn_stages: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               accumulate_stats: bool = True) -> dict[str, jax.Array]:
    """Runs the backbone.

    Args:
      x: images [N, H, W, 3], normalised.
      train: batch statistics (and running-average updates) in BN.
      accumulate_stats: in training, update BN's running averages with
        this batch's statistics (False: normalise only).

    Returns:
      A dict of the four stage maps, [N, H/s, W/s, C] at strides s.
    """
    if self.depth not in ARCHS:
      raise ValueError(f"model.depth must be one of {sorted(ARCHS)}, "
                       f"got {self.depth}.")
    block_cls, sizes = ARCHS[self.depth]
    if self.remat:
      block_cls = nn.remat(block_cls)

    def norm(level: int) -> Callable[..., nn.Module]:
      """The BN of FREEZE_AT level `level` (1 the stem, 2..5 res2..res5)."""
      return functools.partial(
          GroupBatchNorm, groups=self.bn_groups, momentum=self.bn_momentum,
          dtype=self.dtype,
          use_running_average=not train or level <= self.frozen_bn_stages,
          accumulate=accumulate_stats)

    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
      x = nn.relu(norm(1)(name="bn1")(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "cifar":
      x = _conv(self.width, 3, 1, "conv1", self.dtype)(x)
      x = nn.relu(norm(1)(name="bn1")(x))
    else:
      raise ValueError(f"model.stem must be 'imagenet' or 'cifar', got "
                       f"{self.stem!r}.")
    outputs = {}
    for i, (stage, n_blocks) in enumerate(zip(STAGES, sizes)):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(self.width * 2**i, strides, norm(i + 2), self.dtype,
                      name=f"layer{i + 1}_{j}")(x)
      outputs[stage] = x
    return outputs

