"""Where image records come from, and how one record is decoded.

`config.data.dataset` names one of

  * a TFDS image dataset (`imagenet2012`, `cifar10`, `stl10`,
    `oxford_iiit_pet`, ...) already prepared (as TFRecord files, TFDS's
    default) under `config.data.data_dir`;
  * `folder:/path`: a folder of images. If `/path/<split>` exists it is used for
    that split, else `/path` itself serves every split. Images in class
    sub-folders (searched recursively, torchvision ImageFolder layout) get the
    sorted index of their sub-folder as label; a folder without class
    sub-folders is unlabelled (label -1, `num_classes` 0);
  * `detco_shapes`: the built-in offline dataset, generated once on demand by
    `detco_jax.data.builtin.prepare` at `config.data.builtin_*` sizes and
    cached in the data dir.

`open_source` returns a `Source`: ONE process's shard of one split as a
tf.data stream of *undecoded* records (so that skipping records to resume
costs no decoding), plus the `decode` function that turns a record into
`{"image": uint8 [H, W, 3], "label": int32}`. Shards are disjoint across
processes: TFDS splits are cut with `tfds.even_splits` (what
`tfds.split_for_jax_process` does); folders are sharded per file, strided so
that every process sees every class. With `drop_remainder=True` (training)
all shards have the same length, so all processes run the same number of
steps per epoch; with False (evaluation) the shards cover every example.

`decode` raises a TF error on a corrupt or undecodable image; the pipeline
drops such records with `ignore_errors` and counts them (see `pipeline`).

TensorFlow only runs host-side input code here: `hide_accelerators_from_tf`
keeps it off the GPUs/TPUs, which JAX owns.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from typing import Any, Callable, Optional

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

FOLDER_PREFIX = "folder:"
BUILTIN_NAME = "detco_shapes"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Sub-folder names taken for splits (not classes) in a `folder:` dataset.
_SPLIT_DIR_NAMES = ("train", "val", "validation", "test")

# Files of a TFRecord shard read concurrently; their records are interleaved
# one by one, which mixes shards before the shuffle buffer.
_INTERLEAVE_FILES = 16

Record = Any  # A (nest of) tf.Tensor, opaque outside its `Source`.


class DatasetUnavailableError(FileNotFoundError):
  """The configured dataset cannot be read; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One process's shard of one split, as undecoded records.

  Attributes:
    name: the dataset name as configured.
    split: the split name.
    num_examples: records in this process's shard.
    split_size: records in the whole split (all shards, before dropping a
      remainder).
    num_classes: number of label classes (0 if unlabelled).
    process_index: the shard's process.
    process_count: the number of processes (shards).
  """
  name: str
  split: str
  num_examples: int
  split_size: int
  num_classes: int
  process_index: int
  process_count: int
  _records: Callable[[Optional[tf.Tensor]], tf.data.Dataset]
  _decode: Callable[[Record], dict[str, tf.Tensor]]

  def records(self, seed: Optional[tf.Tensor] = None) -> tf.data.Dataset:
    """This shard's undecoded records, each exactly once.

    Args:
      seed: None for a fixed order; else a [2] int64 stateless seed (a tensor,
        it may be symbolic) from which the order is drawn: an exact
        permutation for folders; for TFDS, a permutation of the TFRecord
        files, read 16 at a time interleaved, then a seeded shuffle buffer of
        `config.data.shuffle_buffer` records.

    Returns:
      A finite `tf.data.Dataset` of records, deterministic given `seed`.
    """
    return self._records(seed)

  def decode(self, record: Record) -> dict[str, tf.Tensor]:
    """Decodes one record (graph code; raises a TF error if corrupt).

    Args:
      record: an element of `records()`.

    Returns:
      {"image": uint8 [H, W, 3], "label": int32 scalar (-1 if unlabelled)}.
    """
    return self._decode(record)

  def check_decodable(self) -> None:
    """Raises unless at least one record of the shard decodes.

    An infinite stream that drops corrupt records would otherwise spin
    forever on a shard in which nothing decodes. Normally this decodes only
    the first record.

    Raises:
      DatasetUnavailableError: if no record decodes.
    """
    ds = self.records(None).map(self.decode).ignore_errors().take(1)
    if not any(True for _ in ds):
      raise DatasetUnavailableError(
          f"No record of {self.name!r} split {self.split!r} (shard "
          f"{self.process_index} of {self.process_count}, "
          f"{self.num_examples} records) decodes as an image.")


def index_order(n: int, seed: Optional[tf.Tensor]) -> tf.data.Dataset:
  """The indices 0..n-1 as a dataset: in order, or a seeded permutation.

  Args:
    n: how many.
    seed: a stateless shuffle seed (shape [2]), or None for 0, 1, ..., n-1.

  Returns:
    int64 scalars.
  """
  if seed is None:
    return tf.data.Dataset.range(n)
  return tf.data.Dataset.from_tensor_slices(
      tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                               seed))


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs and TPUs: JAX owns the accelerators."""
  _hide_accelerators_once()


