"""RetinaNet (ResNet + FPN + shared heads) for detection transfer.

The layout follows detectron2's RetinaNet so that a fine-tuned model reads
like one: the FPN has a 1x1 lateral and a 3x3 output conv per backbone level
and a nearest-neighbour x2 top-down path, P6 is a 3x3/2 conv on C5 (the res5
map, not P5) and P7 a 3x3/2 conv on relu(P6); one head, shared by every
level, has a classification and a box tower of 3x3 convs. Norms are
options: SyncBN after the FPN's lateral and output convs (DetCo's FPN.NORM),
and GroupNorm or none in the head's towers (detectron2: none).

Pyramid level `l` is backbone stage `res{l}` (stride 2^l with the imagenet
stem), so small images can use levels 2..5 instead of RetinaNet's 3..7. The
head's outputs are flattened level-major, then y, then x, then anchor: the
order that `reshape(B, H * W * A, K)` gives an NHWC map of A * K channels,
and the order in which `detco_jax.detection.boxes` lays out the anchors.

The backbone is the pretraining `resnet.ResNet`, a submodule named
`backbone` with the pretrained ResNet's exact variable tree, so pretrained
weights slot in with `RetinaNet.with_backbone`. Freezing (detectron2's
FREEZE_AT and FrozenBN) never renames a variable: it stops the gradient of
the frozen parameters as they are read (`nn.map_variables`), and frozen BN
runs the ResNet with its running statistics.
"""

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detco_jax.models import resnet

# The backbone stages that can feed the FPN, as pyramid levels.
BACKBONE_LEVELS = (2, 3, 4, 5)
# Norms after the FPN's convs: none (the TF Model Garden's, detectron2's
# default) or batch norm over the global batch (DetCo's FPN.NORM "SyncBN").
FPN_NORMS = ("none", "bn")
# GroupNorm groups in the head (detectron2's and the FCOS/RetinaNet GN heads').
GN_GROUPS = 32
# The RetinaNet submodule that holds the pretrained ResNet.
BACKBONE = "backbone"

# detectron2's c2_xavier_fill (kaiming_uniform_ with a=1) for the FPN convs.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# RetinaNet's head init: normal(std=0.01) weights.
HEAD_INIT_STD = 0.01


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Any,
          kernel_init: Any, use_bias: bool = True,
          bias_init: Any = nn.initializers.zeros) -> nn.Conv:
  """A conv with PyTorch's symmetric padding (`padding=k//2`).

  Explicit padding, as in `resnet`: XLA's "SAME" pads a stride-2 conv on an
  even input asymmetrically, which would shift P6/P7 against detectron2's.
  """
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), (strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
                 name=name)


def check_levels(in_levels: Sequence[int],
                 extra_levels: Sequence[int]) -> tuple[int, ...]:
  """Validates a pyramid configuration and returns all its levels in order.

  Args:
    in_levels: backbone levels that feed the top-down path (from 2..5).
    extra_levels: levels above 5 made by strided convs from C5 (e.g. 6, 7).

  Returns:
    `in_levels + extra_levels` as one tuple.

  Raises:
    ValueError: unless the levels are increasing and contiguous, the
      in-levels lie in 2..5, and the extra levels (if any) start at 6.
  """
  in_levels, extra_levels = tuple(in_levels), tuple(extra_levels)
  levels = in_levels + extra_levels
  # Each level is the one below at stride x2; a gap would break the
  # top-down x2 upsampling and the P6-from-C5 chain.
  if (not in_levels or not set(in_levels) <= set(BACKBONE_LEVELS)
      or levels != tuple(range(levels[0], levels[0] + len(levels)))
      or (extra_levels and extra_levels[0] != 6)):
    raise ValueError(
        f"Pyramid levels must be contiguous and increasing, in-levels from "
        f"{BACKBONE_LEVELS} (res2..res5) and extra levels from 6 on (P6 is "
        f"made from C5), e.g. (3, 4, 5) + (6, 7) or (2, 3, 4, 5) + (); got "
        f"in_levels={in_levels}, extra_levels={extra_levels}.")
  return levels


