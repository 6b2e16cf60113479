"""Input streams: sources + host views -> batches, resumable (the host side).

Streams (one per process; numpy batches of this process's share of the
global batch, b = global batch // process count):

  * `make_pretrain_iterator`: infinite DetCo batches
    {"global": uint8 [b, 2, H, W, 3], "local": uint8 [b, 2, 9, h, w, 3]}
    ("local" only when `config.loss.global_local`), or another method's
    (`example_views`: a pretext task's {"inputs", "label"}; with
    `LabelledViews`, the label is the example's own);
  * `make_eval_iterator(train=True)`: infinite linear-probe training batches
    {"image": uint8 [b, S, S, 3], "label": int32 [b]};
  * `make_eval_iterator(train=False)`: one pass over this process's shard of
    a test split, padded to whole batches, with "mask" (1 real, 0 padding).

Order and seeding. The infinite streams are epochs of the process's shard;
epoch e is in an order drawn from the stateless seed (key(config.seed), e):
the same on every process (each has its own shard), different per epoch.
The i-th example of the process's stream (its "position", counted from the
start of training) gets its views from the stateless seed
(key(config.seed, process_index), position). Nothing depends on thread
timing, so a run is reproducible, and resumable:

Resume. `start_step=s` starts the stream at position p = s * b, which is
epoch p // n (n = shard size), record p % n. Earlier epochs are skipped by
arithmetic; within the epoch, the first p % n records are skipped before
decoding (free for folders, a sequential read of undecoded records for
TFRecord data). The result equals, batch for batch, an uninterrupted run
from step s on.

Corrupt images. A record that fails to decode is dropped (`ignore_errors` on
the decode step only) and counted, and its slot is filled by the next
decodable record of the stream (a duplicate with fresh views, since views
are seeded by slot). So positions, epochs and batches keep their arithmetic,
and resume stays exact even with corrupt images; only the counter differs
(it counts the corrupt records this iterator read, so a resumed run does not
count those before its start). The count is `InputIterator.num_corrupt`,
updated as batches are handed out. In the one-pass test stream corrupt images
are dropped (never duplicated) and the padding grows to match.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Iterator, Optional

import numpy as np
import tensorflow as tf

from detco_jax.data import sources
from detco_jax.data import views as views_lib

AUTOTUNE = tf.data.AUTOTUNE


@enum.unique
class SeedTag(enum.IntEnum):
  """The stream tags: one table, so that no two streams share randomness.

  A stream's seed keys are `seed_key(config.seed, [process_index,] tag)`.
  Every stream of the code base (the pipeline's, `segmentation`'s) takes its
  tags from here, and `enum.unique` refuses a repeated value at import, so
  two streams cannot share a tag by accident. The values are part of every
  stream's data: changing one changes that stream.
  """
  PRETRAIN_ORDER = 1  # Per-epoch record order of pretraining.
  PRETRAIN_VIEWS = 2  # DetCo views of each pretraining slot.
  PROBE_ORDER = 3     # Per-epoch record order of the linear probe.
  PROBE_VIEWS = 4     # Linear-probe training views.
  DENSE_ORDER = 5     # Per-epoch record order of the dense probe.
  DENSE_VIEWS = 6     # Dense-probe training views (image + mask).
  DETECTION_ORDER = 7  # Per-epoch record order of detection fine-tuning.
  DETECTION_VIEWS = 8  # Detection training views (scale, crop, flip).
  DETECTION_GROUPS = 9  # The aspect-ratio group of each detection step.


# Element key of the per-slot count of corrupt records, which the streams
# carry and `InputIterator` strips and sums ("Corrupt images" in the module
# docstring).
CORRUPT = "corrupt"


class InputIterator(Iterator[dict[str, np.ndarray]]):
  """Numpy batches of a tf.data pipeline, with counters for the loop to log.

  Attributes:
    dataset: the underlying `tf.data.Dataset` (its elements still carry the
      "corrupt" counts that this iterator strips).
    batch_size: examples per batch (this process's share).
    num_examples: examples in this process's shard of the split (one epoch).
    num_batches: batches in the stream; None if infinite.
  """

  def __init__(self, dataset: tf.data.Dataset, *, batch_size: int,
               num_examples: int, num_batches: Optional[int] = None):
    self.dataset = dataset
    self.batch_size = batch_size
    self.num_examples = num_examples
    self.num_batches = num_batches
    self._iterator = dataset.as_numpy_iterator()
    self._num_corrupt = 0

  @property
  def num_corrupt(self) -> int:
    """Corrupt (undecodable) records skipped in the batches handed out."""
    return self._num_corrupt

  def __iter__(self) -> "InputIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._num_corrupt += int(batch.pop(CORRUPT).sum())
    return batch


def seed_key(*parts: int) -> int:
  """A 63-bit key mixing integers; stable across runs, processes, machines.

  Args:
    *parts: non-negative ints, e.g. `config.seed`, a process index and a
      `SeedTag`.

  Returns:
    The key, a Python int in [0, 2**63).
  """
  words = [int(p) % 2**32 for p in parts] + [int(p) // 2**32 % 2**32
                                             for p in parts]
  state = np.random.SeedSequence(words).generate_state(2, np.uint32)
  return int(state[0]) << 31 | int(state[1]) >> 1


def per_process_batch(batch_size: int, process_count: int,
                      name: str = "batch_size") -> int:
  """The per-process batch; raises unless the global batch splits evenly.

  Args:
    batch_size: the GLOBAL batch size.
    process_count: number of processes.
    name: what the error message calls `batch_size` (e.g. a config field).

  Returns:
    `batch_size // process_count`.

  Raises:
    ValueError: `batch_size` is not a positive multiple of `process_count`.
  """
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
        f"{name} ({batch_size}) must be a positive multiple of the number of "
        f"processes ({process_count}): each process loads {name} / "
        f"{process_count} examples per step. Set {name} to a multiple of "
        f"{process_count}.")
  return batch_size // process_count


def _options(dataset: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  # Parallelism comes from the parallel maps (one element per thread), which
  # scales better than splitting each small op over threads.
  options.threading.max_intra_op_parallelism = 1
  return dataset.with_options(options)


def batched(ds: tf.data.Dataset, batch: int, config: Any) -> tf.data.Dataset:
  """Whole batches of `batch`, prefetched, with the pipeline options.

  Args:
    ds: a stream of examples.
    batch: this process's batch size; a last partial batch is dropped.
    config: the experiment config (`data.prefetch`, default 2 batches).

  Returns:
    The batched, prefetched, deterministic dataset.
  """
  ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=AUTOTUNE,
                deterministic=True)
  return _options(ds.prefetch(int(config.data.get("prefetch", 2))))


def slot_stream(source: sources.Source, *, order_key: int,
                start_position: int) -> tf.data.Dataset:
  """The infinite stream of decoded examples, one per record slot.

  Args:
    source: this process's shard.
    order_key: seed key of the per-epoch record orders.
    start_position: first slot; slot p is record p % n of epoch p // n.

  Returns:
    Elements {"image": uint8 [H, W, 3], "label": int32, "position": int64
    (the slot), "corrupt": int32 (corrupt records this element stands for,
    counted on the first slot of a filled run)}.
  """
  n = source.num_examples
  start_epoch, offset = divmod(start_position, n)

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    return source.records(tf.stack([tf.constant(order_key, tf.int64), epoch]))

  records = tf.data.Dataset.counter(start_epoch).flat_map(epoch_records)
  # Skipping before the decode map: resuming decodes nothing it skips.
  records = records.skip(offset).enumerate(start=start_position)

  def decode(position: tf.Tensor, record: Any) -> dict[str, tf.Tensor]:
    return dict(source.decode(record), position=position)

  decoded = records.map(decode, num_parallel_calls=AUTOTUNE,
                        deterministic=True).ignore_errors()
  return _fill_corrupt_slots(decoded, start_position)


def _fill_corrupt_slots(decoded: tf.data.Dataset,
                        start_position: int) -> tf.data.Dataset:
  """Gives the slots of dropped (corrupt) records to the next good example.

  Args:
    decoded: decoded examples with increasing "position", gaps where a record
      was dropped.
    start_position: position of the first slot.

  Returns:
    One element per slot, see `slot_stream`.
  """

  def count_gap(previous: tf.Tensor, example: dict[str, tf.Tensor]):
    slots = example["position"] - previous
    return example["position"], dict(example, slots=slots)

  def repeat(example: dict[str, tf.Tensor]) -> tf.data.Dataset:
    # The same tensors `slots` times: no copy, and cheaper per element than
    # a dataset that maps each slot (about 0.1 ms of a 2 ms sample).
    return tf.data.Dataset.from_tensors(example).repeat(example["slots"])

  def slot(position: tf.Tensor, example: dict[str, tf.Tensor]
           ) -> dict[str, tf.Tensor]:
    # Every slot is filled, so the i-th element is slot start_position + i.
    first = example["position"] - example["slots"] + 1
    corrupt = tf.where(position == first, example["slots"] - 1, 0)
    return {"image": example["image"], "label": example["label"],
            "position": position, CORRUPT: tf.cast(corrupt, tf.int32)}

  counted = decoded.scan(tf.constant(start_position - 1, tf.int64), count_gap)
  return counted.flat_map(repeat).enumerate(start=start_position).map(slot)


def view_seed(key: int, position: tf.Tensor) -> tf.Tensor:
  """The stateless seed of one slot's views.

  Args:
    key: the stream's view key (`seed_key(seed, process_index, tag)`).
    position: the slot, int64 scalar.

  Returns:
    int64 [2], for `tf.random.stateless_*` and the `views` functions.
  """
  return tf.stack([tf.constant(key, tf.int64), position])


def _open_train_source(config: Any, split: str, process_index: int,
                       process_count: int) -> sources.Source:
  source = sources.open_source(config.data, split,
                               process_index=process_index,
                               process_count=process_count,
                               drop_remainder=True)
  source.check_decodable()
  return source


# A method's host views: `(image uint8 [H, W, 3], seed int64 [2]) -> dict`
# of fixed-shape tensors (tf graph code, one example).
ExampleViews = Callable[[tf.Tensor, tf.Tensor], dict[str, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class LabelledViews:
  """The host views of a method that trains on the dataset's label.

  Self-supervised methods never see the label; wrapping their views in this
  says, in the type, that a method does. The pipeline adds the example's
  label to the views as "label", int32 [1].

  Attributes:
    views: `(image, seed) -> dict` without "label", as `ExampleViews`.
  """
  views: ExampleViews


def detco_example_views(config: Any) -> ExampleViews:
  """DetCo's host views of one example (`views.detco_views`).

  Args:
    config: the experiment config (`views`; `loss.global_local`: without
      it, MoCo v2's global views alone).

  Returns:
    `(image, seed) -> {"global": [2, G, G, 3], "local": [2, 9, p, p, 3]}`.
  """
  spec = views_lib.ViewSpec.from_config(config.views)
  with_local = bool((config.get("loss") or {}).get("global_local", True))
  return lambda image, seed: views_lib.detco_views(image, seed, spec,
                                                   with_local)


def _pretrain(config: Any, process_index: int, process_count: int,
              start_step: int,
              example_views: ExampleViews | LabelledViews | None = None
              ) -> tuple[tf.data.Dataset, sources.Source]:
  """The pretraining dataset and its source; see `make_pretrain_iterator`."""
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  batch = per_process_batch(config.batch_size, process_count,
                            "config.batch_size")
  if example_views is None:
    example_views = detco_example_views(config)
  source = _open_train_source(config, config.data.train_split, process_index,
                              process_count)
  stream = slot_stream(
      source, order_key=seed_key(config.seed, SeedTag.PRETRAIN_ORDER),
      start_position=start_step * batch)
  view_key = seed_key(config.seed, process_index, SeedTag.PRETRAIN_VIEWS)

  def make_views(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    seed = view_seed(view_key, example["position"])
    if isinstance(example_views, LabelledViews):
      out = dict(example_views.views(example["image"], seed))
      out["label"] = tf.reshape(tf.cast(example["label"], tf.int32), [1])
    else:
      out = dict(example_views(example["image"], seed))
    out[CORRUPT] = example[CORRUPT]
    return out

  ds = stream.map(make_views, num_parallel_calls=AUTOTUNE, deterministic=True)
  return batched(ds, batch, config), source


def make_pretrain_dataset(config: Any, *, process_index: Optional[int] = None,
                          process_count: Optional[int] = None,
                          start_step: int = 0,
                          example_views: (ExampleViews | LabelledViews
                                          | None) = None
                          ) -> tf.data.Dataset:
  """The DetCo pretraining stream as a `tf.data.Dataset`.

  Same batches as `make_pretrain_iterator`, as TF tensors, and still
  carrying "corrupt" [b] int32 (see `InputIterator`).

  Args:
    config: the experiment config (data, views, loss, batch_size, seed).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    start_step: first step of the stream (resume).
    example_views: the method's views of one example; None: DetCo's.

  Returns:
    The batched, prefetched dataset.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  return _pretrain(config, process_index, process_count, start_step,
                   example_views)[0]


def make_pretrain_iterator(config: Any, *,
                           process_index: Optional[int] = None,
                           process_count: Optional[int] = None,
                           start_step: int = 0,
                           example_views: (ExampleViews | LabelledViews
                                          | None) = None
                           ) -> InputIterator:
  """The pretraining batches of this process: infinite, resumable.

  Args:
    config: the experiment config (data, views, loss, batch_size, seed).
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    start_step: first step; the stream equals an uninterrupted run's from
      this step on.
    example_views: the method's views of one example (its keys and shapes
      are the batch's, with a leading b); None: DetCo's.

  Returns:
    An `InputIterator` of {"global": uint8 [b, 2, H, W, 3], "local": uint8
    [b, 2, grid^2, p, p, 3]} (no "local" when `config.loss.global_local` is
    False), b = config.batch_size // process_count; or the batches of
    `example_views`.

  Raises:
    ValueError: bad batch size or views config.
    sources.DatasetUnavailableError: dataset missing or unprepared.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  ds, source = _pretrain(config, process_index, process_count, start_step,
                         example_views)
  return InputIterator(ds, batch_size=config.batch_size // process_count,
                       num_examples=source.num_examples)


def eval_sizes(config: Any) -> tuple[int, int]:
  """(crop, resize) of the linear-probe views.

  Args:
    config: the experiment config.

  Returns:
    `config.eval_views.crop_size` / `resize_size` if present, else
    (views.global_size, round(global_size * 256 / 224)): 224 / 256 at
    ImageNet scale.
  """
  eval_views = config.get("eval_views") or {}
  crop = int(eval_views["crop_size"] if "crop_size" in eval_views
            else config.views.global_size)
  resize = int(eval_views.get("resize_size", round(crop * 256 / 224)))
  return crop, resize


def make_eval_iterator(config: Any, split: str, *, train: bool,
                       batch_size: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None,
                       start_step: int = 0) -> InputIterator:
  """Linear-probe batches of this process (MoCo protocol).

  Args:
    config: the experiment config (data, views / eval_views, seed).
    split: the split to read.
    train: True: RandomResizedCrop (area (0.08, 1)) + flip, infinite,
      shuffled per epoch, resumable like pretraining. False: resize the
      shorter side, centre crop, one pass over this process's shard.
    batch_size: GLOBAL batch size, split evenly over processes.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: number of processes; defaults to `jax.process_count()`.
    start_step: first step (train only).

  Returns:
    An `InputIterator` of {"image": uint8 [b, S, S, 3], "label": int32 [b]},
    plus "mask" int32 [b] for test (1 real, 0 padding; padding has image 0
    and label 0). For test, every process gets the same `num_batches`
    (enough for the largest shard), so processes stay in step.
  """
  process_index, process_count = sources.resolve_processes(
      process_index, process_count)
  batch = per_process_batch(batch_size, process_count)
  crop, resize = eval_sizes(config)
  if train:
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    source = _open_train_source(config, split, process_index, process_count)
    ds = _probe_train_stream(source, config, crop, process_index,
                             start_step * batch)
    return InputIterator(batched(ds, batch, config), batch_size=batch,
                         num_examples=source.num_examples)
  source = sources.open_source(config.data, split,
                               process_index=process_index,
                               process_count=process_count,
                               drop_remainder=False)

  def make_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {"image": views_lib.center_crop(example["image"], resize, crop),
            "label": example["label"], "mask": tf.constant(1, tf.int32)}

  padding = {"image": tf.zeros([crop, crop, 3], tf.uint8),
             "label": tf.constant(0, tf.int32),
             "mask": tf.constant(0, tf.int32)}
  return padded_pass(source, process_count, batch, make_view, padding,
                     prefetch=int(config.data.get("prefetch", 2)))


def padded_pass(source: sources.Source, process_count: int, batch: int,
                make_view: Any, padding: dict[str, tf.Tensor], *,
                prefetch: int = 2,
                num_batches: Optional[int] = None) -> InputIterator:
  """One pass over this process's shard, padded to whole batches.

  Every process gets the same number of batches (enough for the largest
  shard), so processes stay in step through collective test steps.

  Args:
    source: this process's shard (opened with `drop_remainder=False`).
    process_count: number of processes.
    batch: this process's batch size.
    make_view: decoded example -> the element's features.
    padding: the features of a padding element (flagged as not real).
    prefetch: batches prefetched.
    num_batches: the batches of every process, when the caller knows the
      largest shard (a filtered source's split size does not tell it);
      None: enough for `source.split_size` split evenly.

  Returns:
    An `InputIterator` of `num_batches` batches; each element also has the
    "corrupt" count of records dropped just before it.
  """
  if num_batches is None:
    largest_shard = -(-source.split_size // process_count)
    num_batches = max(1, -(-largest_shard // batch))
  ds = _padded_stream(source, make_view, padding).take(num_batches * batch)
  ds = _options(ds.batch(batch, drop_remainder=True).prefetch(prefetch))
  return InputIterator(ds, batch_size=batch, num_examples=source.num_examples,
                       num_batches=num_batches)


def _probe_train_stream(source: sources.Source, config: Any, crop: int,
                        process_index: int,
                        start_position: int) -> tf.data.Dataset:
  """Infinite probe training examples {"image", "label", "corrupt"}."""
  stream = slot_stream(
      source, order_key=seed_key(config.seed, SeedTag.PROBE_ORDER),
      start_position=start_position)
  view_key = seed_key(config.seed, process_index, SeedTag.PROBE_VIEWS)
  flip_prob = float(config.views.get("flip_prob", 0.5))

  def make_view(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = views_lib.random_resized_crop(
        example["image"], view_seed(view_key, example["position"]), crop,
        flip_prob=flip_prob)
    return {"image": image, "label": example["label"],
            CORRUPT: example[CORRUPT]}

  return stream.map(make_view, num_parallel_calls=AUTOTUNE, deterministic=True)


def _padded_stream(source: sources.Source, make_view: Any,
                   padding: dict[str, tf.Tensor]) -> tf.data.Dataset:
  """This shard's examples once, corrupt ones dropped, then padding forever.

  Returns:
    An infinite dataset: `make_view` of each decodable example, then
    `padding`; the caller takes whole batches.
  """
  n = source.num_examples

  def decode(position: tf.Tensor, record: Any) -> dict[str, tf.Tensor]:
    example = source.decode(record)
    return dict(make_view(example), position=position)

  real = (source.records(None).enumerate()
          .map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
          .ignore_errors())
  # Padding sits at position n: the first pad also counts the corrupt
  # records at the end of the shard.
  padding = tf.data.Dataset.from_tensors(
      dict(padding, position=tf.constant(n, tf.int64))).repeat()

  def count_gap(previous: tf.Tensor, example: dict[str, tf.Tensor]):
    position = example.pop("position")
    example[CORRUPT] = tf.cast(tf.maximum(position - previous - 1, 0),
                               tf.int32)
    return tf.maximum(previous, position), example

  return real.concatenate(padding).scan(tf.constant(-1, tf.int64), count_gap)
