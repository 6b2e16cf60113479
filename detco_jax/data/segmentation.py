"""Image + segmentation-mask streams for the dense probe (`eval.dense`).

Datasets: any TFDS dataset with an image and a per-pixel class mask, e.g.

  * the built-in `detco_shapes`: feature `mask`, 0 = background and c + 1 =
    class c, so 11 classes with `mask_offset` 0;
  * `oxford_iiit_pet`: feature `segmentation_mask`, values 1..3 (pet,
    background, border), 3 classes with `mask_offset` -1.

`config.data.mask_key` names the mask feature, `mask_offset` is added to its
values, and any value outside [0, num_classes) afterwards becomes `IGNORE`
(255), which the probe leaves out of its loss and IoU. With
`foreground_background`, the classes are then merged into two: 0 for
`background_class`, 1 for every other class (`probe_classes`).

Streams (numpy batches of this process's share b of the global batch):

  * `make_train_iterator`: infinite {"image": uint8 [b, S, S, 3],
    "mask": uint8 [b, S, S]}, RandomResizedCrop + flip cut identically from
    image and mask (bilinear for the image, nearest for the mask), shuffled
    per epoch and resumable exactly like the pipeline's probe stream (it is
    built on the same slot stream);
  * `make_test_iterator`: one pass, resize the shorter side + centre crop,
    padded to whole batches, plus "valid" int32 [b] (1 real, 0 padding;
    padding has image 0 and mask `IGNORE`).

The records and their sharding come from `sources.open_source`; only the
decode differs (it also parses the mask).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import tensorflow as tf

from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.data import views as views_lib

AUTOTUNE = tf.data.AUTOTUNE

# Mask value of pixels that count for nothing (padding, unlabelled).
IGNORE = 255

# Sub-seed tag of the flip, folded into a view's seed (the crop draws from
# the view's seed itself). The streams' tags are `pipeline.SeedTag`.
_FLIP_TAG = 7


def remap_mask(raw: tf.Tensor, offset: int, num_classes: int,
               background: Optional[int] = None) -> tf.Tensor:
  """Raw mask values -> class ids in [0, num_classes), else `IGNORE`.

  Args:
    raw: integer mask [H, W, 1] as stored.
    offset: added to every value (e.g. -1 for values starting at 1).
    num_classes: number of segmentation classes.
    background: if set, merge the classes into 0 (this class) and 1 (any
      other).

  Returns:
    uint8 [H, W, 1].
  """
  ids = tf.cast(raw, tf.int32) + offset
  valid = (ids >= 0) & (ids < num_classes)
  if background is not None:
    ids = tf.cast(ids != background, tf.int32)
  return tf.cast(tf.where(valid, ids, IGNORE), tf.uint8)


def probe_classes(config_data: Any) -> Tuple[int, Tuple[str, ...]]:
  """The classes the probe predicts: the dataset's, or foreground/background.

  Args:
    config_data: `config.data` (num_classes, class_names and, optionally,
      foreground_background and background_class).

  Returns:
    (number of classes, their names).
  """
  if config_data.get("foreground_background", False):
    return 2, ("background", "foreground")
  return int(config_data.num_classes), tuple(config_data.class_names)


def open_mask_source(config_data: Any, split: str, *,
                     process_index: Optional[int] = None,
                     process_count: Optional[int] = None,
                     drop_remainder: bool = True) -> sources.Source:
  """This process's shard of a split whose `decode` also returns the mask.

  The mask travels as the record's "label" (uint8 [H, W, 1]), so the
  pipeline's slot stream (resume, corrupt-record filling) carries it along
  unchanged.

  Args:
    config_data: `config.data` (dataset, data_dir, image_key, mask_key,
      mask_offset, num_classes, ...).
    split: split name.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    drop_remainder: equal shards (training) or every example (testing).

  Returns:
    The source; `decode(record)` gives {"image": uint8 [H, W, 3], "label":
    uint8 [H, W, 1] class ids or `IGNORE`}.

  Raises:
    sources.DatasetUnavailableError: a folder dataset, or no such mask
      feature.
  """
  name = config_data.dataset
  if name.startswith(sources.FOLDER_PREFIX):
    raise sources.DatasetUnavailableError(
        f"The dense probe needs segmentation masks; {name!r} is a folder of "
        "images. Use a TFDS dataset with a mask feature (e.g. "
        f"'{sources.BUILTIN_NAME}' or 'oxford_iiit_pet').")
  source = sources.open_source(config_data, split,
                               process_index=process_index,
                               process_count=process_count,
                               drop_remainder=drop_remainder)
  spec = sources.tfds_builder(config_data).info.features.tf_example_spec
  image_key, mask_key = config_data.image_key, config_data.mask_key
  if mask_key not in spec:
    raise sources.DatasetUnavailableError(
        f"Dataset {name!r} has no mask feature {mask_key!r} (set "
        f"config.data.mask_key); features: {sorted(spec)}.")
  parse_spec = {image_key: spec[image_key], mask_key: spec[mask_key]}
  offset = int(config_data.mask_offset)
  num_classes = int(config_data.num_classes)
  background = (int(config_data.background_class)
                if config_data.get("foreground_background", False) else None)

  def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    example = tf.io.parse_single_example(serialized, parse_spec)
    image = sources.decode_image(example[image_key])
    raw = tf.io.decode_image(example[mask_key], channels=1,
                             expand_animations=False, dtype=tf.uint8)
    # A mask of another size cannot be aligned: fail the record (the stream
    # drops and counts it like a corrupt image).
    same_size = tf.debugging.assert_equal(
        tf.shape(raw)[:2], tf.shape(image)[:2],
        message="mask and image sizes differ")
    with tf.control_dependencies([same_size]):
      mask = remap_mask(tf.ensure_shape(raw, [None, None, 1]), offset,
                        num_classes, background)
    return {"image": image, "label": mask}

  return dataclasses.replace(source, _decode=decode)


def random_view(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor,
                size: int, area: Tuple[float, float] = (0.2, 1.0),
                ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                flip_prob: float = 0.5) -> tuple[tf.Tensor, tf.Tensor]:
  """One RandomResizedCrop + flip, the same window for image and mask.

  Both resizes use half-pixel centres, so output pixel (i, j) of the mask is
  the source pixel nearest to where the image's bilinear sample was taken.

  Args:
    image: uint8 [H, W, 3].
    mask: uint8 [H, W, 1].
    seed: [2] int stateless seed.
    size: output side.
    area: crop area range, fractions of the image.
    ratio: crop aspect-ratio range.
    flip_prob: probability of a horizontal flip.

  Returns:
    (uint8 [size, size, 3], uint8 [size, size]).
  """
  crop = views_lib.sample_crops(seed, tf.shape(image), 1, area, ratio)[0]
  flip = tf.random.stateless_uniform(
      [], tf.random.experimental.stateless_fold_in(seed, _FLIP_TAG)) < flip_prob
  view = views_lib.crop_resize_flip(image, crop, flip, size)
  window = mask[crop[0]:crop[0] + crop[2], crop[1]:crop[1] + crop[3]]
  labels = tf.image.resize(window, [size, size], method="nearest")
  labels = tf.cond(flip, lambda: tf.reverse(labels, axis=[1]), lambda: labels)
  return view, tf.ensure_shape(labels[..., 0], [size, size])


def center_view(image: tf.Tensor, mask: tf.Tensor, resize: int,
                crop: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Shorter side resized to `resize`, centre crop `crop`^2, image and mask.

  The image goes through `views.center_crop` (antialiased, as the
  classification probe); the mask takes the nearest pixel on the same grid.

  Args:
    image: uint8 [H, W, 3].
    mask: uint8 [H, W, 1].
    resize: target length of the shorter side.
    crop: output side.

  Returns:
    (uint8 [crop, crop, 3], uint8 [crop, crop]).
  """
  view = views_lib.center_crop(image, resize, crop)
  # The same geometry as `views.center_crop`.
  shape = tf.shape(mask)[:2]
  short = tf.reduce_min(shape)
  new_shape = tf.where(shape == short, resize, resize * shape // short)
  resized = tf.image.resize(mask, new_shape, method="nearest")
  top = tf.cast(tf.round(tf.cast(new_shape[0] - crop, tf.float32) / 2),
                tf.int32)
  left = tf.cast(tf.round(tf.cast(new_shape[1] - crop, tf.float32) / 2),
                 tf.int32)
  labels = resized[top:top + crop, left:left + crop, 0]
  return view, tf.ensure_shape(labels, [crop, crop])


def make_train_iterator(config: Any, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        start_step: int = 0) -> pipeline.InputIterator:
  """Infinite, resumable dense-probe training batches of this process.

  Args:
    config: the dense-probe config (data, views, batch_size, seed).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    start_step: first step; equal to an uninterrupted stream from there on.

  Returns:
    An `InputIterator` of {"image": uint8 [b, S, S, 3], "mask": uint8
    [b, S, S]}, S = `config.views.crop_size`.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  batch = pipeline.per_process_batch(config.batch_size, process_count,
                                     "config.batch_size")
  source = open_mask_source(config.data, config.data.train_split,
                            process_index=process_index,
                            process_count=process_count, drop_remainder=True)
  source.check_decodable()
  tags = pipeline.SeedTag
  stream = pipeline.slot_stream(
      source, order_key=pipeline.seed_key(config.seed, tags.DENSE_ORDER),
      start_position=start_step * batch)
  view_key = pipeline.seed_key(config.seed, process_index, tags.DENSE_VIEWS)
  v = config.views

  def make_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    seed = pipeline.view_seed(view_key, example["position"])
    image, mask = random_view(example["image"], example["label"], seed,
                              v.crop_size, tuple(v.area), tuple(v.ratio),
                              float(v.flip_prob))
    return {"image": image, "mask": mask,
            pipeline.CORRUPT: example[pipeline.CORRUPT]}

  ds = stream.map(make_view, num_parallel_calls=AUTOTUNE, deterministic=True)
  return pipeline.InputIterator(pipeline.batched(ds, batch, config),
                                batch_size=batch,
                                num_examples=source.num_examples)


def make_test_iterator(config: Any, *, batch_size: int,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None
                       ) -> pipeline.InputIterator:
  """One pass over this process's shard of `config.data.eval_split`, padded.

  Args:
    config: the dense-probe config (data, views).
    batch_size: GLOBAL batch size, split evenly over processes.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    An `InputIterator` of {"image": uint8 [b, S, S, 3], "mask": uint8
    [b, S, S], "valid": int32 [b]}; every process gets the same
    `num_batches` (enough for the largest shard), so they stay in step.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  batch = pipeline.per_process_batch(batch_size, process_count)
  source = open_mask_source(config.data, config.data.eval_split,
                            process_index=process_index,
                            process_count=process_count, drop_remainder=False)
  crop, resize = int(config.views.crop_size), int(config.views.resize_size)

  def make_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image, mask = center_view(example["image"], example["label"], resize, crop)
    return {"image": image, "mask": mask, "valid": tf.constant(1, tf.int32)}

  padding = {"image": tf.zeros([crop, crop, 3], tf.uint8),
             "mask": tf.fill([crop, crop], tf.constant(IGNORE, tf.uint8)),
             "valid": tf.constant(0, tf.int32)}
  return pipeline.padded_pass(source, process_count, batch, make_view,
                              padding,
                              prefetch=int(config.data.get("prefetch", 2)))
