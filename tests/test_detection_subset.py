"""Training subsets of the detection transfer (`train_fraction=F`)."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import detection as detection_config
from detco_jax.data import aspect_groups
from detco_jax.data import builtin
from detco_jax.data import detection
from detco_jax.eval import detection as detection_job
from test_pipeline import assert_same_batches, take


def subset_config(data_dir, fraction, **data):
  """The tiny config on `fraction` of its 256 training images, unjittered."""
  c = detection_config.get_config(f"tiny,train_fraction={fraction}")
  c.data.data_dir = data_dir
  c.data.update(data)
  # Unscaled, unflipped outputs copy their source image exactly.
  c.views.min_sizes, c.views.flip_prob = (32,), 0.0
  return c


@pytest.fixture(scope="module")
def index_of(builtin_data_dir):
  """Image bytes -> the built-in training example's "index" (its id)."""
  b = builtin.builder(32, 256, 64, builtin_data_dir)
  table = {e["image"].tobytes(): int(e["index"])
           for e in tfds.as_numpy(b.as_dataset(split="train"))}
  assert len(table) == 256
  return lambda image: table[np.ascontiguousarray(image).tobytes()]


def batch_ids(batches, index_of):
  """The source ids of every image of `batches`, in order."""
  return [index_of(x) for b in batches for x in b["image"]]


# ---- The draw.


def test_the_argument_sets_the_fraction_and_checks_it():
  assert detection_config.get_config().data.train_fraction == 1.0
  assert detection_config.get_config().data.subset_seed == 0
  c = detection_config.get_config("train_fraction=0.1,demo")
  assert (c.data.train_fraction, c.data.dataset) == (0.1, "detco_shapes")
  assert detection_config.get_config(
      "12k,train_fraction=0.01").data.train_fraction == 0.01
  for bad in ("0", "1.5", "-0.1"):
    with pytest.raises(ValueError, match=r"'train_fraction' must be in"):
      detection_config.get_config(f"train_fraction={bad}")


def test_the_ids_depend_on_the_fraction_and_seed_alone(builtin_data_dir):
  base = subset_config(builtin_data_dir, 0.1)
  other = subset_config(builtin_data_dir, 0.1)
  # Another backbone, run seed, batch and model: the same images.
  other.pretrained, other.random_init, other.seed = "elsewhere", True, 7
  other.batch_size, other.model.head_channels = 16, 32
  first = detection.train_subset(base)
  assert first.total == 256 and len(first.ids) == round(0.1 * 256) == 26
  np.testing.assert_array_equal(first.ids, np.sort(first.ids))
  assert set(first.ids) <= set(range(256))
  np.testing.assert_array_equal(detection.train_subset(other).ids, first.ids)
  reseeded = detection.train_subset(subset_config(builtin_data_dir, 0.1,
                                                  subset_seed=1))
  assert len(reseeded.ids) == 26
  assert set(reseeded.ids) != set(first.ids)
  assert detection.train_subset(subset_config(builtin_data_dir, 1.0)) is None