class FPN(nn.Module):
  """Feature pyramid on the ResNet's stage maps.

  Attributes:
    channels: channels of every pyramid map.
    in_levels: backbone levels for the top-down path (2 is res2, ...,
      5 is res5), contiguous and increasing.
    extra_levels: levels above 5: the first a 3x3/2 conv on C5, each next
      one a 3x3/2 conv on the ReLU of the previous one; () for none.
    norm: "none", or "bn": batch norm after each lateral and output conv
      (which then have no bias), over the global batch (detectron2's
      FPN.NORM "SyncBN"; P6 and P7 have none, as there).
    bn_momentum: decay of the BN running averages (Flax convention).
    dtype: compute dtype (params stay float32).
  """
  channels: int = 256
  in_levels: Sequence[int] = (3, 4, 5)
  extra_levels: Sequence[int] = (6, 7)
  norm: str = "none"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array],
               train: bool = False) -> dict[int, jax.Array]:
    """Builds the pyramid.

    Args:
      features: the backbone's `{"res2": ..., "res5": ...}` maps, NHWC.
      train: normalise with batch statistics and update the running ones
        (norm "bn").

    Returns:
      `{level: [B, h, w, channels]}` for `in_levels + extra_levels`, in
      that order.

    Raises:
      ValueError: when a map is not twice the size of the one above it (the
        image is not a multiple of the coarsest in-level's stride).
    """
    check_levels(self.in_levels, self.extra_levels)
    if self.norm not in FPN_NORMS:
      raise ValueError(f"FPN norm must be one of {FPN_NORMS}, got "
                       f"{self.norm!r}.")
    outputs = {}
    prev = None
    # Top-down: from the coarsest in-level to the finest.
    for level in reversed(tuple(self.in_levels)):
      lateral = self._conv_norm(1, f"fpn_lateral{level}", train)(
          features[f"res{level}"])
      if prev is not None:
        up = jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)
        if up.shape != lateral.shape:
          raise ValueError(
              f"FPN level {level} is {lateral.shape[1:3]} but the level above "
              f"upsamples to {up.shape[1:3]}: pad images to a multiple of the "
              f"coarsest in-level's stride (2^{max(self.in_levels)} with the "
              "imagenet stem).")
        lateral = lateral + up
      prev = lateral
      outputs[level] = self._conv_norm(3, f"fpn_output{level}", train)(
          lateral)
    x = features["res5"]
    for i, level in enumerate(self.extra_levels):
      # P6 sees C5 itself; the levels above see the ReLU of the one below.
      x = _conv(self.channels, 3, 2, f"p{level}", self.dtype,
                fpn_init)(x if i == 0 else nn.relu(x))
      outputs[level] = x
    return {level: outputs[level]
            for level in tuple(self.in_levels) + tuple(self.extra_levels)}

  def _conv_norm(self, kernel: int, name: str,
                 train: bool) -> Callable[[jax.Array], jax.Array]:
    """A lateral or output conv, with its norm after it (detectron2's
    `Conv2d(..., bias=norm == "", norm=...)`)."""
    bn = self.norm == "bn"
    conv = _conv(self.channels, kernel, 1, name, self.dtype, fpn_init,
                 use_bias=not bn)
    if not bn:
      return conv
    # groups=1: statistics of the whole (global, under jit) batch: SyncBN.
    norm = resnet.GroupBatchNorm(groups=1, momentum=self.bn_momentum,
                                 dtype=self.dtype, name=f"{name}_norm")
    return lambda x: norm(conv(x), use_running_average=not train)


