"""Tests of the input streams (detco_jax/data/pipeline.py)."""

import os

import numpy as np
from PIL import Image
import pytest

from configs import detco
from detco_jax.data import pipeline
from detco_jax.data import sources


def write_solid(path, index, size=(40, 30)):
  """A lossless image of one colour that encodes `index` (0..249)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), (index, 255 - index, 7),
                          np.uint8)).save(path)


def solid_folder(root, n, classes=1):
  """n solid PNGs spread over class folders; image i has colour index i."""
  for i in range(n):
    write_solid(os.path.join(root, f"c{i % classes}", f"{i:03d}.png"), i)
  return f"folder:{root}"


def noise_folder(root, n, size=(48, 40)):
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3),
                                 dtype=np.uint8)).save(f"{root}/{i:03d}.png")
  return f"folder:{root}"


def tiny_config(dataset, batch_size=4, **views):
  c = detco.get_config("tiny")
  c.data.dataset = dataset
  c.data.shuffle_buffer = 16
  c.data.prefetch = 1
  c.batch_size = batch_size
  c.views.update(views)
  return c


def ids(batch, key="global"):
  """The colour index of each example of a batch of solid-image views."""
  first = batch[key] if key == "image" else batch[key][:, 0]
  return [int(v) for v in first[:, 0, 0, 0]]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_pretrain_shapes_dtypes(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 6))
  it = pipeline.make_pretrain_iterator(config, process_index=0,
                                       process_count=2, start_step=0)
  batch = next(it)
  assert set(batch) == {"global", "local"}
  assert batch["global"].shape == (2, 2, 32, 32, 3)
  assert batch["local"].shape == (2, 2, 9, 10, 10, 3)
  assert batch["global"].dtype == batch["local"].dtype == np.uint8
  assert it.batch_size == 2 and it.num_examples == 3 and it.num_corrupt == 0
  assert it.num_batches is None
  assert 0 < batch["global"].mean() < 255 and batch["local"].std() > 10


def test_mocov2_mode_skips_local_views(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 4))
  config.loss.global_local = False
  batch = next(pipeline.make_pretrain_iterator(config, process_index=0,
                                               process_count=1))
  assert set(batch) == {"global"}


def test_batch_must_divide_over_processes(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 4), batch_size=6)
  with pytest.raises(ValueError, match=r"batch_size \(6\).*multiple of .*4"):
    pipeline.make_pretrain_iterator(config, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"batch_size \(10\)"):
    pipeline.make_eval_iterator(config, "train", train=False, batch_size=10,
                                process_index=0, process_count=4)


def test_bad_views_config_is_reported(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 4), patch_size=13)
  with pytest.raises(ValueError, match="views.patch_size"):
    pipeline.make_pretrain_iterator(config, process_index=0, process_count=1)


def test_epochs_visit_each_example_once_in_new_orders(tmp_path):
  config = tiny_config(solid_folder(tmp_path, 12), batch_size=4)
  it = pipeline.make_pretrain_iterator(config, process_index=0,
                                       process_count=1)
  epochs = [sum((ids(b) for b in take(it, 3)), []) for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert len({tuple(e) for e in epochs}) == 3


def test_deterministic_and_seed_dependent(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 5))
  make = lambda c, p=0: take(pipeline.make_pretrain_iterator(
      c, process_index=p, process_count=1), 3)
  first = make(config)
  assert_same_batches(first, make(config))
  config.seed = 1
  other = make(config)
  assert not np.array_equal(first[0]["global"], other[0]["global"])
  assert not np.array_equal(first[0]["local"], other[0]["local"])


def test_seed_tags_are_distinct_and_unchanged():
  # `__members__` keeps aliases, which an enum makes of repeated values.
  tags = pipeline.SeedTag.__members__
  assert len({int(t) for t in tags.values()}) == len(tags)
  # The values are part of every stream's data.
  assert {name: int(t) for name, t in tags.items()} == {
      "PRETRAIN_ORDER": 1, "PRETRAIN_VIEWS": 2, "PROBE_ORDER": 3,
      "PROBE_VIEWS": 4, "DENSE_ORDER": 5, "DENSE_VIEWS": 6,
      "DETECTION_ORDER": 7, "DETECTION_VIEWS": 8, "DETECTION_GROUPS": 9}


def test_views_differ_across_processes(tmp_path):
  # Two copies of one image: each process reads one, so only the per-process
  # view seeds can make their views differ.
  noise_folder(tmp_path, 1)
  os.link(tmp_path / "000.png", tmp_path / "001.png")
  config = tiny_config(f"folder:{tmp_path}", batch_size=2)
  a, b = (next(pipeline.make_pretrain_iterator(config, process_index=p,
                                               process_count=2))
          for p in range(2))
  assert not np.array_equal(a["global"], b["global"])
  assert not np.array_equal(a["local"], b["local"])


@pytest.mark.parametrize(
    "corrupt", [False, pytest.param(True, marks=pytest.mark.long)])
def test_resume_equals_uninterrupted_stream(tmp_path, corrupt):
  # 10 images, 4 per step: epochs end mid-batch (steps 2 and 5).
  dataset = solid_folder(tmp_path, 10)
  if corrupt:
    (tmp_path / "c0" / "004.png").write_bytes(b"garbage")
    (tmp_path / "c0" / "005.png").write_bytes(b"")
  config = tiny_config(dataset, batch_size=4)
  full = take(pipeline.make_pretrain_iterator(config, process_index=0,
                                              process_count=1), 7)
  # Mid-epoch (step 2 = record 8), just past a boundary (step 3 = epoch 1,
  # record 2) and on a boundary (step 5 = epoch 2, record 0).
  for start in (2, 3, 5):
    resumed = take(pipeline.make_pretrain_iterator(
        config, process_index=0, process_count=1, start_step=start), 7 - start)
    assert_same_batches(resumed, full[start:])


@pytest.mark.long
def test_resume_of_second_process(tmp_path):
  config = tiny_config(noise_folder(tmp_path, 9), batch_size=4)
  make = lambda s: pipeline.make_pretrain_iterator(
      config, process_index=1, process_count=2, start_step=s)
  full = take(make(0), 6)
  assert_same_batches(take(make(4), 2), full[4:])


def test_corrupt_images_are_skipped_and_counted(tmp_path):
  dataset = solid_folder(tmp_path, 8)
  (tmp_path / "c0" / "002.png").write_text("not an image")
  data = (tmp_path / "c0" / "006.png").read_bytes()
  (tmp_path / "c0" / "006.png").write_bytes(data[:len(data) // 2])
  config = tiny_config(dataset, batch_size=4)
  it = pipeline.make_pretrain_iterator(config, process_index=0,
                                       process_count=1)
  epoch = sum((ids(b) for b in take(it, 2)), [])  # One epoch: 8 slots.
  assert it.num_corrupt == 2
  assert {2, 6}.isdisjoint(epoch)
  # The six good images all appear; two of them twice (filling the slots).
  assert set(epoch) == {0, 1, 3, 4, 5, 7} and len(epoch) == 8
  take(it, 2)
  assert it.num_corrupt == 4  # Counted again in the second epoch.


def test_all_corrupt_folder_fails_fast(tmp_path):
  for i in range(3):
    (tmp_path / f"{i}.jpg").write_text("text")
  config = tiny_config(f"folder:{tmp_path}")
  with pytest.raises(sources.DatasetUnavailableError, match="decodes"):
    pipeline.make_pretrain_iterator(config, process_index=0, process_count=1)


def test_missing_dataset_gives_guiding_error(tmp_path):
  config = tiny_config("imagenet2012")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(sources.DatasetUnavailableError,
                     match="downloads/manual.*tfds build imagenet2012"):
    pipeline.make_pretrain_iterator(config, process_index=0, process_count=1)
  config = tiny_config(f"folder:{tmp_path}/nowhere")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pipeline.make_eval_iterator(config, "test", train=False, batch_size=4,
                                process_index=0, process_count=1)


@pytest.mark.long
def test_pretrain_processes_read_disjoint_shards(tmp_path):
  config = tiny_config(solid_folder(tmp_path, 12, classes=3), batch_size=4)
  seen = []
  for p in range(2):
    it = pipeline.make_pretrain_iterator(config, process_index=p,
                                         process_count=2)
    seen.append(sum((ids(b) for b in take(it, 3)), []))  # One epoch each.
  assert sorted(seen[0]) == sorted(set(seen[0]))
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(12))


def test_eval_test_single_pass_with_padding(tmp_path):
  config = tiny_config(solid_folder(tmp_path, 11, classes=2))
  config.eval_views = dict(crop_size=24, resize_size=28)
  seen, per_process = [], []
  for p in range(2):
    it = pipeline.make_eval_iterator(config, "test", train=False,
                                     batch_size=8, process_index=p,
                                     process_count=2)
    batches = list(it)
    per_process.append(len(batches))
    assert len(batches) == it.num_batches == 2  # ceil(ceil(11 / 2) / 4).
    for b in batches:
      assert b["image"].shape == (4, 24, 24, 3) and b["image"].dtype == np.uint8
      assert b["label"].dtype == np.int32 and b["mask"].dtype == np.int32
      real = b["mask"] == 1
      seen += [(i, int(l)) for i, l in zip(ids(b, "image"), b["label"])
               if l >= 0][:int(real.sum())]
      assert np.all(b["image"][~real] == 0)
    assert batches[0]["mask"].tolist() == [1, 1, 1, 1]
    assert batches[-1]["mask"].tolist() == ([1, 1, 0, 0] if p == 0 else
                                            [1, 0, 0, 0])
  assert sorted(seen) == [(i, i % 2) for i in range(11)]
  assert per_process[0] == per_process[1]


def test_eval_test_drops_and_counts_corrupt(tmp_path):
  dataset = solid_folder(tmp_path, 6)
  (tmp_path / "c0" / "005.png").write_text("broken")  # The last record.
  (tmp_path / "c0" / "001.png").write_text("broken")
  config = tiny_config(dataset)
  it = pipeline.make_eval_iterator(config, "test", train=False, batch_size=4,
                                   process_index=0, process_count=1)
  batches = list(it)
  mask = np.concatenate([b["mask"] for b in batches])
  got = np.concatenate([ids(b, "image") for b in batches])[mask == 1]
  assert sorted(got) == [0, 2, 3, 4] and mask.tolist() == [1] * 4 + [0] * 4
  assert it.num_corrupt == 2


def test_eval_train_stream(tmp_path):
  config = tiny_config(solid_folder(tmp_path, 10, classes=2))
  make = lambda s: pipeline.make_eval_iterator(
      config, "train", train=True, batch_size=4, process_index=0,
      process_count=1, start_step=s)
  full = take(make(0), 6)
  batch = full[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, 32, 32, 3)  # views.global_size
  assert batch["label"].dtype == np.int32
  for b in full:
    np.testing.assert_array_equal(b["label"], np.array(ids(b, "image")) % 2)
  assert_same_batches(take(make(3), 3), full[3:])
  assert pipeline.eval_sizes(config) == (32, 37)


def test_builtin_dataset_end_to_end(tmp_path):
  config = tiny_config("detco_shapes", batch_size=8)
  config.data.data_dir = str(tmp_path)
  config.data.builtin_num_train = 24
  config.data.builtin_num_test = 10
  it = pipeline.make_pretrain_iterator(config, process_index=0,
                                       process_count=2)
  batch = next(it)
  assert batch["global"].shape == (4, 2, 32, 32, 3)
  assert batch["local"].shape == (4, 2, 9, 10, 10, 3)
  assert it.num_examples == 12
  test = list(pipeline.make_eval_iterator(config, "test", train=False,
                                          batch_size=8, process_index=0,
                                          process_count=2))
  assert len(test) == 2 and int(sum(b["mask"].sum() for b in test)) == 5
  assert all(0 <= l < 10 for b in test for l in b["label"][b["mask"] == 1])
  probe = next(pipeline.make_eval_iterator(config, "train", train=True,
                                           batch_size=8, process_index=1,
                                           process_count=2))
  assert probe["image"].shape == (4, 32, 32, 3)


@pytest.mark.long
def test_builtin_dataset_resume(tmp_path):
  # TFRecord reading: per-epoch file order + seeded shuffle buffer, and the
  # in-epoch skip reads undecoded records. 24 examples, 10 per step.
  config = tiny_config("detco_shapes", batch_size=10)
  config.data.data_dir = str(tmp_path)
  config.data.builtin_num_train = 24
  config.data.shuffle_buffer = 8
  make = lambda s: pipeline.make_pretrain_iterator(
      config, process_index=0, process_count=1, start_step=s)
  full = take(make(0), 5)
  assert_same_batches(take(make(3), 2), full[3:])  # Epoch 1, record 6.
