"""detectron2's aspect-ratio groups, made static: one padded shape per group.

detectron2 batches images of one orientation together
(`AspectRatioGroupedDataset`: group 0 when width > height, else group 1) and
pads each batch to its own largest image. An XLA program has one shape, so
here each group pads to one fixed shape (800 x 1344 for landscape, 1344 x 800
for portrait at DetCo's settings): two training programs and two test
programs, whatever the image sizes.

Under `jax.jit` over a mesh every process must feed the same shape at a step,
so the group is drawn per STEP, for the global batch: step t is landscape
with probability equal to the landscape share of the training images
(`GroupCounts.share`), from a stateless seed of (key, t). Each process then
takes its next b images of that group from its own stream of the group
(`group_source`), which walks its shard's images of that group epoch after
epoch. How many steps of each group come before step s is a function of the
seed alone (`steps_per_group`), so a stream resumed at step s is the
uninterrupted one, batch for batch.

Sorting records into groups needs each image's size: `count_groups` reads
the size of every record of a shard once, from the JPEG header where it can
(`tf.image.extract_jpeg_shape`, no decode), and each group's stream filters
the shard's records by it, so a stream reads every record of the shard and
decodes only its own group's. Records whose size cannot be read are left
out of both groups, and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from detco_jax.data import sources

LANDSCAPE, PORTRAIT = 0, 1
GROUPS = (LANDSCAPE, PORTRAIT)
GROUP_NAMES = ("landscape", "portrait")
# Steps whose groups one draw makes: the draws are vectorised by blocks.
_BLOCK = 1024

# record -> {"height": int32, "width": int32, "boxes": int32 (the boxes that
# train: not crowd)}, in graph code.
MetaReader = Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]


def group_of(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """detectron2's group of an image: 0 (landscape) if width > height, else 1.

  Args:
    height: the image's height (any int or float tensor).
    width: its width.

  Returns:
    int32 scalar, `LANDSCAPE` or `PORTRAIT` (square images are portrait, as
    in detectron2's `AspectRatioGroupedDataset`).
  """
  return tf.where(width > height, LANDSCAPE, PORTRAIT)


def encoded_image_size(encoded: tf.Tensor) -> tf.Tensor:
  """(height, width) of an encoded image: from the header of a JPEG.

  Args:
    encoded: a scalar string tensor (JPEG, PNG, ...).

  Returns:
    int32 [2]; other formats than JPEG are decoded to find it.
  """
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.image.extract_jpeg_shape(encoded)[:2],
      lambda: tf.shape(tf.io.decode_image(encoded, channels=3,
                                          expand_animations=False))[:2])


@dataclasses.dataclass(frozen=True)
class GroupCounts:
  """Images of each group in every process's shard.

  Attributes:
    counts: int64 [process_count, 2]: row i is (landscape, portrait) images
      of process i's shard.
  """
  counts: np.ndarray

  def __post_init__(self):
    counts = np.asarray(self.counts, np.int64)
    if counts.ndim != 2 or counts.shape[1] != len(GROUPS):
      raise ValueError(f"GroupCounts needs [processes, 2] counts, got shape "
                       f"{counts.shape}.")
    object.__setattr__(self, "counts", counts)

  @property
  def totals(self) -> np.ndarray:
    """int64 [2]: images of each group over all processes."""
    return self.counts.sum(0)

  @property
  def share(self) -> float:
    """The landscape share of all images: a step's chance to be landscape."""
    total = int(self.totals.sum())
    return float(self.totals[LANDSCAPE]) / total if total else 0.0

  @property
  def groups(self) -> tuple[int, ...]:
    """The groups that have at least one image somewhere."""
    return tuple(g for g in GROUPS if self.totals[g] > 0)

  def largest(self, group: int) -> int:
    """The most images of `group` that one process holds."""
    return int(self.counts[:, group].max())

  def local(self, process_index: int, group: int) -> int:
    """Images of `group` in process `process_index`'s shard."""
    return int(self.counts[process_index, group])


def _with_group(meta: MetaReader, min_boxes: int
                ) -> Callable[[dict[str, tf.Tensor]], tf.Tensor]:
  """record -> its group, or -1 for an image with fewer than `min_boxes`."""
  def group(record: dict[str, tf.Tensor]) -> tf.Tensor:
    m = meta(record)
    return tf.where(m["boxes"] >= min_boxes, group_of(m["height"],
                                                      m["width"]), -1)
  return group


def count_groups(source: sources.Source, meta: MetaReader, *,
                 min_boxes: int = 0) -> tuple[np.ndarray, int]:
  """The images of each group in one shard (one read of every record).

  Args:
    source: this process's shard.
    meta: reads a record's size and trainable boxes without decoding it.
    min_boxes: images with fewer trainable boxes belong to no group
      (detectron2 trains only on images with a box: 1).

  Returns:
    (int64 [2] counts of (landscape, portrait), records left out: too few
    boxes, or a size that cannot be read).
  """
  groups = source.records(None).map(
      _with_group(meta, min_boxes), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=False).ignore_errors().batch(4096)
  found = np.concatenate([np.zeros([0], np.int32),
                          *groups.as_numpy_iterator()])
  counts = np.array([(found == g).sum() for g in GROUPS], np.int64)
  return counts, source.num_examples - int(counts.sum())


def group_source(source: sources.Source, meta: MetaReader,
                 group: Optional[int], num_examples: int, *,
                 min_boxes: int = 0) -> sources.Source:
  """The shard's records of one group, as a source of its own.

  Args:
    source: this process's shard.
    meta: as for `count_groups`.
    group: `LANDSCAPE` or `PORTRAIT`; None for both (the records with at
      least `min_boxes` boxes).
    num_examples: the group's images in the shard (`count_groups`).
    min_boxes: as for `count_groups`.

  Returns:
    A source whose `records(seed)` are `source.records(seed)` of the group,
    in the same order.
  """
  which = _with_group(meta, min_boxes)

  def records(seed: Optional[tf.Tensor]) -> tf.data.Dataset:
    tagged = source.records(seed).map(
        lambda r: (r, which(r)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True).ignore_errors()
    keep = ((lambda r, g: g >= 0) if group is None
            else (lambda r, g: tf.equal(g, group)))
    return tagged.filter(keep).map(lambda r, g: r)

  name = "with boxes" if group is None else GROUP_NAMES[group]
  return dataclasses.replace(
      source, split=f"{source.split} ({name})",
      num_examples=num_examples, _records=records)


def _block_groups(key: int, share: float, block: tf.Tensor) -> tf.Tensor:
  """The groups of steps [block * _BLOCK, (block + 1) * _BLOCK)."""
  seed = tf.stack([tf.constant(key, tf.int64), tf.cast(block, tf.int64)])
  u = tf.random.stateless_uniform([_BLOCK], seed, dtype=tf.float64)
  return tf.where(u < share, tf.constant(LANDSCAPE, tf.int64),
                  tf.constant(PORTRAIT, tf.int64))


def step_groups(key: int, share: float, start_step: int) -> tf.data.Dataset:
  """The group of every step from `start_step` on (an infinite dataset).

  Args:
    key: the seed key (the same on every process).
    share: the chance of a landscape step (`GroupCounts.share`).
    start_step: the first step.

  Returns:
    int64 scalars, `LANDSCAPE` or `PORTRAIT`.
  """
  first, skip = divmod(start_step, _BLOCK)
  return (tf.data.Dataset.counter(first)
          .flat_map(lambda b: tf.data.Dataset.from_tensor_slices(
              _block_groups(key, share, b)))
          .skip(skip))


def steps_per_group(key: int, share: float, steps: int) -> np.ndarray:
  """How many of the first `steps` steps are of each group.

  Args:
    key: as for `step_groups`.
    share: as for `step_groups`.
    steps: a step count.

  Returns:
    int64 [2]: (landscape, portrait) steps among steps 0 .. steps - 1.
  """
  landscape = 0
  full, rest = divmod(steps, _BLOCK)
  for block in range(full + (rest > 0)):
    groups = _block_groups(key, share, tf.constant(block)).numpy()
    if block == full:
      groups = groups[:rest]
    landscape += int((groups == LANDSCAPE).sum())
  return np.array([landscape, steps - landscape], np.int64)