class RetinaNetHead(nn.Module):
  """Classification and box towers shared by all pyramid levels.

  Attributes:
    num_classes: K, foreground classes (sigmoid outputs, no background).
    num_anchors: A, anchors per location.
    channels: width of the towers' convs.
    num_convs: 3x3 conv -> norm -> ReLU blocks per tower.
    norm: "gn" (GroupNorm, 32 groups) or "none".
    prior_prob: initial foreground probability of every anchor (focal loss
      paper: keeps the many background anchors from swamping the first
      steps).
    init_std: the std of the convs' normal init (detectron2: 0.01 at 256
      channels).
    dtype: compute dtype; the outputs are float32.
  """
  num_classes: int
  num_anchors: int
  channels: int = 256
  num_convs: int = 4
  norm: str = "gn"
  prior_prob: float = 0.01
  init_std: float = HEAD_INIT_STD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]
               ) -> tuple[jax.Array, jax.Array]:
    """Applies the head to each level and flattens.

    Args:
      features: pyramid maps [B, h_l, w_l, C], in level order.

    Returns:
      (cls_logits [B, sum_l h_l * w_l * A, K], box_deltas [B, ..., 4]),
      float32, level-major then (y, x, anchor) within a level.
    """
    if self.norm not in ("gn", "none"):
      raise ValueError(f"Head norm must be 'gn' or 'none', got {self.norm!r}.")
    bias_cls = -math.log((1 - self.prior_prob) / self.prior_prob)
    a, k = self.num_anchors, self.num_classes
    # Created once and called on every level: one set of parameters.
    towers = {name: self._tower(name) for name in ("cls", "bbox")}
    head_init = nn.initializers.normal(self.init_std)
    cls_score = _conv(a * k, 3, 1, "cls_score", self.dtype, head_init,
                      bias_init=nn.initializers.constant(bias_cls))
    bbox_pred = _conv(a * 4, 3, 1, "bbox_pred", self.dtype, head_init)
    cls_out, box_out = [], []
    for x in features:
      b = x.shape[0]
      cls = cls_score(self._run(towers["cls"], x))
      box = bbox_pred(self._run(towers["bbox"], x))
      # NHWC with channel a * K + k -> (y, x, a) rows of K; detectron2's
      # permute_to_N_HWA_K gives the same order from NCHW.
      cls_out.append(cls.reshape(b, -1, k))
      box_out.append(box.reshape(b, -1, 4))
    return (jnp.concatenate(cls_out, 1).astype(jnp.float32),
            jnp.concatenate(box_out, 1).astype(jnp.float32))

  def _tower(self, name: str) -> list[tuple[nn.Module, nn.Module | None]]:
    """The (conv, norm) pairs of one tower."""
    gn = self.norm == "gn"
    # A conv bias before GN is cancelled by GN's mean subtraction.
    return [(_conv(self.channels, 3, 1, f"{name}_conv{i}", self.dtype,
                   nn.initializers.normal(self.init_std), use_bias=not gn),
             nn.GroupNorm(GN_GROUPS, epsilon=1e-5, dtype=self.dtype,
                          name=f"{name}_norm{i}") if gn else None)
            for i in range(self.num_convs)]

  @staticmethod
  def _run(tower: list[tuple[nn.Module, nn.Module | None]],
           x: jax.Array) -> jax.Array:
    """Applies a tower's conv -> norm -> ReLU blocks to one level."""
    for conv, norm in tower:
      x = conv(x)
      x = nn.relu(x if norm is None else norm(x))
    return x


def _is_bn(names: Sequence[str]) -> bool:
  """Whether a ResNet parameter path belongs to a batch norm."""
  parent = names[-2]
  return parent.startswith("bn") or parent.endswith("_bn")


def _stage_level(names: Sequence[str]) -> int:
  """The FREEZE_AT index of a ResNet parameter: 1 stem, 2 res2, ..., 5 res5."""
  top = names[0]
  if top.startswith("layer"):
    # layer{i}_{j} is block j of stage res{i + 1}.
    return int(top[len("layer"):].split("_")[0]) + 1
  return 1


