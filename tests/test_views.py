"""Tests of the host-side DetCo views (detco_jax/data/views.py)."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from configs import detco
from detco_jax.data import views

TINY = views.ViewSpec(global_size=32, local_size=36, grid=3, patch_size=10)


def _seed(i, j=0):
  return tf.constant([i, j], tf.int64)


def _noise_image(h=50, w=40, seed=0):
  return tf.constant(np.random.default_rng(seed).integers(
      0, 256, (h, w, 3), dtype=np.uint8))


def _grid_image(cell=30, grid=3):
  """Each of the grid x grid cells has its own solid colour; returns colours."""
  colours = np.array([[40 * r + 20, 40 * c + 20, 200 - 20 * (r + c)]
                      for r in range(grid) for c in range(grid)], np.uint8)
  image = np.zeros((grid * cell, grid * cell, 3), np.uint8)
  for k, colour in enumerate(colours):
    r, c = divmod(k, grid)
    image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = colour
  return tf.constant(image), colours


def test_spec_from_config_and_validation():
  demo = detco.get_config("demo").views
  spec = views.ViewSpec.from_config(demo)
  assert (spec.global_size, spec.local_size, spec.patch_size) == (
      demo.global_size, demo.local_size, demo.patch_size)
  assert spec.cell_size == demo.local_size // 3 and spec.num_patches == 9
  assert spec.local_ratio == spec.global_ratio
  with pytest.raises(ValueError, match=r"views\.patch_size \(30\).*"
                     r"views\.local_size // views\.grid.*views\.local_size "
                     r">= 90"):
    views.ViewSpec(local_size=72, grid=3, patch_size=30)
  bad = detco.get_config("tiny").views
  bad.patch_size = 13
  with pytest.raises(ValueError, match="views.patch_size"):
    views.ViewSpec.from_config(bad)
  with pytest.raises(ValueError, match="global_area"):
    views.ViewSpec(global_area=(0.5, 1.5))


@pytest.mark.parametrize("with_local", [True, False])
def test_detco_views_shapes_dtypes_and_ranges(with_local):
  image = _noise_image()
  out = views.detco_views(image, _seed(1), TINY, with_local=with_local)
  assert out["global"].shape == (2, 32, 32, 3)
  assert out["global"].dtype == tf.uint8
  if with_local:
    assert out["local"].shape == (2, 9, 10, 10, 3)
    assert out["local"].dtype == tf.uint8
  else:
    assert "local" not in out
  # Bilinear resampling stays within the image's value range, and a solid
  # image stays exactly that colour.
  lo, hi = image.numpy().min(), image.numpy().max()
  for v in out.values():
    assert lo <= v.numpy().min() and v.numpy().max() <= hi
  solid = views.detco_views(tf.fill([45, 61, 3], tf.constant(77, tf.uint8)),
                            _seed(2), TINY)
  for v in solid.values():
    np.testing.assert_array_equal(v.numpy(), 77)


def test_views_run_in_tf_data_graph():
  ds = tf.data.Dataset.range(3).map(
      lambda i: views.detco_views(_noise_image(), tf.stack([i, i]), TINY))
  shapes = [tuple(x["local"].shape) for x in ds]
  assert shapes == [(2, 9, 10, 10, 3)] * 3


def test_sample_crops_torchvision_rule():
  shape = tf.constant([60, 80, 3])
  crops = np.concatenate([
      views.sample_crops(_seed(i), shape, 2, (0.2, 1.0), (3 / 4, 4 / 3))
      for i in range(50)])
  top, left, h, w = crops.T
  assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
  assert np.all((top + h <= 60) & (left + w <= 80))
  area = h * w / (60 * 80)
  assert np.all((area > 0.18) & (area < 1.02))
  ratio = w / h
  assert np.all((ratio > 0.7) & (ratio < 1.4))
  assert len({tuple(c) for c in crops}) > 90  # Random, not a fixed crop.
  # A very elongated image: no draw fits, the fallback centre crop succeeds.
  fallback = views.sample_crops(_seed(0), tf.constant([10, 400]), 3,
                                (0.9, 1.0), (3 / 4, 4 / 3)).numpy()
  np.testing.assert_array_equal(fallback, [[0, 193, 10, 13]] * 3)


def test_global_view_of_whole_image_is_exact_copy_and_flip():
  image = _noise_image(32, 32)
  spec = views.ViewSpec(global_size=32, global_area=(1.0, 1.0),
                        global_ratio=(1.0, 1.0), flip_prob=0.0)
  out = views.global_views(image, _seed(3), spec).numpy()
  np.testing.assert_array_equal(out, np.stack([image.numpy()] * 2))
  flipped = views.global_views(
      image, _seed(3), views.ViewSpec(**{**spec.__dict__, "flip_prob": 1.0}))
  np.testing.assert_array_equal(flipped.numpy()[0], image.numpy()[:, ::-1])


def test_antialiased_global_view_matches_pil_and_copies_at_own_size():
  """`views.antialias`: a 2x shrink filters like PIL's bilinear resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _noise_image(64, 64, seed=4)
  whole = dict(global_size=32, global_area=(1.0, 1.0), global_ratio=(1.0, 1.0),
               flip_prob=0.0)
  config = detco.get_config("demo").views
  config.antialias = True
  assert views.ViewSpec.from_config(config).antialias
  smooth = views.global_views(
      image, _seed(5), views.ViewSpec(antialias=True, **whole)).numpy()[0]
  plain = views.global_views(
      image, _seed(5), views.ViewSpec(**whole)).numpy()[0]
  pil = np.asarray(Image.fromarray(image.numpy()).resize(
      (32, 32), Image.Resampling.BILINEAR))
  # PIL rounds its own integer arithmetic: one grey level apart at most.
  assert np.abs(smooth.astype(int) - pil.astype(int)).max() <= 1
  # Plain bilinear at 2x is a 2x2 box: visibly noisier on noise.
  assert plain.astype(float).std() > smooth.astype(float).std() + 5
  same = views.global_views(
      image, _seed(5), views.ViewSpec(antialias=True, **{
          **whole, "global_size": 64})).numpy()[0]
  np.testing.assert_array_equal(same, image.numpy())


