r"""The built-in offline dataset `detco_shapes`: synthetic multi-object scenes.

A TFDS `GeneratorBasedBuilder` that needs no network. Its examples are the
scenes of `detco_jax.data.scenes` (how they are drawn, and why two machines
generate the same dataset, is told there), with image and mask PNG-encoded.

Usage (importing this module registers the builder with TFDS):

  from detco_jax.data import builtin
  b = builtin.prepare(image_size=64, num_train=10_000, num_test=2_000)
  ds = b.as_dataset(split="train")
  # or, once imported: tfds.load("detco_shapes/s64_tr10000_te2000")

Each (image_size, num_train, num_test) has its own config, named like
`s64_tr10000_te2000`, so different sizes are cached in different directories.
Any name of that form is accepted by `tfds.builder("detco_shapes/<name>")`.

Features of one example (S = image_size, n = number of visible objects):

  image       uint8 [S, S, 3], PNG (encoded with Pillow).
  mask        uint8 [S, S, 1], PNG. Class segmentation of the visible pixels:
              0 is background and `class_id + 1` is a pixel of an object of
              class `class_id` (`CLASS_NAMES[class_id]`). An occluded pixel
              belongs to the object on top.
  label       ClassLabel: the class of the largest visible object, i.e. the
              class with the most pixels in `mask` (ties: the lower class id).
              The sizes are drawn so that this is always the main object.
  labels      float32 [scenes.NUM_CLASSES]: multi-hot, 1 for each class in
              `mask`.
  boxes       float32 [n, 4] (Sequence of BBoxFeature): per visible object, in
              drawing order (back to front), the normalised [ymin, xmin, ymax,
              xmax] of its visible pixels, pixel-edge convention: ymin = first
              row / S and ymax = (last row + 1) / S (same for x).
  box_labels  int64 [n] (Sequence of ClassLabel): the class of each box.
  index       int64: the example's index in its split; examples are stored in
              index order.
"""

import dataclasses
import functools
import io
import re
import time
from typing import Any, Iterator, Optional

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import logging

from detco_jax.data import scenes

# The names of the classes of `label`, `labels` and `box_labels`, re-exported
# for the dataset's users (the generator defines them).
CLASS_NAMES = scenes.CLASS_NAMES


@dataclasses.dataclass(eq=False)
class DetcoShapesConfig(tfds.core.BuilderConfig):
  """Config of `detco_shapes`: image side and split sizes.

  Attributes:
    image_size: side of the square images in pixels.
    num_train: examples in the `train` split.
    num_test: examples in the `test` split.
  """
  image_size: int = 64
  num_train: int = 10_000
  num_test: int = 2_000


def config_name(image_size: int, num_train: int, num_test: int) -> str:
  """The config name for these parameters, e.g. `s64_tr10000_te2000`."""
  return f"s{image_size}_tr{num_train}_te{num_test}"


_CONFIG_NAME = re.compile(r"s(\d+)_tr(\d+)_te(\d+)")


@functools.cache
def _make_config(image_size: int, num_train: int,
                 num_test: int) -> DetcoShapesConfig:
  """One config object per parameter set (TFDS compares configs by identity)."""
  if image_size < scenes.MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be >= {scenes.MIN_IMAGE_SIZE}, got "
                     f"{image_size}.")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"Split sizes must be positive, got train={num_train}, "
                     f"test={num_test}.")
  return DetcoShapesConfig(
      name=config_name(image_size, num_train, num_test),
      description=(f"{image_size}x{image_size} images, {num_train} train and "
                   f"{num_test} test examples."),
      image_size=image_size, num_train=num_train, num_test=num_test)


_MASK_DOC = ("Class segmentation of the visible pixels: 0 = background, "
             "class_id + 1 = a pixel of an object of that class.")


class DetcoShapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic multi-object scenes, generated offline and deterministically."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "2.0.0": ("A large, central main object and smaller distractors, so "
                "that `label` is a shape a small network learns."),
  }
  # The demo (default) and the test configs; any other `s{S}_tr{N}_te{M}` name
  # is made on demand by `get_builder_config`.
  BUILDER_CONFIGS = [_make_config(64, 10_000, 2_000), _make_config(32, 256, 64)]

  @classmethod
  def get_builder_config(
      cls, name: str, version: Any = None
  ) -> Optional[tfds.core.BuilderConfig]:
    """A listed config, or one parsed from a name like `s32_tr64_te8`."""
    config = super().get_builder_config(name, version)
    match = _CONFIG_NAME.fullmatch(name)
    if config is None and match:
      config = _make_config(*(int(g) for g in match.groups()))
    return config

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    class_label = tfds.features.ClassLabel(names=scenes.CLASS_NAMES)
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(size, size, 3),
                                     encoding_format="png"),
        "mask": tfds.features.Image(shape=(size, size, 1),
                                    encoding_format="png", use_colormap=True,
                                    doc=_MASK_DOC),
        "label": tfds.features.ClassLabel(
            names=scenes.CLASS_NAMES,
            doc="Class of the largest visible object (most mask pixels)."),
        "labels": tfds.features.Tensor(
            shape=(scenes.NUM_CLASSES,), dtype=np.float32,
            doc="Multi-hot: 1 for each class visible in the mask."),
        "boxes": tfds.features.Sequence(
            tfds.features.BBoxFeature(),
            doc=("Per visible object, back to front: normalised [ymin, xmin, "
                 "ymax, xmax] of its visible pixels (ymax = (last row+1)/S).")),
        "box_labels": tfds.features.Sequence(
            class_label, doc="Class of each box."),
        "index": tfds.features.Scalar(
            dtype=np.int64, doc="Index of the example in its split."),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0] + "\n\n" + _MASK_DOC,
        features=features,
        supervised_keys=("image", "label"),
        # Every example is independently random, so index order is already a
        # random order, and it keeps `take(n)` equal to the first n indices.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[Any]]:
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
        "train": self._generate_examples("train", config.num_train),
        "test": self._generate_examples("test", config.num_test),
    }

  def _generate_examples(self, split: str,
                         num_examples: int) -> Iterator[tuple[int, dict]]:
    size = self.builder_config.image_size
    for index in range(num_examples):
      example = scenes.generate_example(split, index, size)
      # Encoded here with Pillow: TF's per-image eager `encode_png`, which the
      # Image feature would use on arrays, costs more than generating.
      example["image"] = _png(example["image"])
      example["mask"] = _png(example["mask"][..., 0])
      yield index, example


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W] or [H, W, 3] array."""
  buffer = io.BytesIO()
  # Level 1: a third faster than the default for 9% larger files.
  PIL.Image.fromarray(image).save(buffer, format="png", compress_level=1)
  return buffer.getvalue()


def builder(image_size: int = 64, num_train: int = 10_000,
            num_test: int = 2_000,
            data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Returns the `detco_shapes` builder for these parameters (not prepared).

  Args:
    image_size: side of the square images in pixels (at least 16).
    num_train: examples in the `train` split.
    num_test: examples in the `test` split.
    data_dir: TFDS data dir; None: `$TFDS_DATA_DIR` or the TFDS default.

  Returns:
    The builder, with config `config_name(image_size, num_train, num_test)`.
  """
  # Checked here so that a bad value fails before TFDS touches the data dir.
  _make_config(image_size, num_train, num_test)
  return DetcoShapes(config=config_name(image_size, num_train, num_test),
                     data_dir=data_dir)


def prepare(image_size: int = 64, num_train: int = 10_000,
            num_test: int = 2_000,
            data_dir: Optional[str] = None) -> tfds.core.DatasetBuilder:
  """Generates the dataset once into the data dir (a no-op when cached).

  Args:
    image_size: side of the square images in pixels (at least 16).
    num_train: examples in the `train` split.
    num_test: examples in the `test` split.
    data_dir: TFDS data dir; None: `$TFDS_DATA_DIR` or the TFDS default.

  Returns:
    The prepared builder; read it with `as_dataset(split=...)`.
  """
  b = builder(image_size, num_train, num_test, data_dir)
  if b.is_prepared():
    return b
  # Tens of seconds at the demo's size: say what runs, where it goes.
  name = f"{b.name}/{b.builder_config.name}"
  logging.info("Building the built-in dataset %s (%d train and %d test "
               "images of %d px) into %s; this happens once per data dir.",
               name, num_train, num_test, image_size, b.data_dir)
  start = time.perf_counter()
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  logging.info("Built %s in %.1f s; cached in %s.", name,
               time.perf_counter() - start, b.data_dir)
  return b