class RetinaNet(nn.Module):
  """ResNet backbone, FPN and RetinaNet head.

  Attributes:
    num_classes: K, foreground classes.
    depth: ResNet depth (10, 18, 34, 50).
    width: ResNet width (64 in the paper).
    stem: "imagenet" or "cifar" (see `resnet.ResNet`).
    dtype: compute dtype of the whole model; outputs are float32.
    levels: backbone levels that feed the FPN (e.g. (3, 4, 5)).
    extra_levels: levels made from C5 above them (e.g. (6, 7)), or ().
    num_anchors: anchors per location.
    head_channels: channels of the FPN maps and of the head's towers.
    norm: the head's norm, "gn" or "none".
    num_convs: conv blocks per head tower.
    prior_prob: the head's initial foreground probability.
    head_init_std: the std of the head convs' normal init.
    fpn_norm: the FPN's norm, "none" or "bn" (`FPN.norm`).
    bn_momentum: decay of the BN running averages, the backbone's and the
      FPN's (0.0 leaves a training pass's batch statistics: precise BN).
    backbone_bn: "sync": in training the ResNet's BN uses batch statistics
      (global-batch ones: the ResNet runs with bn_groups=1, so under jit over
      a mesh the reduction spans all devices) and updates its running
      averages; "frozen": BN always uses the running statistics and its
      scale and bias get no gradient (detectron2's FrozenBN).
    frozen_stages: detectron2's FREEZE_AT: 0 trains the whole backbone,
      1 freezes the stem, 2 the stem and res2, ..., 5 every stage. Frozen
      parameters get no gradient, and the frozen stages' BN always
      normalises with its running statistics, which stay as pretrained
      (detectron2 turns a frozen stage's BN into FrozenBN, whatever
      `backbone_bn` says).
  """
  num_classes: int
  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  dtype: Any = jnp.float32
  levels: Sequence[int] = (3, 4, 5)
  extra_levels: Sequence[int] = (6, 7)
  num_anchors: int = 9
  head_channels: int = 256
  norm: str = "gn"
  num_convs: int = 4
  prior_prob: float = 0.01
  head_init_std: float = HEAD_INIT_STD
  fpn_norm: str = "none"
  bn_momentum: float = 0.9
  backbone_bn: str = "sync"
  frozen_stages: int = 0

  @nn.compact
  def __call__(self, images: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """Runs the detector.

    Args:
      images: float32 [B, H, W, 3], normalised as in pretraining (see
        `detco_jax.eval.features.preprocess`).
      train: training mode (batch statistics in the backbone's BN unless
        `backbone_bn` is "frozen").

    Returns:
      (cls_logits [B, A_total, K], box_deltas [B, A_total, 4]), float32,
      with anchors level-major, then y, then x, then anchor.
    """
    if self.backbone_bn not in ("sync", "frozen"):
      raise ValueError("backbone_bn must be 'sync' or 'frozen', got "
                       f"{self.backbone_bn!r}.")
    if not 0 <= self.frozen_stages <= 5:
      raise ValueError("frozen_stages must be in 0..5 (detectron2's "
                       f"FREEZE_AT), got {self.frozen_stages}.")
    levels = check_levels(self.levels, self.extra_levels)
    backbone = resnet.ResNet(depth=self.depth, width=self.width,
                             stem=self.stem, bn_groups=1, dtype=self.dtype,
                             bn_momentum=self.bn_momentum,
                             frozen_bn_stages=self.frozen_stages,
                             name=BACKBONE)
    # The ResNet reads its params through this map, so freezing changes no
    # variable name. Frozen params become constants to autodiff, and since
    # the frozen stages are a prefix, their activations are too: XLA emits
    # no backward pass for them.
    apply = nn.map_variables(
        lambda mdl, x, t: mdl(x, t), "params", self._stop_frozen_gradients,
        init=self.is_initializing())
    maps = apply(backbone, images, train and self.backbone_bn == "sync")
    pyramid = FPN(self.head_channels, self.levels, self.extra_levels,
                  norm=self.fpn_norm, bn_momentum=self.bn_momentum,
                  dtype=self.dtype, name="fpn")(maps, train)
    head = RetinaNetHead(self.num_classes, self.num_anchors,
                         self.head_channels, num_convs=self.num_convs,
                         norm=self.norm, prior_prob=self.prior_prob,
                         init_std=self.head_init_std,
                         dtype=self.dtype, name="head")
    return head([pyramid[level] for level in levels])

  def _stop_frozen_gradients(self, variables: dict[str, Any]) -> dict[str, Any]:
    """Applies stop_gradient to the frozen ResNet parameters."""
    def stop(path, leaf):
      names = [k.key for k in path[1:]]  # path[0] is the "params" collection.
      frozen = (_stage_level(names) <= self.frozen_stages
                or (self.backbone_bn == "frozen" and _is_bn(names)))
      return jax.lax.stop_gradient(leaf) if frozen else leaf
    return jax.tree_util.tree_map_with_path(stop, variables)

  @staticmethod
  def with_backbone(variables: Mapping[str, Any],
                    backbone_variables: Mapping[str, Any]) -> dict[str, Any]:
    """RetinaNet variables with the backbone replaced by a pretrained one.

    Args:
      variables: the RetinaNet's `{"params", "batch_stats"}` (e.g. its init).
      backbone_variables: a ResNet's `{"params", "batch_stats"}`, e.g.
        `pretrained.Backbone.variables`; its arrays are used as they are.

    Returns:
      A new variables dict (the inputs are not modified).

    Raises:
      ValueError: when the ResNet's tree or shapes differ from the backbone's
        (another depth, width or stem).
    """
    out = {}
    for collection in ("params", "batch_stats"):
      ours, theirs = variables[collection], backbone_variables[collection]
      expected = jax.tree_util.tree_flatten_with_path(ours[BACKBONE])[0]
      given = jax.tree_util.tree_flatten_with_path(theirs)[0]
      expected = {jax.tree_util.keystr(p): x.shape for p, x in expected}
      given = {jax.tree_util.keystr(p): x.shape for p, x in given}
      if expected != given:
        diff = sorted(k for k in expected.keys() | given.keys()
                      if expected.get(k) != given.get(k))
        raise ValueError(
            f"The pretrained ResNet does not fit the RetinaNet's backbone: "
            f"{len(diff)} {collection} differ, e.g. "
            + "; ".join(f"{k}: backbone {expected.get(k)}, pretrained "
                        f"{given.get(k)}" for k in diff[:3])
            + ". Build the RetinaNet with the pretraining run's model depth, "
            "width and stem.")
      out[collection] = {**ours, BACKBONE: theirs}
    return {**variables, **out}