def test_global_views_flip_independently():
  image = _noise_image(32, 32)
  spec = views.ViewSpec(global_size=32, global_area=(1.0, 1.0),
                        global_ratio=(1.0, 1.0), flip_prob=0.5)
  patterns = set()
  for i in range(40):
    out = views.global_views(image, _seed(i), spec).numpy()
    patterns.add(tuple(bool(np.array_equal(v, image.numpy()[:, ::-1]))
                       for v in out))
  assert patterns == set(itertools.product([False, True], repeat=2))


def _jigsaw_spec(**kw):
  # local_min_area=1 on a square image: the jigsaw crop is the whole image.
  args = dict(local_size=90, grid=3, patch_size=20, local_min_area=1.0,
              flip_prob=0.0)
  args.update(kw)
  return views.ViewSpec(**args)


def test_jigsaw_patches_are_nine_distinct_cells_shuffled():
  image, colours = _grid_image()
  spec = _jigsaw_spec()
  orders = []
  for i in range(20):
    patches = views.jigsaw_views(image, _seed(i), spec).numpy()
    assert patches.shape == (2, 9, 20, 20, 3)
    for patch_set in patches:
      order = []
      for patch in patch_set:
        # Each patch lies inside one cell: a single solid cell colour.
        assert np.all(patch == patch[0, 0])
        matches = np.flatnonzero(np.all(colours == patch[0, 0], axis=1))
        assert len(matches) == 1
        order.append(int(matches[0]))
      assert sorted(order) == list(range(9))  # Nine distinct cells.
      orders.append(tuple(order))
  assert any(o != tuple(range(9)) for o in orders)  # Shuffled...
  assert len(set(orders)) > 30  # ...by different permutations,
  pairs = zip(orders[0::2], orders[1::2])
  assert sum(a != b for a, b in pairs) >= 18  # different for the two sets.