def test_the_draw_is_exact_and_ignores_the_read_order():
  ids = np.arange(1000, 1000 + 118_287 // 100)  # Distinct, like COCO's.
  n = len(ids)
  for fraction in (0.01, 0.02, 0.05, 0.1, 0.5, 1.0):
    assert len(detection.draw_subset(ids, fraction, 0)) == max(
        1, round(fraction * n))
  assert len(detection.draw_subset(ids, 1e-6, 0)) == 1
  shuffled = np.random.default_rng(0).permutation(ids)
  np.testing.assert_array_equal(detection.draw_subset(shuffled, 0.05, 3),
                                detection.draw_subset(ids, 0.05, 3))
  # A smaller fraction at the same seed is a prefix of the same ranking.
  assert set(detection.draw_subset(ids, 0.01, 3)) <= set(
      detection.draw_subset(ids, 0.05, 3))
  with pytest.raises(ValueError, match="ids repeat"):
    detection.draw_subset(np.array([1, 2, 2]), 0.5, 0)
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    detection.draw_subset(ids, 0.0, 0)


# ---- The stream.


def test_batches_hold_the_subset_once_an_epoch(builtin_data_dir, index_of):
  config = subset_config(builtin_data_dir, 0.25)  # 64 images, batch 8.
  subset = detection.train_subset(config)
  it = detection.make_train_iterator(config, subset=subset)
  assert it.num_examples == 64
  first, second = (batch_ids(take(it, 8), index_of) for _ in range(2))
  assert sorted(first) == sorted(second) == sorted(subset.ids)
  assert first != second  # Each epoch in its own order.
  # Two processes: disjoint halves of the same subset.
  config.batch_size = 16
  counts = aspect_groups.GroupCounts(np.stack([detection.count_train_groups(
      config, process_index=p, process_count=2, subset=subset)[0]
                                               for p in range(2)]))
  assert counts.counts.tolist() == [[0, 32], [0, 32]]  # Square: portrait.
  halves = [batch_ids(take(detection.make_train_iterator(
      config, process_index=p, process_count=2, subset=subset,
      group_counts=counts), 4), index_of) for p in range(2)]
  assert sorted(halves[0] + halves[1]) == sorted(subset.ids)


def test_the_subset_stream_resumes_exactly(builtin_data_dir):
  # 26 images, 8 per step: epochs end mid-batch.
  config = subset_config(builtin_data_dir, 0.1)
  config.views.min_sizes, config.views.flip_prob = (16, 24, 32), 0.5
  subset = detection.train_subset(config)
  make = lambda s: detection.make_train_iterator(config, start_step=s,
                                                 subset=subset)
  full = take(make(0), 8)
  for start in (3, 5):
    assert_same_batches(take(make(start), 8 - start), full[start:])


# ---- The workdir's record.


def test_the_subset_file_is_written_and_checked(builtin_data_dir, tmp_path):
  workdir = str(tmp_path)
  subset = detection.train_subset(subset_config(builtin_data_dir, 0.1))
  detection_job.check_subset_file(workdir, subset, resuming=False)
  path = os.path.join(workdir, detection_job.SUBSET_FILE)
  saved = json.load(open(path))
  assert saved["ids"] == sorted(int(i) for i in subset.ids)
  assert (saved["fraction"], saved["seed"], saved["count"],
          saved["total"]) == (0.1, 0, 26, 256)
  assert saved["parts"] == [["detco_shapes", "train"]]
  detection_job.check_subset_file(workdir, subset, resuming=True)
  other = detection.train_subset(subset_config(builtin_data_dir, 0.1,
                                               subset_seed=2))
  for wrong in (other, None):
    with pytest.raises(ValueError) as error:
      detection_job.check_subset_file(workdir, wrong, resuming=True)
    message = str(error.value)
    assert "\n" not in message and "train_fraction 0.1, subset_seed 0" in (
        message)
  # A fresh run on the whole split drops a stopped run's file, and its
  # resume then refuses a subset.
  detection_job.check_subset_file(workdir, None, resuming=False)
  assert not os.path.exists(path)
  with pytest.raises(ValueError, match="trained on the whole training"):
    detection_job.check_subset_file(workdir, subset, resuming=True)


@pytest.mark.long
def test_a_run_writes_its_subset_and_refuses_another(
    tiny_pretrain_workdir, builtin_data_dir, tmp_path):
  config = subset_config(builtin_data_dir, 0.25)
  config.pretrained = tiny_pretrain_workdir
  config.total_steps, config.checkpoint_every = 2, 2
  workdir = str(tmp_path / "run")
  detection_job.run(config, workdir)
  saved = json.load(open(os.path.join(workdir, detection_job.SUBSET_FILE)))
  assert saved["count"] == 64
  config.total_steps, config.data.subset_seed = 4, 1
  with pytest.raises(ValueError, match="Bad config: the checkpoints in"):
    detection_job.run(config, workdir)
