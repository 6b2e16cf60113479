"""Relative patch location (Doersch et al., ICCV 2015) as a pretraining method.

Host views: a crop of at least `views.local_min_area` of the image
(`views.local_ratio`, flipped with `views.flip_prob`) is laid out, virtually
resized, as a 3 x 3 grid of `pretext.patch_size` patches with a
`pretext.gap` between cells and every patch moved by up to
`pretext.jitter` pixels on each axis: the paper's guards against matching
patches by their continuing edges. The centre patch and one of its 8
neighbours, drawn uniformly, are the example; the neighbour's position (the
index in `NEIGHBOURS`, reading order) is the label. Head: a shared layer per
patch, the pair concatenated, a hidden layer and an 8-way classifier. Loss:
cross-entropy.
"""

import tensorflow as tf

from detco_jax.data import pipeline
from detco_jax.data import views as views_lib
from detco_jax.methods import pretext

# (row, column) offsets, in cells, of the neighbour given each label:
# reading order, centre left out.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0),
              (1, 1))
# Sub-seed tags, apart from the views' own tags.
_LABEL_SEED = 10
_JITTER_SEED = 11


def geometry(config: pretext.Config) -> tuple[int, int, int, int]:
  """(patch, gap, jitter, side) in pixels of the virtual resized crop.

  Unset values follow the paper's proportions (96 px patches, a 48 px gap,
  up to 7 px of jitter): gap = patch // 2, jitter = max(1, round(7 *
  patch / 96)).
  The side fits 3 patches, 2 gaps and the jitter at both ends.
  """
  p = config.pretext
  patch = int(p.patch_size if p.get("patch_size") is not None
              else config.views.patch_size)
  gap = int(p.gap if p.get("gap") is not None else patch // 2)
  jitter = int(p.jitter if p.get("jitter") is not None
               else max(1, round(7 * patch / 96)))
  return patch, gap, jitter, 3 * patch + 2 * gap + 2 * jitter


def patch_corners(label: tf.Tensor, jitter: tf.Tensor, patch: int,
                  gap: int, max_jitter: int) -> tuple[tf.Tensor, tf.Tensor]:
  """First pixels of the centre and the neighbour patch in the virtual crop.

  Args:
    label: int32 [] neighbour index into `NEIGHBOURS`.
    jitter: int32 [2, 2], (row, column) jitter of the centre and neighbour.
    patch, gap, max_jitter: the geometry (`geometry`).

  Returns:
    (rows, cols): float32 [1, 2] each.
  """
  offsets = tf.gather(tf.constant(NEIGHBOURS, tf.int32), label)
  cells = tf.stack([tf.ones([2], tf.int32), 1 + offsets])  # [2 patches, 2]
  corners = max_jitter + cells * (patch + gap) + jitter
  corners = tf.cast(corners, tf.float32)
  return corners[None, :, 0], corners[None, :, 1]


def example_views(config: pretext.Config) -> pipeline.ExampleViews:
  """`(image, seed) -> {"inputs": uint8 [1, 2, p, p, 3], "label": [1]}`.

  Args:
    config: the experiment config (`views`, `pretext`).

  Returns:
    The host views of one example: the centre patch, then the neighbour.
  """
  spec = views_lib.ViewSpec.from_config(config.views)
  patch, gap, max_jitter, side = geometry(config)

  def make(image, seed):
    fold = tf.random.experimental.stateless_fold_in
    label = tf.random.stateless_uniform(
        [1], fold(seed, _LABEL_SEED), minval=0, maxval=len(NEIGHBOURS),
        dtype=tf.int32)
    jitter = tf.random.stateless_uniform(
        [2, 2], fold(seed, _JITTER_SEED), minval=-max_jitter,
        maxval=max_jitter + 1, dtype=tf.int32)
    rows, cols = patch_corners(label[0], jitter, patch, gap, max_jitter)
    crops, flips = views_lib.local_crops(seed, tf.shape(image), spec, 1)
    boxes = views_lib.boxes_in_crop(crops, flips, rows, cols, patch, side,
                                    tf.shape(image))
    return {"inputs": views_lib.resample_patches(image, boxes, patch),
            "label": label}

  return make


def validate(config: pretext.Config) -> None:
  """A positive patch, a non-negative gap and jitter."""
  patch, gap, jitter, _ = geometry(config)
  if patch < 1 or gap < 0 or jitter < 0:
    raise ValueError(
        f"Bad config: pretext.patch_size={patch} must be >= 1, pretext.gap="
        f"{gap} and pretext.jitter={jitter} >= 0.")


TASK = pretext.Task(
    name="rel_patch",
    num_classes=lambda config: len(NEIGHBOURS),
    input_shape=lambda config: (1, 2, geometry(config)[0]),
    example_views=example_views,
    blur_side=lambda config: geometry(config)[3],
    default_hidden=lambda config: (pretext.res5_width(config) // 4,
                                   2 * pretext.res5_width(config)),
    validate=validate)

METHOD = pretext.method(TASK)