def test_jigsaw_patches_match_resize_then_cut():
  """Each patch is a patch_size crop inside one cell of the resized crop."""
  image = _noise_image(50, 50, seed=5)
  side, cell, p = 36, 12, 10
  # The reference: the whole image resized to side^2 ("align corners").
  ref = tf.image.crop_and_resize(image[None], [[0.0, 0.0, 1.0, 1.0]], [0],
                                 [side, side])[0].numpy()
  for flip_prob in (0.0, 1.0):
    local = ref[:, ::-1] if flip_prob else ref
    spec = _jigsaw_spec(local_size=side, patch_size=p, flip_prob=flip_prob)
    patches = views.jigsaw_views(image, _seed(9), spec).numpy()
    for patch_set in patches:
      cells = []
      for patch in patch_set.astype(np.float32):
        hits = [(r, c) for r, c in itertools.product(range(3), range(3))
                for oy in range(cell - p + 1) for ox in range(cell - p + 1)
                if np.abs(local[r * cell + oy:r * cell + oy + p,
                                c * cell + ox:c * cell + ox + p] -
                          patch).max() <= 0.51]
        assert len(set(hits)) == 1, hits
        cells.append(hits[0])
      assert len(set(cells)) == 9


def test_views_deterministic_per_seed_and_different_across_seeds():
  image = _noise_image()
  a = views.detco_views(image, _seed(4, 7), TINY)
  b = views.detco_views(image, _seed(4, 7), TINY)
  c = views.detco_views(image, _seed(4, 8), TINY)
  for k in ("global", "local"):
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())
    assert not np.array_equal(a[k].numpy(), c[k].numpy())
  # The two global views, and the two patch sets, are independent draws.
  assert not np.array_equal(a["global"][0], a["global"][1])
  assert not np.array_equal(a["local"][0], a["local"][1])


def test_probe_views():
  image = _noise_image(100, 200)
  rrc = views.random_resized_crop(image, _seed(1), 24)
  assert rrc.shape == (24, 24, 3) and rrc.dtype == tf.uint8
  centre = views.center_crop(image, 30, 24)
  assert centre.shape == (24, 24, 3) and centre.dtype == tf.uint8
  # Resize 100x200 -> 30x60, then the central 24x24 window: columns 18..41.
  resized = tf.image.resize(image, [30, 60], antialias=True).numpy()
  np.testing.assert_allclose(centre.numpy(), resized[3:27, 18:42], atol=0.51)
  with pytest.raises(ValueError, match="centre crop"):
    views.center_crop(image, 20, 24)


def _photograph(h=375, w=500):
  """A real photograph (scikit-image's bundled coffee) cut to h x w."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  return tf.constant(data.coffee()[:h, :w])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_jigsaw_views_equal_the_per_patch_resample_within_one_level(
    flip_prob):
  """The faster path (resize the crop once, slice) against the old one.

  The old path resampled each patch from the source image with
  `crop_and_resize` on the boxes of `jigsaw_boxes`; both sample the same
  source positions, so they differ only by float rounding at x.5 levels.
  """
  spec = views.ViewSpec.from_config(detco.get_config().views)
  spec = views.ViewSpec(**{**spec.__dict__, "flip_prob": flip_prob})
  diffs = []
  for i, image in enumerate([_photograph(), _photograph(300, 451),
                             _noise_image(200, 260, seed=3)]):
    for j in range(3):
      seed = _seed(i, j)
      new = views.jigsaw_views(image, seed, spec).numpy().astype(int)
      old = views.resample_patches(
          image, views.jigsaw_boxes(seed, tf.shape(image), spec),
          spec.patch_size).numpy().astype(int)
      assert new.shape == old.shape == (2, 9, 64, 64, 3)
      diffs.append(np.abs(new - old))
  diffs = np.stack(diffs)
  assert diffs.max() <= 1
  assert diffs.mean() < 1e-3


def test_round_to_uint8_equals_the_saturating_rounding_on_resampled_pixels():
  """The plain cast rounds bilinear and triangle output as `_to_uint8` did."""
  image = _photograph()
  for antialias in (False, True):
    resized = tf.image.resize(image, [97, 131], antialias=antialias)
    np.testing.assert_array_equal(views._round_to_uint8(resized).numpy(),
                                  views._to_uint8(resized).numpy())
  extremes = tf.constant([0.0, 254.49, 254.5, 255.0, 255.0001, -1e-4, 0.4999])
  np.testing.assert_array_equal(views._round_to_uint8(extremes).numpy(),
                                views._to_uint8(extremes).numpy())
