"""Tests of the input benchmark's photographs (detco_jax/benchmark/photos.py)."""

import os

import numpy as np
import tensorflow as tf
from PIL import Image

from detco_jax.benchmark import photos
from detco_jax.data import sources


def test_sizes_follow_the_stated_mixture():
  rng = np.random.default_rng(0)
  sizes = np.array([photos.draw_size(rng) for _ in range(20000)])
  long, short = sizes.max(axis=1), sizes.min(axis=1)
  assert abs(np.mean(long == 500) - 0.80) < 0.01
  assert abs(np.mean(long > 500) - 0.03) < 0.005
  assert long.max() <= 2000 and long.min() >= 150
  assert abs(np.mean(sizes[:, 0] < sizes[:, 1]) - 0.25) < 0.015  # Portrait.
  at_500 = short[long == 500]
  assert abs(np.mean(at_500 == 375) - 0.45 - 0.30 / 251) < 0.015
  assert np.all(short <= long)


def test_folder_holds_every_kind_decodable_by_the_pipeline(tmp_path):
  summary = photos.write_folder(str(tmp_path), 120, seed=1)
  files = sorted(os.listdir(tmp_path))
  assert len(files) == summary.count == 120
  assert all(f.endswith(".JPEG") for f in files)
  assert summary.kinds == {"rgb": 115, "grey": 3, "cmyk": 1, "png": 1}
  modes = {}
  for name in files:
    with Image.open(tmp_path / name) as im:
      modes[im.format, im.mode] = modes.get((im.format, im.mode), 0) + 1
      size = im.size
    image = sources.decode_image(tf.io.read_file(str(tmp_path / name)))
    assert image.shape == (size[1], size[0], 3)
  assert modes == {("JPEG", "RGB"): 115, ("JPEG", "L"): 3,
                   ("JPEG", "CMYK"): 1, ("PNG", "RGB"): 1}
  # About ImageNet's bytes (108 KB a file), far from smooth synthetic fields.
  assert 60 < summary.mean_kb < 160
  assert 0.35 < summary.bytes_per_pixel < 0.8


def test_same_seed_same_files(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir()
  b.mkdir()
  photos.write_folder(str(a), 5, seed=3)
  photos.write_folder(str(b), 5, seed=3)
  for name in os.listdir(a):
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_cut_keeps_the_photographs_own_pixels_when_it_can():
  rng = np.random.default_rng(0)
  photo = np.random.default_rng(1).integers(0, 256, (400, 600, 3), np.uint8)
  image = np.asarray(photos.cut(photo, (300, 200), rng))
  assert image.shape == (200, 300, 3)
  # A window of the photograph itself, not a resampled one.
  found = any(np.array_equal(photo[t:t + 200, l:l + 300], image)
              for t in range(201) for l in range(301)
              if photo[t, l, 0] == image[0, 0, 0])
  assert found
  enlarged = photos.cut(photo, (1200, 800), rng)
  assert enlarged.size == (1200, 800)
