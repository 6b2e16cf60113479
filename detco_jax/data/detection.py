"""Image + box streams for detection fine-tuning (the RetinaNet transfer).

Datasets (`config.data.dataset`), each read through a feature layout
(`BOX_FEATURES`, picked by the name's first component or by
`config.data.box_features`):

  * the built-in `detco_shapes`: "boxes", "box_labels" (10 classes), "index"
    as the image id;
  * `coco/2017` (or any `coco/...` config with boxes): "objects/bbox",
    "objects/label" (80 classes), "objects/is_crowd", "image/id";
  * `voc/2007`, `voc/2012`: "objects/bbox", "objects/label" (20 classes),
    "objects/is_difficult"; the image id is the digits of "image/filename"
    (000005.jpg -> 5, 2008_000008.jpg -> 2008000008). TFDS stores VOC's
    1-based pixel indices divided by the size, so the layout moves ymin and
    xmin back by one pixel, as detectron2 does. TFDS's VOC splits are
    train / validation / test: VOC's "trainval" is "train+validation".

Boxes are read as TFDS stores them (normalised [ymin, xmin, ymax, xmax],
pixel-edge convention) and come out as XYXY pixels of the output image.

Two ways to resize (`views.resize`, `BoxViewSpec`):

  * "shortest_edge" (the default config's, detectron2's): training draws
    the shorter side from `views.min_sizes` (the longer at most
    `views.max_size`), flips with `views.flip_prob`, and tests at
    `views.test_min_size`; the image sits at the top left of its
    aspect-ratio group's padded shape (H x W: 800 x 1344 landscape, 1344 x
    800 portrait at DetCo's settings), and every batch is of one group
    (`aspect_groups`). With `data.filter_empty`, images without a box that
    trains are left out of training, as detectron2 does.
  * "longest_edge" (`:square`, the TF Model Garden's): square S x S views,
    described below.

Training on several datasets (the paper's VOC07+12): `config.data.
train_sources`, a sequence of (dataset, split) pairs, replaces (dataset,
train_split), e.g. `(("voc/2007", "train+validation"), ("voc/2012",
"train+validation"))`. All must share the class names of
`config.data.dataset`, which stays the evaluation dataset. Each process reads
its own shard of every part; an epoch is every record of every part once, the
parts interleaved in an order drawn per epoch (not one after the other).

Streams (numpy batches of this process's share b of the global batch; G =
`config.data.max_boxes`):

  * `make_train_iterator`: infinite, resumable. Square views, per example:
    horizontal flip (probability `views.flip_prob`), then multi-scale
    jitter: the image is
    resized (bilinear) so that its LONGER side is S * u, u ~ U(
    `views.scale_range`), then cut at a uniformly drawn offset to S x S where
    larger and padded bottom/right with `views.pad_value` where smaller (TF
    Model Garden's `resize_and_crop_image` rule). Boxes move with the image,
    are clipped to the image, and are dropped if their clipped width or
    height is below `views.min_box_size` pixels; COCO crowd boxes are
    dropped too (VOC difficult boxes are kept, as detectron2 trains on
    them). Keys:
      "image"  uint8 [b, H, W, 3] (H = W = S for square views);
      "boxes"  float32 [b, G, 4] XYXY (x1, y1, x2, y2) in pixels of the
               output image, 0 for padding;
      "labels" int32 [b, G] class ids in [0, K), -1 for padding;
      "valid"  bool [b, G], the kept boxes first, then padding (False).
  * `make_test_iterator`: one pass over this process's shard of
    `config.data.eval_split`, padded to whole batches (`pipeline.
    padded_pass`), group by group for "shortest_edge" views. Per example:
    the shorter side to `views.test_min_size` (or, for square views, the
    longer side to exactly S), padded bottom/right to the padded shape;
    every box is kept (the ground truth of AP).
    Keys: the four above, plus
      "crowd"  bool [b, G] boxes that AP ignores (COCO is_crowd, VOC
               difficult), written as `iscrowd` 1 by `eval.coco`;
      "image_id" int64 [b] the dataset's image id, -1 for padding;
      "mask"   int32 [b] 1 real example, 0 padding (image 0, no boxes);
      "height", "width" int32 [b] the real (unpadded) image inside the
               output: pixels [0, height) x [0, width);
      "source_height", "source_width" int32 [b] the decoded image's size,
               to map boxes back to the dataset's pixels.

Boxes beyond G (after dropping) are cut, in stored order; the iterator counts
them (`BoxIterator.num_truncated`) and strips the count from the batches,
like `num_corrupt`. COCO has at most 93 boxes in an image, so G = 100 keeps
all of them. Without `data.filter_empty`, images without boxes stay in the
stream (all padding).

Seeds and resume follow `pipeline`: the record order of epoch e comes from
(seed_key(config.seed, SeedTag.DETECTION_ORDER), e); slot p of process i
gets its flip, scale and crop from `view_seed(seed_key(config.seed, i,
SeedTag.DETECTION_VIEWS), p)`; `start_step=s` starts at slot s * b, equal
batch for batch to an uninterrupted stream from step s on. Corrupt images are
handled as in `pipeline`.

Training subsets (`config.data.train_fraction` F < 1, the paper's 1-10%
COCO): `train_subset` reads the image id of every training record (the
built-in dataset's "index" is its index in the split, a stable key too)
and keeps the round(F * N) ids (at least 1) that come first when sorted by
SHA-256 of (`data.subset_seed`, id). The ids depend only on the dataset,
F and the subset seed: not on the backbone, the process count or
`config.seed`. `make_train_iterator` then streams the subset's records
(`subset_source`, held in memory) exactly as it streams a whole split, so
resume stays exact.

Config fields read (defaults in brackets):

  config.seed, config.batch_size (GLOBAL, training only);
  config.data: dataset, train_split ["train"], train_sources [None],
    eval_split, box_features [None: from the dataset name; it names the
    layout of `dataset` only, other train_sources go by their names],
    max_boxes [100], train_fraction [1.0], subset_seed [0],
    data_dir, shuffle_buffer, prefetch [2], builtin_image_size /
    builtin_num_train / builtin_num_test (the built-in dataset only);
  config.views: image_size (S, required), scale_range [(0.8, 1.25)],
    flip_prob [0.5], min_box_size [1.0 pixel], pad_value [(124, 116, 104)].
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from detco_jax.data import aspect_groups
from detco_jax.data import pipeline
from detco_jax.data import sources

AUTOTUNE = tf.data.AUTOTUNE

# Element key of the per-example count of boxes cut at `max_boxes`, which
# `BoxIterator` strips and sums.
TRUNCATED = "truncated"

# The ImageNet mean in uint8: padding that the backbone's (ImageNet)
# normalisation maps to about 0, as detectron2 and the TF Model Garden pad
# their normalised images with 0.
PAD_VALUE = (124, 116, 104)


@dataclasses.dataclass(frozen=True)
class BoxFeatures:
  """Where a TFDS dataset keeps its boxes (flat `tf_example_spec` keys).

  Attributes:
    boxes: float [n, 4] normalised [ymin, xmin, ymax, xmax].
    labels: int [n] class ids (a `ClassLabel`, which names the classes).
    image_id: the image id: an int feature, or a file name (see below).
    image: the encoded image.
    id_from_filename: `image_id` is a file name whose digits are the id.
    crowd: bool [n] boxes left out of training and ignored by AP, or None.
    difficult: bool [n] boxes trained on but ignored by AP, or None.
    one_based: the stored minima are 1-based pixel indices over the size
      (VOC through TFDS): ymin and xmin are moved back one pixel.
  """
  boxes: str
  labels: str
  image_id: str
  image: str = "image"
  id_from_filename: bool = False
  crowd: Optional[str] = None
  difficult: Optional[str] = None
  one_based: bool = False

  def keys(self) -> list[str]:
    """The features that decoding parses."""
    return [k for k in (self.image, self.boxes, self.labels, self.image_id,
                        self.crowd, self.difficult) if k is not None]


# Layouts by the dataset name's first component (`config.data.box_features`
# names one for any other dataset stored the same way).
BOX_FEATURES = {
    sources.BUILTIN_NAME: BoxFeatures(boxes="boxes", labels="box_labels",
                                      image_id="index"),
    "coco": BoxFeatures(boxes="objects/bbox", labels="objects/label",
                        image_id="image/id", crowd="objects/is_crowd"),
    "voc": BoxFeatures(boxes="objects/bbox", labels="objects/label",
                       image_id="image/filename", id_from_filename=True,
                       difficult="objects/is_difficult", one_based=True),
}


# How a view resizes an image (`views.resize`).
LONGEST_EDGE = "longest_edge"    # Square S x S views (TF Model Garden).
SHORTEST_EDGE = "shortest_edge"  # detectron2's ResizeShortestEdge.
RESIZES = (LONGEST_EDGE, SHORTEST_EDGE)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BoxViewSpec:
  """Geometry of the detection views, validated (from `config.views`).

  Attributes:
    resize: `LONGEST_EDGE`: square S x S views with scale jitter (the TF
      Model Garden's); `SHORTEST_EDGE`: detectron2's resize of the shorter
      side, each aspect-ratio group padded to its fixed shape.
    image_size: S, the side of the square views (`LONGEST_EDGE`).
    scale_range: training draws the longer side as S * U(scale_range)
      (`LONGEST_EDGE`).
    min_sizes: training draws the shorter side from these (`SHORTEST_EDGE`,
      detectron2's INPUT.MIN_SIZE_TRAIN with sampling "choice").
    test_min_size: the shorter side in testing (INPUT.MIN_SIZE_TEST).
    max_size: the longer side at most (INPUT.MAX_SIZE_TRAIN and _TEST).
    size_divisibility: the padded shapes' sides are multiples of this (the
      FPN's coarsest input stride, as detectron2 pads).
    flip_prob: probability of a horizontal flip in training.
    min_box_size: training drops boxes narrower or lower than this (pixels
      of the output) after clipping; boxes with no area always go.
    pad_value: RGB uint8 fill of the output outside the image.
    max_boxes: G, boxes per example after padding or truncation.
  """
  image_size: int = 0
  resize: str = LONGEST_EDGE
  scale_range: tuple[float, float] = (0.8, 1.25)
  min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
  test_min_size: int = 800
  max_size: int = 1333
  size_divisibility: int = 32
  flip_prob: float = 0.5
  min_box_size: float = 1.0
  pad_value: tuple[int, int, int] = PAD_VALUE
  max_boxes: int = 100

  def __post_init__(self):
    if self.resize not in RESIZES:
      raise ValueError(f"views.resize must be one of {RESIZES}, got "
                       f"{self.resize!r}.")
    if self.resize == LONGEST_EDGE:
      lo, hi = self.scale_range
      if not 0.0 < lo <= hi:
        raise ValueError(f"views.scale_range must be (lo, hi) with 0 < lo "
                         f"<= hi, got {self.scale_range}.")
      if self.image_size < 1:
        raise ValueError(f"views.image_size must be >= 1, got "
                         f"{self.image_size}.")
    else:
      sizes = (*self.min_sizes, self.test_min_size)
      if not self.min_sizes or min(sizes) < 1:
        raise ValueError(f"views.min_sizes and views.test_min_size must be "
                         f">= 1, got {self.min_sizes} and "
                         f"{self.test_min_size}.")
      if self.max_size < max(sizes):
        raise ValueError(f"views.max_size ({self.max_size}) must be at least "
                         f"the largest shorter side ({max(sizes)}).")
      if self.size_divisibility < 1:
        raise ValueError(f"views.size_divisibility must be >= 1, got "
                         f"{self.size_divisibility}.")
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f"views.flip_prob must be in [0, 1], got "
                       f"{self.flip_prob}.")
    if self.min_box_size < 0:
      raise ValueError(f"views.min_box_size must be >= 0, got "
                       f"{self.min_box_size}.")
    if len(self.pad_value) != 3 or not all(0 <= v <= 255
                                           for v in self.pad_value):
      raise ValueError(f"views.pad_value must be 3 values in [0, 255], got "
                       f"{self.pad_value}.")
    if self.max_boxes < 1:
      raise ValueError(f"data.max_boxes must be >= 1, got {self.max_boxes}.")

  @property
  def grouped(self) -> bool:
    """Whether batches are of one aspect-ratio group (`SHORTEST_EDGE`)."""
    return self.resize == SHORTEST_EDGE

  def padded_shape(self, group: int = aspect_groups.PORTRAIT
                   ) -> tuple[int, int]:
    """(height, width) of every output of an aspect-ratio group.

    Args:
      group: `aspect_groups.LANDSCAPE` or `PORTRAIT` (ignored for square
        views).

    Returns:
      (S, S) for `LONGEST_EDGE`; for `SHORTEST_EDGE`, (short, long) for
      landscape and (long, short) for portrait, where short is the largest
      shorter side and long `max_size`, each rounded up to
      `size_divisibility`: the shape of detectron2's largest padded batch.
    """
    if not self.grouped:
      return self.image_size, self.image_size
    d = self.size_divisibility
    short = _round_up(max(*self.min_sizes, self.test_min_size), d)
    long = _round_up(self.max_size, d)
    return (short, long) if group == aspect_groups.LANDSCAPE else (long,
                                                                   short)

  def padded_shapes(self) -> tuple[tuple[int, int], ...]:
    """The distinct output shapes: the programs a run compiles per step."""
    return tuple(dict.fromkeys(self.padded_shape(g)
                               for g in aspect_groups.GROUPS))

  @classmethod
  def from_config(cls, config: Any) -> "BoxViewSpec":
    """The spec of `config.views` and `config.data.max_boxes`.

    Args:
      config: the experiment config.

    Returns:
      The validated spec.
    """
    v = config.views
    pad = v.get("pad_value", PAD_VALUE)
    pad = (int(pad),) * 3 if np.ndim(pad) == 0 else tuple(int(p) for p in pad)
    defaults = cls.__dataclass_fields__
    get = lambda key: v.get(key, defaults[key].default)
    return cls(
        resize=str(get("resize")),
        image_size=int(get("image_size")),
        scale_range=tuple(float(s) for s in get("scale_range")),
        min_sizes=tuple(int(s) for s in get("min_sizes")),
        test_min_size=int(get("test_min_size")),
        max_size=int(get("max_size")),
        size_divisibility=int(get("size_divisibility")),
        flip_prob=float(get("flip_prob")),
        min_box_size=float(get("min_box_size")),
        pad_value=pad,
        max_boxes=int(config.data.get("max_boxes", 100)))


class BoxIterator(pipeline.InputIterator):
  """An `InputIterator` that also counts the boxes cut at `max_boxes`."""

  def __init__(self, dataset: tf.data.Dataset, **kwargs: Any):
    super().__init__(dataset, **kwargs)
    self._num_truncated = 0

  @classmethod
  def of(cls, iterator: pipeline.InputIterator) -> "BoxIterator":
    """The same stream as `iterator` (e.g. `pipeline.padded_pass`'s).

    Args:
      iterator: an iterator not read yet; it is left unused.

    Returns:
      A `BoxIterator` over `iterator.dataset`.
    """
    return cls(iterator.dataset, batch_size=iterator.batch_size,
               num_examples=iterator.num_examples,
               num_batches=iterator.num_batches)

  @property
  def num_truncated(self) -> int:
    """Boxes beyond `max_boxes` left out of the batches handed out."""
    return self._num_truncated

  def __next__(self) -> dict[str, np.ndarray]:
    batch = super().__next__()
    self._num_truncated += int(batch.pop(TRUNCATED).sum())
    return batch


# ----------------------------------------------------------------------------
# Sources: records of one or more TFDS datasets, decoded with their boxes.


def box_features(config_data: Any) -> BoxFeatures:
  """The feature layout of `config_data.dataset`.

  Args:
    config_data: the `config.data` section (dataset, box_features).

  Returns:
    `BOX_FEATURES[config.data.box_features]` if set, else the entry of the
    dataset name's first component ("coco/2017" -> "coco").

  Raises:
    sources.DatasetUnavailableError: no layout for the dataset.
  """
  name = config_data.dataset
  key = config_data.get("box_features") or name.split("/")[0].split(":")[0]
  if key not in BOX_FEATURES:
    raise sources.DatasetUnavailableError(
        f"No box feature layout for dataset {name!r}: detection reads "
        f"{sorted(BOX_FEATURES)}. For a TFDS dataset stored like one of them, "
        "set config.data.box_features to its name.")
  return BOX_FEATURES[key]


def _class_label(features: Any, key: str) -> tfds.features.ClassLabel:
  """The `ClassLabel` of a flat key such as "objects/label" or "box_labels"."""
  feature, rest = features, key
  while rest:
    if rest in feature:
      feature, rest = feature[rest], ""
    else:
      head, _, rest = rest.partition("/")
      feature = feature[head]
  while isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  if not isinstance(feature, tfds.features.ClassLabel):
    raise sources.DatasetUnavailableError(
        f"Box label feature {key!r} is not a ClassLabel: {feature}.")
  return feature


def _class_names(config_data: Any) -> tuple[str, ...]:
  layout = box_features(config_data)
  features = sources.tfds_builder(config_data).info.features
  return tuple(_class_label(features, layout.labels).names)


def _brief(names: Sequence[str]) -> str:
  """A class list for an error message: its size and first names."""
  return f"({len(names)}: {', '.join(names[:3])}, ...)"


def class_names(config: Any) -> tuple[str, ...]:
  """The names of the detection classes of `config.data.dataset`, in id order.

  Args:
    config: the experiment config (`data`).

  Returns:
    K names; class id k (a "labels" value) is `class_names(config)[k]`.
  """
  return _class_names(config.data)


def num_classes(config: Any) -> int:
  """K, the number of detection classes of `config.data.dataset`."""
  return len(class_names(config))


def _as_image_id(value: tf.Tensor, layout: BoxFeatures) -> tf.Tensor:
  """The int64 image id of a parsed `layout.image_id` feature."""
  if layout.id_from_filename:
    digits = tf.strings.regex_replace(value, "[^0-9]", "")
    value = tf.strings.to_number(digits, tf.int64)
  return tf.cast(value, tf.int64)


def make_id_reader(features: Any, layout: BoxFeatures
                   ) -> Callable[[tf.Tensor], tf.Tensor]:
  """Reads only the image id of one serialized example (graph code).

  Args:
    features: the dataset's `tfds.features.FeaturesDict`.
    layout: where its image id is.

  Returns:
    `read(serialized)` -> int64 scalar, the id `make_decoder` gives.
  """
  key = layout.image_id
  parse_spec = {key: features.tf_example_spec[key]}
  return lambda serialized: _as_image_id(
      tf.io.parse_single_example(serialized, parse_spec)[key], layout)


def make_meta_reader(features: Any, layout: BoxFeatures
                     ) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """Reads an example's image size and trainable boxes, not its pixels.

  Args:
    features: the dataset's `tfds.features.FeaturesDict`.
    layout: where its image and boxes are.

  Returns:
    `read(serialized)` -> {"height": int32, "width": int32, "boxes": int32,
    the boxes that train (not crowd)}; a JPEG's size comes from its header
    (`aspect_groups.encoded_image_size`).
  """
  spec = features.tf_example_spec
  keys = [k for k in (layout.image, layout.labels, layout.crowd) if k]
  parse_spec = {k: spec[k] for k in keys}

  def read(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    example = tf.io.parse_single_example(serialized, parse_spec)
    size = aspect_groups.encoded_image_size(example[layout.image])
    boxes = tf.size(example[layout.labels])
    if layout.crowd:
      boxes -= tf.reduce_sum(tf.cast(tf.cast(example[layout.crowd], tf.bool),
                                     tf.int32))
    return {"height": size[0], "width": size[1], "boxes": boxes}

  return read


def make_decoder(features: Any, layout: BoxFeatures
                 ) -> Callable[[tf.Tensor], dict[str, Any]]:
  """Decoding of one serialized TFDS example with boxes (graph code).

  Args:
    features: the dataset's `tfds.features.FeaturesDict`.
    layout: where its boxes are.

  Returns:
    `decode(serialized)` -> {"image": uint8 [H, W, 3], "label": {"boxes":
    float32 [n, 4] normalised [ymin, xmin, ymax, xmax], "classes": int32
    [n], "crowd": bool [n], "difficult": bool [n], "image_id": int64}}. The
    objects travel as the record's "label", so that the pipeline's slot
    stream carries them unchanged.

  Raises:
    sources.DatasetUnavailableError: a feature of the layout is missing.
  """
  spec = features.tf_example_spec
  missing = [k for k in layout.keys() if k not in spec]
  if missing:
    raise sources.DatasetUnavailableError(
        f"The dataset has no features {missing} of its box layout (set "
        f"config.data.box_features); features: {sorted(spec)}.")
  parse_spec = {k: spec[k] for k in layout.keys()}

  def flags(example: dict[str, tf.Tensor], key: Optional[str],
            n: tf.Tensor) -> tf.Tensor:
    if key is None:
      return tf.zeros([n], tf.bool)
    return tf.cast(example[key], tf.bool)

  def decode(serialized: tf.Tensor) -> dict[str, Any]:
    example = tf.io.parse_single_example(serialized, parse_spec)
    image = sources.decode_image(example[layout.image])
    boxes = tf.reshape(tf.cast(example[layout.boxes], tf.float32), [-1, 4])
    if layout.one_based:
      pixel = 1.0 / tf.cast(tf.shape(image)[:2], tf.float32)
      boxes = tf.maximum(boxes - tf.concat([pixel, [0.0, 0.0]], 0), 0.0)
    n = tf.shape(boxes)[0]
    objects = {
        "boxes": boxes,
        "classes": tf.cast(example[layout.labels], tf.int32),
        "crowd": flags(example, layout.crowd, n),
        "difficult": flags(example, layout.difficult, n),
        "image_id": _as_image_id(example[layout.image_id], layout),
    }
    return {"image": image, "label": objects}

  return decode


def _part_config(config_data: Any, dataset: str) -> Any:
  """`config_data` reading `dataset` instead of its own.

  `box_features` names the layout of `config_data.dataset`; another dataset
  gets the layout of its name.
  """
  if dataset == config_data.dataset:
    return config_data
  part = ml_collections.ConfigDict(config_data.to_dict())
  part.dataset = dataset
  part.box_features = None
  return part


def train_parts(config_data: Any) -> list[tuple[str, str]]:
  """The (dataset, split) pairs of training.

  Args:
    config_data: the `config.data` section.

  Returns:
    `train_sources` if set, else [(dataset, train_split)].
  """
  parts = config_data.get("train_sources")
  if not parts:
    return [(config_data.dataset, config_data.get("train_split", "train"))]
  return [(str(dataset), str(split)) for dataset, split in parts]


def open_box_source(config_data: Any, parts: Sequence[tuple[str, str]], *,
                    process_index: int, process_count: int,
                    drop_remainder: bool) -> sources.Source:
  """This process's shard of the (dataset, split) parts, as one source.

  Args:
    config_data: the `config.data` section.
    parts: (dataset, split) pairs; their classes must be those of
      `config_data.dataset`.
    process_index: this process.
    process_count: number of processes.
    drop_remainder: equal shards per part (training) or every example.

  Returns:
    A source whose records are {"part": int32, "record": serialized} and
    whose `decode` is `make_decoder`'s for the record's part.
    `records(seed)` interleaves the parts in a seeded order that takes every
    record of every part once; without a seed it reads them in order.

  Raises:
    sources.DatasetUnavailableError: a folder dataset, a missing dataset or
      feature.
    ValueError: parts whose class names differ from the dataset's.
  """
  # Training parts must name the classes of the evaluation dataset.
  expected = (None if all(d == config_data.dataset for d, _ in parts)
              else _class_names(config_data))
  shards, decoders = [], []
  for dataset, split in parts:
    if dataset.startswith(sources.FOLDER_PREFIX):
      raise sources.DatasetUnavailableError(
          f"Detection needs boxes; {dataset!r} is a folder of images. Use "
          f"a TFDS dataset with boxes ({', '.join(sorted(BOX_FEATURES))}).")
    part_data = _part_config(config_data, dataset)
    layout = box_features(part_data)
    features = sources.tfds_builder(part_data).info.features
    names = tuple(_class_label(features, layout.labels).names)
    if expected is not None and names != expected:
      raise ValueError(
          f"Detection dataset {dataset!r} has the classes {_brief(names)}, "
          f"unlike {config_data.dataset!r} (config.data.dataset) "
          f"{_brief(expected)}: config.data.train_sources must share the "
          "classes of the evaluation dataset.")
    expected = names
    decoders.append(make_decoder(features, layout))
    shards.append(sources.open_source(
        part_data, split, process_index=process_index,
        process_count=process_count, drop_remainder=drop_remainder))
  counts = [s.num_examples for s in shards]

  def records(seed: Optional[tf.Tensor]) -> tf.data.Dataset:
    streams = [
        s.records(None if seed is None else
                  tf.random.experimental.stateless_fold_in(seed, i))
        .map(lambda r, i=i: {"part": tf.constant(i, tf.int32), "record": r})
        for i, s in enumerate(shards)]
    if len(streams) == 1:
      return streams[0]
    if seed is None:
      ds = streams[0]
      for s in streams[1:]:
        ds = ds.concatenate(s)
      return ds
    # Exactly counts[i] draws of part i, in a seeded order: the epoch mixes
    # the parts throughout, and still reads every record once.
    choice = tf.concat([tf.fill([n], tf.constant(i, tf.int64))
                        for i, n in enumerate(counts)], 0)
    choice = tf.random.experimental.stateless_shuffle(choice, seed)
    return tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.from_tensor_slices(choice))

  def decode(record: dict[str, tf.Tensor]) -> dict[str, Any]:
    if len(decoders) == 1:
      return decoders[0](record["record"])
    return tf.switch_case(record["part"], [
        lambda d=d: d(record["record"]) for d in decoders])

  first = shards[0]
  return sources.Source(
      name="+".join(s.name for s in shards),
      split="+".join(s.split for s in shards), num_examples=sum(counts),
      split_size=sum(s.split_size for s in shards), num_classes=len(expected),
      process_index=first.process_index, process_count=first.process_count,
      _records=records, _decode=decode)


# ----------------------------------------------------------------------------
# Training subsets: `data.train_fraction` of the training images, by id.


@dataclasses.dataclass(frozen=True)
class TrainSubset:
  """The training images a run with `data.train_fraction` < 1 trains on.

  Attributes:
    parts: the training (dataset, split) pairs (`train_parts`).
    fraction: `data.train_fraction`.
    seed: `data.subset_seed`.
    total: N, the training images the subset is drawn from.
    ids: int64 [round(fraction * N) or 1], the chosen image ids, sorted.
  """
  parts: tuple[tuple[str, str], ...]
  fraction: float
  seed: int
  total: int
  ids: np.ndarray

  def to_json(self) -> dict[str, Any]:
    """The subset as the workdir's record of it (JSON types only)."""
    return {"parts": [list(p) for p in self.parts],
            "fraction": self.fraction, "seed": self.seed,
            "count": len(self.ids), "total": self.total,
            "ids": [int(i) for i in self.ids]}


def _id_readers(config_data: Any, parts: Sequence[tuple[str, str]]
                ) -> list[Callable[[tf.Tensor], tf.Tensor]]:
  """`make_id_reader` of each training part, in the order of `parts`."""
  readers = []
  for dataset, _ in parts:
    part_data = _part_config(config_data, dataset)
    features = sources.tfds_builder(part_data).info.features
    readers.append(make_id_reader(features, box_features(part_data)))
  return readers


def _record_id(record: dict[str, tf.Tensor],
               readers: Sequence[Callable[[tf.Tensor], tf.Tensor]]
               ) -> tf.Tensor:
  """The image id of an `open_box_source` record, read by its part."""
  if len(readers) == 1:
    return readers[0](record["record"])
  return tf.switch_case(record["part"], [
      lambda r=r: r(record["record"]) for r in readers])


def record_meta(config_data: Any, parts: Sequence[tuple[str, str]]
                ) -> aspect_groups.MetaReader:
  """`make_meta_reader` for the records of `open_box_source(parts)`.

  Args:
    config_data: the `config.data` section.
    parts: the source's (dataset, split) pairs.

  Returns:
    record -> {"height", "width", "boxes"}, read by the record's part.
  """
  readers = []
  for dataset, _ in parts:
    part_data = _part_config(config_data, dataset)
    features = sources.tfds_builder(part_data).info.features
    readers.append(make_meta_reader(features, box_features(part_data)))

  def meta(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    if len(readers) == 1:
      return readers[0](record["record"])
    return tf.switch_case(record["part"], [
        lambda r=r: r(record["record"]) for r in readers])

  return meta


def _whole_training_source(config_data: Any) -> sources.Source:
  """Every training record, in the fixed read order of one process."""
  return open_box_source(config_data, train_parts(config_data),
                         process_index=0, process_count=1,
                         drop_remainder=False)


def read_train_ids(config_data: Any) -> np.ndarray:
  """The image ids of every training image, in a fixed read order.

  The same on every process and for any process count: the whole training
  split (every part of `train_sources`), read without a seed.

  Args:
    config_data: the `config.data` section.

  Returns:
    int64 [N].
  """
  readers = _id_readers(config_data, train_parts(config_data))
  ds = _whole_training_source(config_data).records(None).map(
      lambda r: _record_id(r, readers), num_parallel_calls=AUTOTUNE,
      deterministic=True).batch(4096)
  return np.concatenate([np.zeros([0], np.int64), *ds.as_numpy_iterator()])


def subset_size(fraction: float, total: int) -> int:
  """round(fraction * total), at least 1 (Python's round: half to even).

  Args:
    fraction: in (0, 1].
    total: N > 0.

  Returns:
    The subset's image count.

  Raises:
    ValueError: a fraction outside (0, 1].
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError("Bad config: data.train_fraction (train_fraction=F) "
                     f"must be in (0, 1], got {fraction}.")
  return max(1, round(fraction * total))


def _subset_rank(seed: int, image_id: int) -> bytes:
  """The sort key of an id: SHA-256 of (seed, id), the same in any run."""
  return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()


def draw_subset(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """The `subset_size` ids first by `_subset_rank`, sorted.

  Depends only on the set of ids, the fraction and the seed: not on their
  order, the backbone, the process count or the run's shuffle seed.

  Args:
    ids: int [N] distinct image ids.
    fraction: in (0, 1].
    seed: `data.subset_seed`.

  Returns:
    int64 [subset_size(fraction, N)], sorted.

  Raises:
    ValueError: a fraction outside (0, 1], or an id given twice (the draw
      would not be exact).
  """
  ids = np.asarray(ids, np.int64)
  count = subset_size(fraction, len(ids))
  if len(np.unique(ids)) != len(ids):
    raise ValueError("train_fraction draws training images by image id, "
                     "but some ids repeat in the training parts.")
  ranked = sorted(ids.tolist(), key=lambda i: _subset_rank(seed, i))
  return np.sort(np.asarray(ranked[:count], np.int64))


def train_subset(config: Any) -> Optional[TrainSubset]:
  """The subset of `config.data.train_fraction`, or None to train on all.

  Args:
    config: the detection config (`data.train_fraction` [1.0],
      `data.subset_seed` [0]).

  Returns:
    None for a fraction of 1; else the subset, drawn by `draw_subset` from
    `read_train_ids` (a read of every training record's id).

  Raises:
    ValueError: a fraction outside (0, 1].
  """
  fraction = float(config.data.get("train_fraction", 1.0))
  subset_size(fraction, 1)  # Checks the fraction before any reading.
  if fraction == 1.0:
    return None
  seed = int(config.data.get("subset_seed", 0))
  ids = read_train_ids(config.data)
  return TrainSubset(parts=tuple(train_parts(config.data)),
                     fraction=fraction, seed=seed, total=len(ids),
                     ids=draw_subset(ids, fraction, seed))


def subset_source(config_data: Any, subset: TrainSubset, *,
                  process_index: int, process_count: int) -> sources.Source:
  """This process's share of the subset's records, held in memory.

  The subset's records, in the fixed read order of `read_train_ids`, go to
  the processes in turn (record r to process r % process_count), each
  keeping count // process_count of them (the remainder is dropped, as
  training shards drop theirs). Each epoch is an exact seeded permutation
  of the share. The records stay in host memory: about 160 KB a COCO image,
  so 10% of COCO 2017 holds about 1.9 GB over all processes.

  Args:
    config_data: the `config.data` section.
    subset: from `train_subset`.
    process_index: this process.
    process_count: number of processes.

  Returns:
    A source like `open_box_source`'s, of the share alone.

  Raises:
    sources.DatasetUnavailableError: fewer subset images than processes.
    ValueError: the training records no longer hold the subset's ids.
  """
  whole = _whole_training_source(config_data)
  readers = _id_readers(config_data, train_parts(config_data))
  chosen = tf.constant(subset.ids, tf.int64)
  last = len(subset.ids) - 1

  def chosen_record(record: dict[str, tf.Tensor]) -> tf.Tensor:
    image_id = _record_id(record, readers)
    at = tf.minimum(tf.searchsorted(chosen, image_id[None])[0], last)
    return tf.equal(chosen[at], image_id)

  kept = list(whole.records(None).filter(chosen_record).as_numpy_iterator())
  if len(kept) != len(subset.ids):
    raise ValueError(
        f"The training records hold {len(kept)} of the subset's "
        f"{len(subset.ids)} image ids: the dataset changed under the subset.")
  share = kept[process_index::process_count][:len(kept) // process_count]
  if not share:
    raise sources.DatasetUnavailableError(
        f"Process {process_index} of {process_count} gets no image of the "
        f"{len(kept)}-image training subset: raise data.train_fraction.")
  part = tf.constant([r["part"] for r in share], tf.int32)
  serialized = tf.constant([r["record"] for r in share], tf.string)
  n = len(share)

  def records(seed: Optional[tf.Tensor]) -> tf.data.Dataset:
    return sources.index_order(n, seed).map(
        lambda i: {"part": tf.gather(part, i),
                   "record": tf.gather(serialized, i)})

  return sources.Source(
      name=whole.name, split=whole.split, num_examples=n,
      split_size=whole.split_size, num_classes=whole.num_classes,
      process_index=process_index, process_count=process_count,
      _records=records, _decode=whole.decode)


# ----------------------------------------------------------------------------
# Views: one geometry for image and boxes.


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Where an image lands in the S x S output (int32 / bool scalar tensors).

  The (flipped) image is resized to height x width, and the output shows its
  window [top, top + S) x [left, left + S), padded where it ends early.

  Attributes:
    flip: mirror the source horizontally first.
    height: resized height.
    width: resized width.
    top: first row of the window.
    left: first column of the window.
  """
  flip: tf.Tensor
  height: tf.Tensor
  width: tf.Tensor
  top: tf.Tensor
  left: tf.Tensor


def _geometry(image_shape: tf.Tensor, size: int, longer_side: tf.Tensor,
              offsets: tf.Tensor, flip: tf.Tensor) -> Geometry:
  """The geometry that resizes the longer side to `longer_side` pixels.

  Args:
    image_shape: (height, width, ...) of the source.
    size: S.
    longer_side: float64 target length of the longer side.
    offsets: float64 [2] in [0, 1): where the window starts, as a fraction
      of the room (resized side - S + 1) along y and x.
    flip: bool scalar.

  Returns:
    The geometry; each resized side is at least 1 pixel.
  """
  shape = tf.cast(image_shape[:2], tf.float64)
  scale = longer_side / tf.reduce_max(shape)
  resized = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
  room = tf.maximum(resized - size, 0)
  start = tf.cast(tf.floor(offsets * tf.cast(room + 1, tf.float64)), tf.int32)
  start = tf.minimum(start, room)
  return Geometry(flip=flip, height=resized[0], width=resized[1],
                  top=start[0], left=start[1])


def sample_geometry(seed: tf.Tensor, image_shape: tf.Tensor,
                    spec: BoxViewSpec) -> Geometry:
  """The training geometry of one example: flip, scale jitter and crop.

  Args:
    seed: [2] int stateless seed (the slot's `pipeline.view_seed`).
    image_shape: (height, width, ...) of the source image.
    spec: the view spec.

  Returns:
    The longer side resized to S * u, u ~ U(spec.scale_range); the window's
    offsets uniform over the whole-pixel positions; a flip with probability
    `spec.flip_prob`.
  """
  u = tf.random.stateless_uniform([4], seed, dtype=tf.float64)
  lo, hi = spec.scale_range
  longer = spec.image_size * (lo + (hi - lo) * u[0])
  return _geometry(image_shape, spec.image_size, longer, u[1:3],
                   u[3] < spec.flip_prob)


def test_geometry(image_shape: tf.Tensor, size: int) -> Geometry:
  """The fixed test geometry: the longer side to exactly `size`, no flip."""
  return _geometry(image_shape, size, tf.constant(size, tf.float64),
                   tf.zeros([2], tf.float64), tf.constant(False))


def shortest_edge_size(image_shape: tf.Tensor, short: tf.Tensor,
                       max_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """detectron2's `ResizeShortestEdge.get_output_shape`, in float64.

  The shorter side goes to `short`; if the longer one then exceeds
  `max_size`, both shrink so that it is `max_size`; each side is rounded
  half up.

  Args:
    image_shape: (height, width, ...) of the source.
    short: the shorter side's target length (int or float scalar).
    max_size: the longer side at most.

  Returns:
    (height, width), int32 scalars.
  """
  h, w = tf.unstack(tf.cast(image_shape[:2], tf.float64))
  short = tf.cast(short, tf.float64)
  scale = short / tf.minimum(h, w)
  new_h = tf.where(h < w, short, scale * h)
  new_w = tf.where(h < w, scale * w, short)
  longest = tf.maximum(new_h, new_w)
  shrink = tf.where(longest > max_size, max_size / longest,
                    tf.constant(1.0, tf.float64))
  as_int = lambda x: tf.cast(tf.floor(x * shrink + 0.5), tf.int32)
  return as_int(new_h), as_int(new_w)


def shortest_edge_geometry(image_shape: tf.Tensor, short: tf.Tensor,
                           max_size: int, flip: tf.Tensor) -> Geometry:
  """The whole image resized by `shortest_edge_size`, at the top left."""
  height, width = shortest_edge_size(image_shape, short, max_size)
  zero = tf.constant(0, tf.int32)
  return Geometry(flip=flip, height=height, width=width, top=zero,
                  left=zero)


def sample_shortest_edge_geometry(seed: tf.Tensor, image_shape: tf.Tensor,
                                  spec: BoxViewSpec) -> Geometry:
  """detectron2's training augmentation: ResizeShortestEdge, RandomFlip.

  Args:
    seed: [2] int stateless seed of the slot.
    image_shape: (height, width, ...) of the source image.
    spec: the view spec (`SHORTEST_EDGE`).

  Returns:
    The shorter side drawn uniformly from `spec.min_sizes` ("choice"), the
    longer at most `spec.max_size`, a flip with probability
    `spec.flip_prob`.
  """
  u = tf.random.stateless_uniform([2], seed, dtype=tf.float64)
  sizes = tf.constant(spec.min_sizes, tf.int32)
  pick = tf.minimum(tf.cast(u[0] * len(spec.min_sizes), tf.int32),
                    len(spec.min_sizes) - 1)
  return shortest_edge_geometry(image_shape, sizes[pick], spec.max_size,
                                u[1] < spec.flip_prob)


def render(image: tf.Tensor, geometry: Geometry, spec: BoxViewSpec,
           shape: Optional[tuple[int, int]] = None) -> tf.Tensor:
  """The output image of a geometry (bilinear, half-pixel centres).

  Square views resize without antialiasing (as they always have here);
  `SHORTEST_EDGE` views antialias when they shrink, as PIL's bilinear
  resize in detectron2's `ResizeTransform` does.

  Args:
    image: uint8 [H, W, 3].
    geometry: where it lands.
    spec: the view spec (image_size, pad_value, resize).
    shape: the output's (height, width); None: `spec.padded_shape()`.

  Returns:
    uint8 [height, width, 3].
  """
  out_h, out_w = shape or spec.padded_shape()
  image = tf.cond(geometry.flip, lambda: tf.reverse(image, axis=[1]),
                  lambda: image)
  resized = tf.image.resize(image, tf.stack([geometry.height, geometry.width]),
                            method="bilinear", antialias=spec.grouped)
  window = resized[geometry.top:geometry.top + out_h,
                   geometry.left:geometry.left + out_w]
  pad = tf.constant(spec.pad_value, tf.float32)
  room = tf.constant([out_h, out_w]) - tf.shape(window)[:2]
  # Padding with 0 around (window - pad) and adding pad back fills the
  # outside with the per-channel `pad` value.
  canvas = tf.pad(window - pad, [[0, room[0]], [0, room[1]], [0, 0]]) + pad
  return tf.ensure_shape(tf.saturate_cast(tf.round(canvas), tf.uint8),
                         [out_h, out_w, 3])


def pixel_boxes(boxes: tf.Tensor, geometry: Geometry,
                shape: int | tuple[int, int]) -> tf.Tensor:
  """Normalised source boxes -> XYXY pixels of the output, clipped.

  With half-pixel centres, a resize maps edge coordinates linearly (y ->
  y * height / H), so a normalised box lands at exactly [ymin * height,
  ...] of the resized image; the flip mirrors x -> 1 - x before.

  Args:
    boxes: float32 [n, 4] normalised [ymin, xmin, ymax, xmax].
    geometry: where the image lands.
    shape: the output's (height, width), or S for S x S.

  Returns:
    float32 [n, 4] (x1, y1, x2, y2), clipped to the image's part of the
    output: [0, min(width, resized width - left)] x [0, min(height,
    resized height - top)].
  """
  out_h, out_w = (shape, shape) if np.ndim(shape) == 0 else shape
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=1)
  xmin, xmax = (tf.where(geometry.flip, 1.0 - xmax, xmin),
                tf.where(geometry.flip, 1.0 - xmin, xmax))
  h = tf.cast(geometry.height, tf.float32)
  w = tf.cast(geometry.width, tf.float32)
  top = tf.cast(geometry.top, tf.float32)
  left = tf.cast(geometry.left, tf.float32)
  y_max = tf.minimum(float(out_h), h - top)
  x_max = tf.minimum(float(out_w), w - left)
  ys = [tf.clip_by_value(y * h - top, 0.0, y_max) for y in (ymin, ymax)]
  xs = [tf.clip_by_value(x * w - left, 0.0, x_max) for x in (xmin, xmax)]
  return tf.stack([xs[0], ys[0], xs[1], ys[1]], axis=1)


def pack(keep: tf.Tensor, max_boxes: int, **per_box: tf.Tensor
         ) -> dict[str, tf.Tensor]:
  """The kept boxes first, padded or cut to `max_boxes`.

  Args:
    keep: bool [n].
    max_boxes: G.
    **per_box: [n, ...] tensors to pack alike; "labels" pads with -1, the
      others with 0 / False.

  Returns:
    Each of `per_box` as [G, ...], "valid" bool [G] and `TRUNCATED` (int32:
    kept boxes beyond G).
  """
  index = tf.where(keep)[:, 0]
  kept = tf.size(index)
  index = index[:max_boxes]
  count = tf.size(index)
  out = {}
  for key, value in per_box.items():
    value = tf.gather(value, index)
    fill = -1 if key == "labels" else 0
    padding = [[0, max_boxes - count]] + [[0, 0]] * (value.shape.rank - 1)
    value = tf.pad(value, padding, constant_values=tf.cast(fill, value.dtype))
    out[key] = tf.ensure_shape(value, [max_boxes] + value.shape[1:])
  out["valid"] = tf.range(max_boxes) < count
  out[TRUNCATED] = tf.cast(kept - count, tf.int32)
  return out


def train_view(image: tf.Tensor, objects: dict[str, tf.Tensor],
               seed: tf.Tensor, spec: BoxViewSpec,
               group: int = aspect_groups.PORTRAIT) -> dict[str, tf.Tensor]:
  """One training example, its boxes moved alike.

  Square views: flip, scale jitter, crop / pad to S x S. `SHORTEST_EDGE`
  views: detectron2's resize and flip, padded bottom / right to the
  group's shape.

  Args:
    image: uint8 [H, W, 3].
    objects: the decoded "label" of `make_decoder`.
    seed: [2] int stateless seed of the slot.
    spec: the view spec.
    group: the image's aspect-ratio group (`SHORTEST_EDGE` only).

  Returns:
    {"image": uint8 [height, width, 3] (`spec.padded_shape(group)`),
    "boxes": float32 [G, 4] XYXY pixels, "labels": int32 [G], "valid": bool
    [G], TRUNCATED: int32}.
  """
  shape = spec.padded_shape(group)
  if spec.grouped:
    geometry = sample_shortest_edge_geometry(seed, tf.shape(image), spec)
  else:
    geometry = sample_geometry(seed, tf.shape(image), spec)
  boxes = pixel_boxes(objects["boxes"], geometry, shape)
  width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  keep = ((width >= spec.min_box_size) & (height >= spec.min_box_size) &
          (width > 0) & (height > 0) & ~objects["crowd"])
  out = pack(keep, spec.max_boxes, boxes=boxes, labels=objects["classes"])
  out["image"] = render(image, geometry, spec, shape)
  return out


def test_view(image: tf.Tensor, objects: dict[str, tf.Tensor],
              spec: BoxViewSpec,
              group: int = aspect_groups.PORTRAIT) -> dict[str, tf.Tensor]:
  """One test example, padded; every box kept.

  Square views resize the longer side to S; `SHORTEST_EDGE` views the
  shorter side to `spec.test_min_size` (the longer at most `max_size`).

  Args:
    image: uint8 [H, W, 3].
    objects: the decoded "label" of `make_decoder`.
    spec: the view spec.
    group: the image's aspect-ratio group (`SHORTEST_EDGE` only).

  Returns:
    The test stream's per-example keys (module docstring) but "mask".
  """
  shape = spec.padded_shape(group)
  if spec.grouped:
    geometry = shortest_edge_geometry(tf.shape(image), spec.test_min_size,
                                      spec.max_size, tf.constant(False))
  else:
    geometry = test_geometry(tf.shape(image), spec.image_size)
  boxes = pixel_boxes(objects["boxes"], geometry, shape)
  keep = tf.ones([tf.shape(boxes)[0]], tf.bool)
  out = pack(keep, spec.max_boxes, boxes=boxes, labels=objects["classes"],
             crowd=objects["crowd"] | objects["difficult"])
  source_shape = tf.shape(image)
  out.update(image=render(image, geometry, spec, shape),
             image_id=objects["image_id"], height=geometry.height,
             width=geometry.width, source_height=source_shape[0],
             source_width=source_shape[1])
  return out


# ----------------------------------------------------------------------------
# Streams.


def train_source(config: Any, *, process_index: Optional[int] = None,
                 process_count: Optional[int] = None,
                 subset: Optional[TrainSubset] = None) -> sources.Source:
  """This process's training shard: of the whole split, or of the subset.

  A subset's shard reads the whole training split to pick its records, so
  a job opens it once and hands it to `count_train_groups` and every
  `make_train_iterator`.

  Args:
    config: the detection config.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    subset: the run's `train_subset`, if any.

  Returns:
    The shard.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  if subset is None:
    return open_box_source(config.data, train_parts(config.data),
                           process_index=process_index,
                           process_count=process_count, drop_remainder=True)
  return subset_source(config.data, subset, process_index=process_index,
                       process_count=process_count)


def _min_train_boxes(config: Any) -> int:
  """1 when `data.filter_empty` leaves images without a box out of training.

  detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS (on by default) trains
  only on images with at least one box that is not crowd.
  """
  return int(bool(config.data.get("filter_empty", False)))


def _test_source(config: Any, process_index: int,
                 process_count: int) -> sources.Source:
  return open_box_source(
      config.data, [(config.data.dataset, config.data.eval_split)],
      process_index=process_index, process_count=process_count,
      drop_remainder=False)


def count_train_groups(config: Any, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None,
                       subset: Optional[TrainSubset] = None,
                       source: Optional[sources.Source] = None
                       ) -> tuple[np.ndarray, int]:
  """The training images of each aspect-ratio group in this process's shard.

  Reads every record's size once (`aspect_groups.count_groups`). With
  `data.filter_empty`, images without a trainable box count in no group.

  Args:
    config: the detection config.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    subset: the run's `train_subset`, if any.
    source: `train_source(config, ...)` if already open.

  Returns:
    (int64 [2] (landscape, portrait) images, records left out).
  """
  source = source or train_source(config, process_index=process_index,
                                  process_count=process_count, subset=subset)
  return aspect_groups.count_groups(
      source, record_meta(config.data, train_parts(config.data)),
      min_boxes=_min_train_boxes(config))


def count_test_groups(config: Any, *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None
                      ) -> tuple[np.ndarray, int]:
  """The test images of each aspect-ratio group in this process's shard.

  Args:
    config: the detection config.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.

  Returns:
    As `count_train_groups`, with every image counted.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  source = _test_source(config, process_index, process_count)
  return aspect_groups.count_groups(
      source, record_meta(config.data, [(config.data.dataset,
                                         config.data.eval_split)]))


def _group_counts(counts: Optional[aspect_groups.GroupCounts],
                  count: Callable[[], tuple[np.ndarray, int]],
                  process_count: int) -> aspect_groups.GroupCounts:
  """The given counts, or this single process's own."""
  if counts is not None:
    if len(counts.counts) != process_count:
      raise ValueError(f"group_counts has {len(counts.counts)} processes' "
                       f"counts for {process_count} processes.")
    return counts
  if process_count > 1:
    raise ValueError("Several processes need group_counts: every "
                     "process's count_*_groups, gathered (the job does).")
  return aspect_groups.GroupCounts(count()[0][None])


def make_train_iterator(
    config: Any, *, start_step: int = 0, process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    subset: Optional[TrainSubset] = None,
    group_counts: Optional[aspect_groups.GroupCounts] = None,
    source: Optional[sources.Source] = None) -> BoxIterator:
  """Infinite, resumable detection training batches of this process.

  With `data.train_fraction` < 1 the stream is of the subset's images
  (`subset_source`), taken before the stream starts, so that `start_step`
  counts the same steps in a resumed run. With `SHORTEST_EDGE` views every
  batch is of one aspect-ratio group, drawn per step (`aspect_groups`).

  Args:
    config: the detection config (seed, batch_size, data, views).
    start_step: first step; equal to an uninterrupted stream from there on.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    subset: `train_subset(config)` if already drawn (it reads every
      training id); None draws it here.
    group_counts: every process's `count_train_groups`, gathered; needed
      with several processes when batches are grouped or
      `data.filter_empty` is set; one process counts its own.
    source: `train_source(config, ...)` if already open (of `subset`).

  Returns:
    A `BoxIterator` of {"image", "boxes", "labels", "valid"} (module
    docstring), b = config.batch_size // process_count.

  Raises:
    ValueError: bad batch size, start step or views config.
    sources.DatasetUnavailableError: dataset missing or without boxes, or a
      group of images that this process's shard lacks.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  batch = pipeline.per_process_batch(config.batch_size, process_count,
                                     "config.batch_size")
  spec = BoxViewSpec.from_config(config)
  subset = subset or train_subset(config)
  source = source or train_source(config, process_index=process_index,
                                  process_count=process_count, subset=subset)
  source.check_decodable()
  min_boxes = _min_train_boxes(config)
  if not spec.grouped and not min_boxes:
    ds = _train_stream(config, source, spec, process_index, batch,
                       start_step * batch, group=None)
    return BoxIterator(ds, batch_size=batch,
                       num_examples=source.num_examples)
  counts = _group_counts(
      group_counts, lambda: count_train_groups(config, source=source),
      process_count)
  meta = record_meta(config.data, train_parts(config.data))
  if not spec.grouped:
    # Square views, images without boxes left out: one stream of both.
    kept = int(counts.counts[process_index].sum())
    ds = _train_stream(
        config, aspect_groups.group_source(source, meta, None, kept,
                                           min_boxes=min_boxes),
        spec, process_index, batch, start_step * batch, group=None)
    return BoxIterator(ds, batch_size=batch, num_examples=kept)
  if not counts.groups:
    raise sources.DatasetUnavailableError(
        f"No training image of {source.name!r} has a box to train on (and a "
        "readable size): check the dataset, or set "
        "config.data.filter_empty=False.")
  key = pipeline.seed_key(config.seed, pipeline.SeedTag.DETECTION_GROUPS)
  before = aspect_groups.steps_per_group(key, counts.share, start_step)
  streams = {}
  for group in counts.groups:
    n = counts.local(process_index, group)
    if n == 0:
      raise sources.DatasetUnavailableError(
          f"Process {process_index} of {process_count} has no "
          f"{aspect_groups.GROUP_NAMES[group]} training image, while other "
          "processes have some: every step takes each process's images of "
          "one group, so run on fewer processes.")
    streams[group] = _train_stream(
        config, aspect_groups.group_source(source, meta, group, n,
                                           min_boxes=min_boxes),
        spec, process_index, batch, int(before[group]) * batch, group=group)
  if len(streams) == 1:
    (ds,) = streams.values()
  else:
    ds = tf.data.Dataset.choose_from_datasets(
        [streams[g] for g in aspect_groups.GROUPS],
        aspect_groups.step_groups(key, counts.share, start_step))
  return BoxIterator(ds, batch_size=batch,
                     num_examples=int(counts.counts[process_index].sum()))


def _train_stream(config: Any, source: sources.Source, spec: BoxViewSpec,
                  process_index: int, batch: int, start_position: int,
                  group: Optional[int]) -> tf.data.Dataset:
  """Batches of one source's training views, from slot `start_position`.

  Args:
    config: the detection config.
    source: this process's records (of one group, or all).
    spec: the view spec.
    process_index: this process.
    batch: this process's batch.
    start_position: the first slot.
    group: the aspect-ratio group of every record, which keys the order
      and views apart; None for an ungrouped stream.

  Returns:
    The batched, prefetched stream.
  """
  tags = pipeline.SeedTag
  extra = () if group is None else (group,)
  stream = pipeline.slot_stream(
      source, order_key=pipeline.seed_key(config.seed, tags.DETECTION_ORDER,
                                          *extra),
      start_position=start_position)
  view_key = pipeline.seed_key(config.seed, process_index,
                               tags.DETECTION_VIEWS, *extra)
  shape_group = aspect_groups.PORTRAIT if group is None else group

  def make_view(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    seed = pipeline.view_seed(view_key, example["position"])
    out = train_view(example["image"], example["label"], seed, spec,
                     shape_group)
    out[pipeline.CORRUPT] = example[pipeline.CORRUPT]
    return out

  ds = stream.map(make_view, num_parallel_calls=AUTOTUNE, deterministic=True)
  return pipeline.batched(ds, batch, config)


class GroupedBatches:
  """The test batches of each group in turn: one `BoxIterator` after another.

  Attributes:
    parts: the iterators, in group order.
    batch_size: examples per batch (this process's share).
    num_batches: batches over all parts.
  """

  def __init__(self, parts: Sequence[BoxIterator]):
    self.parts = list(parts)
    self.batch_size = self.parts[0].batch_size
    self.num_batches = sum(p.num_batches for p in self.parts)
    self._current = 0

  @property
  def num_truncated(self) -> int:
    """Boxes beyond `max_boxes` left out, over every part."""
    return sum(p.num_truncated for p in self.parts)

  @property
  def num_corrupt(self) -> int:
    """Corrupt records skipped, over every part."""
    return sum(p.num_corrupt for p in self.parts)

  def __iter__(self) -> "GroupedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while self._current < len(self.parts):
      try:
        return next(self.parts[self._current])
      except StopIteration:
        self._current += 1
    raise StopIteration


def make_test_iterator(
    config: Any, *, batch_size: int, process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    group_counts: Optional[aspect_groups.GroupCounts] = None
) -> BoxIterator | GroupedBatches:
  """One pass over this process's shard of `config.data.eval_split`, padded.

  With `SHORTEST_EDGE` views the pass goes group by group (landscape, then
  portrait), each group's batches in its padded shape.

  Args:
    config: the detection config (data, views).
    batch_size: GLOBAL batch size, split evenly over processes.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    group_counts: every process's `count_test_groups`, gathered (grouped
      views with several processes); one process counts its own.

  Returns:
    An iterator of the test keys (module docstring); every process gets
    the same number of batches of each group (enough for the largest
    shard), so they stay in step.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  batch = pipeline.per_process_batch(batch_size, process_count)
  spec = BoxViewSpec.from_config(config)
  source = _test_source(config, process_index, process_count)
  if not spec.grouped:
    return _test_pass(config, source, spec, process_count, batch,
                      aspect_groups.PORTRAIT)
  counts = _group_counts(
      group_counts, lambda: count_test_groups(
          config, process_index=process_index, process_count=process_count),
      process_count)
  meta = record_meta(config.data, [(config.data.dataset,
                                    config.data.eval_split)])
  parts = []
  for group in counts.groups:
    part = aspect_groups.group_source(source, meta, group,
                                      counts.local(process_index, group))
    parts.append(_test_pass(
        config, part, spec, process_count, batch, group,
        num_batches=max(1, -(-counts.largest(group) // batch))))
  return GroupedBatches(parts)


def _test_pass(config: Any, source: sources.Source, spec: BoxViewSpec,
               process_count: int, batch: int, group: int,
               num_batches: Optional[int] = None) -> BoxIterator:
  """A padded pass over `source` in `group`'s shape (`pipeline.padded_pass`).
  """
  def make_view(example: dict[str, Any]) -> dict[str, tf.Tensor]:
    out = test_view(example["image"], example["label"], spec, group)
    out["mask"] = tf.constant(1, tf.int32)
    return out

  height, width = spec.padded_shape(group)
  boxes = spec.max_boxes
  zero = tf.constant(0, tf.int32)
  padding = {
      "image": tf.zeros([height, width, 3], tf.uint8),
      "boxes": tf.zeros([boxes, 4], tf.float32),
      "labels": tf.fill([boxes], -1),
      "valid": tf.zeros([boxes], tf.bool),
      "crowd": tf.zeros([boxes], tf.bool),
      "image_id": tf.constant(-1, tf.int64),
      "mask": zero, "height": zero, "width": zero, "source_height": zero,
      "source_width": zero, TRUNCATED: zero,
  }
  return BoxIterator.of(pipeline.padded_pass(
      source, process_count, batch, make_view, padding,
      prefetch=int(config.data.get("prefetch", 2)), num_batches=num_batches))
