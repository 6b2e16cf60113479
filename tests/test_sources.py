"""Tests of the record sources (detco_jax/data/sources.py)."""

import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from detco_jax.data import sources


class DetcoTestTinyImages(tfds.core.GeneratorBasedBuilder):
  """A tiny offline TFDS dataset: example i is a solid image of value i."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "extra": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(25),
            "test": self._generate_examples(7)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 3,
                "extra": np.zeros(2, np.float32)}


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """Prepares the tiny TFDS dataset (3 shards) and returns its data config."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  DetcoTestTinyImages(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=3))
  return data_config("detco_test_tiny_images", data_dir=data_dir)


def data_config(dataset, **kw):
  c = ml_collections.ConfigDict(dict(
      dataset=dataset, train_split="train", eval_split="test", data_dir=None,
      image_key="image", label_key="label", shuffle_buffer=8, prefetch=1,
      builtin_image_size=32, builtin_num_train=24, builtin_num_test=10))
  c.update(kw)
  return c


def write_image(path, value, size=(12, 10), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(
      path, format=fmt)


def make_folder(root, counts, ext=".png"):
  """Class sub-folders with `counts[c]` solid images; value = running index."""
  index = 0
  for c, n in enumerate(counts):
    for _ in range(n):
      write_image(os.path.join(root, f"class_{c}", f"img{index:03d}{ext}"),
                  index)
      index += 1


def decoded(source, seed=None):
  """All decoded (first pixel value, label) pairs of a source."""
  ds = source.records(seed).map(source.decode)
  return [(int(x["image"][0, 0, 0]), int(x["label"])) for x in ds]


def test_folder_with_classes(tmp_path):
  make_folder(tmp_path / "train", [3, 2, 4])
  write_image(str(tmp_path / "train" / "ignored_root_file.png"), 250)
  config = data_config(f"folder:{tmp_path}")
  assert sources.num_examples(config, "train") == 9
  assert sources.num_classes(config) == 3
  source = sources.open_source(config, "train", process_index=0,
                               process_count=1)
  assert source.num_examples == 9 and source.num_classes == 3
  pairs = decoded(source)
  assert pairs == [(i, 0 if i < 3 else 1 if i < 5 else 2) for i in range(9)]
  image = next(iter(source.records().map(source.decode)))["image"]
  assert image.shape == (10, 12, 3) and image.dtype == tf.uint8


def test_folder_without_classes_and_formats(tmp_path):
  for i, (ext, fmt) in enumerate([(".jpg", "JPEG"), (".PNG", "PNG"),
                                  (".bmp", "BMP"), (".gif", "GIF")]):
    write_image(str(tmp_path / f"x{i}{ext}"), 100, fmt=fmt)
  (tmp_path / "notes.txt").write_text("not listed")
  config = data_config(f"folder:{tmp_path}")
  assert sources.num_classes(config) == 0
  source = sources.open_source(config, "anything", process_index=0,
                               process_count=1)
  pairs = decoded(source)
  assert len(pairs) == 4 and {label for _, label in pairs} == {-1}
  assert all(abs(v - 100) <= 2 for v, _ in pairs)  # JPEG is lossy.


def test_folder_split_subfolders(tmp_path):
  make_folder(tmp_path / "train", [2, 2])
  make_folder(tmp_path / "val", [1, 1])
  config = data_config(f"folder:{tmp_path}")
  assert sources.num_examples(config, "train") == 4
  assert sources.num_examples(config, "val") == 2
  with pytest.raises(sources.DatasetUnavailableError,
                     match="split sub-folders.*'validation'"):
    sources.num_examples(config, "validation")


@pytest.mark.parametrize("drop_remainder, n", [(True, 10), (False, 11)])
def test_folder_process_shards_disjoint_and_cover(tmp_path, drop_remainder, n):
  make_folder(tmp_path, [n // 2, n - n // 2])
  config = data_config(f"folder:{tmp_path}")
  shards = [decoded(sources.open_source(config, "train", process_index=p,
                                        process_count=2,
                                        drop_remainder=drop_remainder))
            for p in range(2)]
  values = [{v for v, _ in shard} for shard in shards]
  assert not values[0] & values[1]
  assert values[0] | values[1] == set(range(n))
  # Strided sharding: every process sees both classes.
  assert all({label for _, label in shard} == {0, 1} for shard in shards)


def test_folder_shuffled_order_is_a_seeded_permutation(tmp_path):
  make_folder(tmp_path, [6, 6])
  source = sources.open_source(data_config(f"folder:{tmp_path}"), "train",
                               process_index=0, process_count=1)
  seed = lambda e: tf.constant([3, e], tf.int64)
  a, b, c = decoded(source, seed(0)), decoded(source, seed(0)), decoded(
      source, seed(1))
  assert a == b and a != c
  assert sorted(a) == sorted(c) == decoded(source)


def test_folder_errors(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError,
                     match="does not exist.*folder:/path/to/images"):
    sources.open_source(data_config(f"folder:{tmp_path}/missing"), "train",
                        process_index=0, process_count=1)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="No image files"):
    sources.open_source(data_config(f"folder:{tmp_path}/empty"), "train",
                        process_index=0, process_count=1)
  write_image(str(tmp_path / "one" / "a.png"), 1)
  with pytest.raises(sources.DatasetUnavailableError, match="gets no example"):
    sources.open_source(data_config(f"folder:{tmp_path}/one"), "train",
                        process_index=1, process_count=2)


def test_corrupt_images_raise_in_decode_and_all_corrupt_is_reported(tmp_path):
  (tmp_path / "text.jpg").write_text("this is not a JPEG")
  write_image(str(tmp_path / "full.jpg"), 9, size=(64, 64), fmt="JPEG")
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
  os.remove(tmp_path / "full.jpg")
  source = sources.open_source(data_config(f"folder:{tmp_path}"), "train",
                               process_index=0, process_count=1)
  assert source.num_examples == 2
  for record in source.records():
    with pytest.raises(tf.errors.InvalidArgumentError):
      source.decode(record)
  with pytest.raises(sources.DatasetUnavailableError, match="decodes"):
    source.check_decodable()


def test_unknown_and_unprepared_tfds_datasets(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError,
                     match="Unknown dataset 'cifar_ten'.*Did you mean.*"
                     "cifar10"):
    sources.open_source(data_config("cifar_ten"), "train", process_index=0,
                        process_count=1)
  with pytest.raises(sources.DatasetUnavailableError) as e:
    sources.num_examples(data_config("imagenet2012", data_dir=str(tmp_path)),
                         "train")
  message = str(e.value)
  assert f"{tmp_path}/downloads/manual/" in message
  assert "ILSVRC2012_img_train.tar" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  with pytest.raises(FileNotFoundError,
                     match=f"tfds build cifar10 --data_dir={tmp_path}"):
    sources.open_source(data_config("cifar10", data_dir=str(tmp_path)),
                        "train", process_index=0, process_count=1)


def test_tfds_source(tiny_tfds):
  assert sources.num_examples(tiny_tfds, "train") == 25
  assert sources.num_classes(tiny_tfds) == 3
  source = sources.open_source(tiny_tfds, "test", process_index=0,
                               process_count=1)
  pairs = decoded(source)
  assert sorted(pairs) == [(i, i % 3) for i in range(7)]
  with pytest.raises(sources.DatasetUnavailableError, match="no split"):
    sources.open_source(tiny_tfds, "validation", process_index=0,
                        process_count=1)
  bad_key = tiny_tfds.copy_and_resolve_references()
  bad_key.image_key = "extra"
  with pytest.raises(sources.DatasetUnavailableError, match="image_key"):
    sources.open_source(bad_key, "train", process_index=0, process_count=1)


@pytest.mark.parametrize("drop_remainder, covered", [(True, 24), (False, 25)])
def test_tfds_process_shards_disjoint_and_cover(tiny_tfds, drop_remainder,
                                                covered):
  shards = [
      decoded(sources.open_source(tiny_tfds, "train", process_index=p,
                                  process_count=2,
                                  drop_remainder=drop_remainder))
      for p in range(2)]
  values = [{v for v, _ in shard} for shard in shards]
  assert not values[0] & values[1]
  assert len(values[0] | values[1]) == covered
  assert sum(len(s) for s in shards) == covered


def test_tfds_shuffled_epochs(tiny_tfds):
  source = sources.open_source(tiny_tfds, "train", process_index=0,
                               process_count=1)
  seed = lambda e: tf.constant([5, e], tf.int64)
  a, b, c = decoded(source, seed(0)), decoded(source, seed(0)), decoded(
      source, seed(1))
  assert a == b and a != c
  assert sorted(a) == sorted(c) == sorted(decoded(source))
  assert len(a) == 25


def test_non_tfrecord_tfds_dataset_is_reported(tmp_path):
  DetcoTestTinyImages(data_dir=str(tmp_path),
                      file_format="array_record").download_and_prepare()
  config = data_config("detco_test_tiny_images", data_dir=str(tmp_path))
  with pytest.raises(sources.DatasetUnavailableError,
                     match="array_record.*--file_format=tfrecord"):
    sources.open_source(config, "train", process_index=0, process_count=1)


def test_builtin_detco_shapes(tmp_path):
  config = data_config("detco_shapes", data_dir=str(tmp_path))
  assert sources.num_examples(config, "train") == 24
  assert sources.num_examples(config, "test") == 10
  assert sources.num_classes(config) == 10
  source = sources.open_source(config, "test", process_index=1,
                               process_count=2, drop_remainder=False)
  assert source.num_examples == 5
  examples = list(source.records().map(source.decode))
  assert len(examples) == 5
  assert examples[0]["image"].shape == (32, 32, 3)
  assert all(0 <= int(x["label"]) < 10 for x in examples)


def test_default_process_index_comes_from_jax(tmp_path):
  make_folder(tmp_path, [2])
  source = sources.open_source(data_config(f"folder:{tmp_path}"), "train")
  assert (source.process_index, source.process_count) == (0, 1)
  with pytest.raises(ValueError, match="process_index"):
    sources.open_source(data_config(f"folder:{tmp_path}"), "train",
                        process_index=2, process_count=2)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_pixels_equal_pils_decoder(tmp_path, mode):
  """The reference pipeline decodes with PIL: the same pixels, every mode.

  TF's default IDCT (the fast one) would be about 1.3 grey levels off.
  """
  from skimage import data  # pylint: disable=g-import-not-at-top
  path = tmp_path / "photo.JPEG"
  Image.fromarray(data.coffee()).convert(mode).save(path, quality=95)
  ours = sources.decode_image(tf.io.read_file(str(path))).numpy()
  with Image.open(path) as im:
    pils = np.asarray(im.convert("RGB"))
  assert ours.shape == pils.shape == (400, 600, 3)
  if mode == "CMYK":  # PIL and TF convert CMYK to RGB each their own way.
    assert np.abs(ours.astype(int) - pils).mean() < 1.0
  else:
    np.testing.assert_array_equal(ours, pils)
  fast = tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3).numpy()
  assert np.abs(fast.astype(int) - pils).mean() > 0.3


def test_png_named_jpeg_decodes(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  path = tmp_path / "n02105855_2933.JPEG"
  Image.fromarray(image).save(path, format="PNG")
  np.testing.assert_array_equal(
      sources.decode_image(tf.io.read_file(str(path))).numpy(), image)