@functools.cache
def _hide_accelerators_once() -> None:
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except ValueError:
      pass  # No such device type in this TF build.
    except RuntimeError as e:
      # TF already initialised its devices: too late to hide them.
      logging.warning("Could not hide %s devices from TensorFlow: %s", kind, e)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP/WebP bytes to uint8 RGB (graph code).

  JPEGs decode with libjpeg's accurate integer IDCT, as PIL does (the
  reference pipeline's decoder): the pixels equal PIL's, where TF's default
  (the fast IDCT) is about 1.3 grey levels from them, for the same time
  (experiments/decode_options.py). CMYK JPEGs come out as RGB.

  Args:
    encoded: scalar tf.string of encoded image bytes.

  Returns:
    uint8 [H, W, 3]; grayscale is replicated, alpha dropped, and an animation
    gives its first frame. Raises a TF error if the bytes are not an image.
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False,
                                 dtype=tf.uint8))
  return tf.ensure_shape(image, [None, None, 3])


def resolve_processes(process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> tuple[int, int]:
  """Fills in `jax.process_index()` / `jax.process_count()` and checks them.

  Args:
    process_index: this process, or None for `jax.process_index()`.
    process_count: number of processes, or None for `jax.process_count()`.

  Returns:
    (process_index, process_count).

  Raises:
    ValueError: if the index is not in [0, count).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, "
                     f"process_count={process_count}).")
  return process_index, process_count


def open_source(config_data: Any, split: str, *,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None,
                drop_remainder: bool = True) -> Source:
  """Opens this process's shard of a split of `config.data.dataset`.

  Args:
    config_data: the `config.data` section (dataset, data_dir, image_key,
      label_key, shuffle_buffer, builtin_*).
    split: split name (TFDS split syntax such as "train[:10%]" is fine).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    drop_remainder: cut equal shards, dropping the last `n % process_count`
      examples (training); False keeps every example (evaluation).

  Returns:
    The `Source`.

  Raises:
    DatasetUnavailableError: unknown name, dataset not prepared, missing or
      empty folder, or an empty shard; the message says how to fix it.
  """
  hide_accelerators_from_tf()
  process_index, process_count = resolve_processes(process_index,
                                                   process_count)
  name = config_data.dataset
  shuffle_buffer = int(config_data.get("shuffle_buffer", 10_000))
  if name.startswith(FOLDER_PREFIX):
    source = _folder_source(name, split, process_index, process_count,
                            drop_remainder)
  else:
    source = _tfds_source(
        name, tfds_builder(config_data), split,
        image_key=config_data.get("image_key", "image"),
        label_key=config_data.get("label_key", "label"),
        process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder, shuffle_buffer=shuffle_buffer)
  if source.num_examples == 0:
    raise DatasetUnavailableError(
        f"Process {process_index} of {process_count} gets no example of "
        f"{name!r} split {split!r}: the split is smaller than the number of "
        "processes.")
  return source


def prepare_builtin(config_data: Any) -> None:
  """Generates the built-in dataset on process 0 while the others wait.

  Every process would otherwise write the same files into a shared data
  dir. Other datasets need no preparation here.

  Args:
    config_data: the `config.data` section.
  """
  if config_data.dataset != BUILTIN_NAME:
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1 or jax.process_index() == 0:
    tfds_builder(config_data)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("detco_jax: built-in dataset ready")


def check_available(config_data: Any, split: str) -> None:
  """Raises now, before a job writes anything, if `split` cannot be read.

  Args:
    config_data: the `config.data` section.
    split: the split the job reads first.

  Raises:
    DatasetUnavailableError: an unknown or unprepared TFDS dataset, a
      missing folder, or no such split.
  """
  name = config_data.dataset
  if name.startswith(FOLDER_PREFIX):
    _folder_dir(name, split)
  else:
    _split_info(name, tfds_builder(config_data), split)


def num_examples(config_data: Any, split: str) -> int:
  """Number of examples in a whole split (all processes together).

  Args:
    config_data: the `config.data` section.
    split: split name.

  Returns:
    The example count, before sharding (and before dropping corrupt images).
  """
  name = config_data.dataset
  if name.startswith(FOLDER_PREFIX):
    return len(_list_folder(_folder_dir(name, split))[0])
  builder = tfds_builder(config_data)
  return _split_info(name, builder, split).num_examples


def num_classes(config_data: Any) -> int:
  """Number of label classes of the dataset (0 if it has no labels).

  Args:
    config_data: the `config.data` section; folders count the class
      sub-folders of the training split.

  Returns:
    The class count.
  """
  name = config_data.dataset
  if name.startswith(FOLDER_PREFIX):
    split = config_data.get("train_split", "train")
    return len(_list_folder(_folder_dir(name, split))[2])
  features = tfds_builder(config_data).info.features
  return _num_classes(features, config_data.get("label_key", "label"))


# ----------------------------------------------------------------------------
# TFDS.


def tfds_builder(config_data: Any) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of `config.data.dataset` (built-in: made now).

  Args:
    config_data: the `config.data` section (dataset, data_dir, builtin_*).

  Returns:
    The builder, prepared: its `info` (features, splits) can be read.

  Raises:
    DatasetUnavailableError: unknown or unprepared dataset.
  """
  hide_accelerators_from_tf()  # Preparing a dataset runs TF ops.
  name, data_dir = config_data.dataset, config_data.get("data_dir")
  if name.split("/")[0] == BUILTIN_NAME:
    # Imported here: importing the module registers the builder with TFDS, so
    # `detco_shapes/<config>` names resolve too.
    from detco_jax.data import builtin  # pylint: disable=g-import-not-at-top
    if name == BUILTIN_NAME:
      return builtin.prepare(
          image_size=int(config_data.builtin_image_size),
          num_train=int(config_data.builtin_num_train),
          num_test=int(config_data.builtin_num_test), data_dir=data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetUnavailableError(_unknown_name_message(name)) from None
  except (ValueError, AssertionError) as e:
    # A malformed name, or an unknown config or version of a known dataset.
    raise DatasetUnavailableError(
        f"Cannot open TFDS dataset {name!r} (config.data.dataset): "
        f"{str(e).strip().splitlines()[0]}") from None
  if not builder.is_prepared():
    raise DatasetUnavailableError(_unprepared_message(name, builder, data_dir))
  return builder


def _shown_data_dir(data_dir: Optional[str]) -> str:
  return (data_dir or os.environ.get("TFDS_DATA_DIR") or
          os.path.expanduser("~/tensorflow_datasets"))


def _unknown_name_message(name: str) -> str:
  close = difflib.get_close_matches(name.lower(), tfds.list_builders(), n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  return (f"Unknown dataset {name!r} in config.data.dataset: it is not a TFDS "
          f"dataset name, not '{FOLDER_PREFIX}/path/to/images' and not the "
          f"built-in '{BUILTIN_NAME}'.{hint}")


def _unprepared_message(name: str, builder: tfds.core.DatasetBuilder,
                        data_dir: Optional[str]) -> str:
  """How to prepare a TFDS dataset (nothing is downloaded at run time)."""
  root = _shown_data_dir(data_dir)
  manual = os.path.join(root, "downloads", "manual")
  build = f"`tfds build {name} --data_dir={root}`"
  head = (f"TFDS dataset {name!r} is not prepared in {root} (looked for "
          f"{builder.data_dir}); this pipeline never downloads at run time.")
  if name.split("/")[0].split(":")[0].startswith("imagenet2012"):
    return (f"{head} ImageNet needs a manual download: get "
            "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
            f"https://image-net.org/download-images, put them in {manual}/, "
            f"then run {build} once (a few hours), and point "
            f"config.data.data_dir at {root}.")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return (f"{head} It needs a manual download: put the files described "
            f"below in {manual}/, then run {build} once.\n"
            f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
  return (f"{head} Run {build} once on a machine with internet access (then "
          f"copy {root} here if needed), and point config.data.data_dir at "
          "it.")


def _split_info(name: str, builder: tfds.core.DatasetBuilder,
                split: Any) -> Any:
  """`builder.info.splits[split]`, with a clear error for a bad split."""
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError, AssertionError) as e:
    raise DatasetUnavailableError(
        f"Dataset {name!r} has no split {split!r} ({e}); available: "
        f"{sorted(builder.info.splits.keys())}.") from None


def _num_classes(features: Any, label_key: str) -> int:
  if label_key in features and isinstance(features[label_key],
                                          tfds.features.ClassLabel):
    return int(features[label_key].num_classes)
  return 0


def _tfds_source(name: str, builder: tfds.core.DatasetBuilder, split: str, *,
                 image_key: str, label_key: str, process_index: int,
                 process_count: int, drop_remainder: bool,
                 shuffle_buffer: int) -> Source:
  """A `Source` over a prepared TFDS split."""
  split_size = _split_info(name, builder, split).num_examples
  features = builder.info.features
  if image_key not in features or not isinstance(features[image_key],
                                                 tfds.features.Image):
    raise DatasetUnavailableError(
        f"Dataset {name!r} has no image feature {image_key!r} (set "
        f"config.data.image_key); features: {list(features.keys())}.")
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.TFRECORD:
    # TFDS reads other formats (array_record, parquet) only by random access,
    # outside tf.data; this pipeline streams TFRecord files.
    raise DatasetUnavailableError(
        f"Dataset {name!r} is stored as {file_format.value}, but this "
        f"pipeline reads TFRecord files: prepare it again with `tfds build "
        f"{name} --file_format=tfrecord --data_dir=...`.")
  has_label = label_key in features
  shard = tfds.even_splits(split, n=process_count,
                           drop_remainder=drop_remainder)[process_index]
  shard_info = builder.info.splits[shard]

  records = _tfrecord_reader(shard_info.file_instructions, shuffle_buffer)
  spec = features.tf_example_spec
  parse_spec = {image_key: spec[image_key]}
  if has_label:
    parse_spec[label_key] = spec[label_key]

  def decode(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    # Parses only the two features used: skips e.g. masks and boxes.
    example = tf.io.parse_single_example(serialized, parse_spec)
    label = (tf.cast(example[label_key], tf.int32) if has_label
             else tf.constant(-1, tf.int32))
    return {"image": decode_image(example[image_key]), "label": label}

  return Source(name=name, split=split, num_examples=shard_info.num_examples,
                split_size=split_size,
                num_classes=_num_classes(features, label_key),
                process_index=process_index, process_count=process_count,
                _records=records, _decode=decode)


def _tfrecord_reader(
    instructions: list[Any], shuffle_buffer: int
) -> Callable[[Optional[tf.Tensor]], tf.data.Dataset]:
  """Reads TFDS file instructions (file, skip, take) as serialized examples.

  Reading the files ourselves, rather than through `builder.as_dataset`, lets
  the file order be drawn per epoch from a (symbolic) seed inside one
  infinite tf.data graph.

  Args:
    instructions: `SplitInfo.file_instructions` of this process's shard.
    shuffle_buffer: size of the seeded shuffle buffer after the interleave.

  Returns:
    `records(seed)` as in `Source.records`.
  """
  files = tf.constant([i.filename for i in instructions])
  skips = tf.constant([i.skip for i in instructions], tf.int64)
  takes = tf.constant([i.take for i in instructions], tf.int64)
  num_files = len(instructions)

  def read(i: tf.Tensor) -> tf.data.Dataset:
    return tf.data.TFRecordDataset(files[i]).skip(skips[i]).take(takes[i])

  def records(seed: Optional[tf.Tensor]) -> tf.data.Dataset:
    ds = index_order(num_files, seed).interleave(
        read, cycle_length=min(num_files, _INTERLEAVE_FILES), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if seed is None:
      return ds
    # tf.data's shuffle takes one int64 seed; draw it from the stateless one.
    buffer_seed = tf.random.stateless_uniform(
        [], seed, minval=None, maxval=None, dtype=tf.int64)
    return ds.shuffle(shuffle_buffer, seed=buffer_seed)

  return records


# ----------------------------------------------------------------------------
# Folders.


def _folder_dir(name: str, split: str) -> str:
  """The directory of `split` for `folder:/path`.

  Raises:
    DatasetUnavailableError: the folder does not exist.
  """
  root = os.path.expanduser(name[len(FOLDER_PREFIX):])
  if not os.path.isdir(root):
    raise DatasetUnavailableError(
        f"Image folder {root!r} (config.data.dataset={name!r}) does not exist "
        "or is not a directory. Point config.data.dataset at "
        f"'{FOLDER_PREFIX}/path/to/images', holding images directly or in one "
        "sub-folder per class (optionally under /path/<split>/).")
  split_dir = os.path.join(root, split)
  if os.path.isdir(split_dir):
    return split_dir
  # A folder with split sub-folders but not this one is a config mistake;
  # reading it whole would take the split names for classes.
  splits = sorted(d for d in _SPLIT_DIR_NAMES
                  if os.path.isdir(os.path.join(root, d)))
  if splits:
    raise DatasetUnavailableError(
        f"Image folder {root!r} has split sub-folders {splits} but no "
        f"{split!r}: set config.data.train_split / eval_split to one of them.")
  return root


def _is_image(filename: str) -> bool:
  return filename.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(directory: str) -> tuple[list[str], list[int], list[str]]:
  """Lists the images of a folder, sorted.

  Args:
    directory: the split's directory.

  Returns:
    (paths, labels, class_names). With class sub-folders (any sub-directory
    holding images, searched recursively), only their images count, labelled
    by the sorted class index; otherwise the images directly in `directory`,
    labelled -1.

  Raises:
    DatasetUnavailableError: no image file found.
  """
  classes = []
  for entry in sorted(os.scandir(directory), key=lambda e: e.name):
    if entry.is_dir() and any(
        _is_image(f) for _, _, files in os.walk(entry.path) for f in files):
      classes.append(entry.name)
  paths, labels = [], []
  if classes:
    for label, cls in enumerate(classes):
      for parent, dirs, files in os.walk(os.path.join(directory, cls)):
        dirs.sort()
        for f in sorted(files):
          if _is_image(f):
            paths.append(os.path.join(parent, f))
            labels.append(label)
  else:
    paths = [os.path.join(directory, f) for f in sorted(os.listdir(directory))
             if _is_image(f) and os.path.isfile(os.path.join(directory, f))]
    labels = [-1] * len(paths)
  if not paths:
    raise DatasetUnavailableError(
        f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {directory!r}, "
        "neither directly nor in class sub-folders. Put images there, or fix "
        "config.data.dataset.")
  return paths, labels, classes


def _folder_source(name: str, split: str, process_index: int,
                   process_count: int, drop_remainder: bool) -> Source:
  """A `Source` over one process's files of an image folder."""
  directory = _folder_dir(name, split)
  paths, labels, classes = _list_folder(directory)
  # Strided: a sorted class layout would otherwise give each process a few
  # classes only (biasing its batch-norm statistics).
  count = len(paths) // process_count if drop_remainder else None
  index = list(range(process_index, len(paths), process_count))[:count]
  logging.info("Folder %s split %r: %d images in %d classes; process %d "
               "reads %d.", directory, split, len(paths), len(classes),
               process_index, len(index))
  shard_paths = tf.constant([paths[i] for i in index], tf.string)
  shard_labels = tf.constant([labels[i] for i in index], tf.int32)

  def records(seed: Optional[tf.Tensor]) -> tf.data.Dataset:
    if seed is None:
      order = tf.range(len(index))
    else:
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(index)), seed)
    return tf.data.Dataset.from_tensor_slices({
        "path": tf.gather(shard_paths, order),
        "label": tf.gather(shard_labels, order)})

  def decode(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"image": decode_image(tf.io.read_file(record["path"])),
            "label": record["label"]}

  return Source(name=name, split=split, num_examples=len(index),
                split_size=len(paths), num_classes=len(classes),
                process_index=process_index, process_count=process_count,
                _records=records, _decode=decode)
