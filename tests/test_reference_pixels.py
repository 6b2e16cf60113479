"""experiments/reference_pixels.py's measurements on two small photographs."""

import numpy as np
import pytest

from configs import detco
from detco_jax.data import views
from experiments import reference_pixels as script


@pytest.fixture(scope="module")
def spec():
  return views.ViewSpec.from_config(detco.get_config().views)


@pytest.fixture(scope="module")
def photos():
  # One colour and one grey photograph, longer side 128 px.
  return script.load_photos(128, ("chelsea", "camera"))


def test_photos_are_rgb_at_the_requested_size(photos):
  for image in photos.values():
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert max(image.shape[:2]) == 128
  camera = photos["camera"]
  assert np.array_equal(camera[..., 0], camera[..., 2])


def test_a_crop_resized_to_its_own_size_matches_pil_exactly(photos):
  image = photos["chelsea"]
  error = script.view_error(image, np.array([10, 20, 64, 64]), 64)
  assert error.shrink == 1.0
  assert error.bilinear == error.antialias == error.pil_float == 0.0


def test_antialias_is_closer_to_pil_when_shrinking_3x(photos, spec):
  # 32 px views of 57-128 px crops: shrink factors up to 4.
  errors = script.global_view_errors(photos, spec, 12, size=32)
  shrunk = [e for e in errors if e.shrink >= 3]
  assert len(shrunk) >= 3
  bilinear = np.mean([e.bilinear for e in shrunk])
  antialias = np.mean([e.antialias for e in shrunk])
  assert antialias < 0.5 * bilinear
  # TF's antialiased bilinear is PIL's filter: it differs from PIL's float
  # path by rounding ties only, and from PIL's uint8 path by PIL's rounding.
  assert max(e.antialias_float for e in shrunk) < 0.05
  assert antialias < np.mean([e.pil_float for e in shrunk]) + 0.05
  rows = script.shrink_rows(errors)
  assert [r[0] for r in rows] == [b[0] for b in script.SHRINK_BINS] + ["all"]
  assert sum(int(r[1]) for r in rows[:-1]) == int(rows[-1][1]) == 24


def test_materialised_jigsaw_crop_gives_the_pipelines_patches(photos, spec):
  image = photos["chelsea"]
  crop = script.jigsaw_crop(image, (0, 1000), spec)
  assert crop.shape == (spec.local_size, spec.local_size, 3)
  corners = script.patch_corners(np.random.default_rng(0), spec)
  assert corners.shape == (9, 2)
  cells = corners // spec.cell_size
  assert len({tuple(c) for c in cells}) == 9
  assert np.all(corners % spec.cell_size + spec.patch_size <= spec.cell_size)
  assert script.pipeline_patch_gap(image, (0, 1000), corners, spec) <= 1


def test_whole_crop_and_per_patch_blur(photos, spec):
  aug = detco.get_config().aug
  crop = script.jigsaw_crop(photos["chelsea"], (0, 1000), spec)
  corners = script.patch_corners(np.random.default_rng(1), spec)
  sigma, taps = script.local_blur(2.0, spec, aug)
  assert taps == 27 and sigma == pytest.approx(2.0 * 255 / 224)
  strong = script.blur_error(crop, corners, spec.patch_size, sigma, taps)
  # Farther than the kernel radius from every patch edge: the same pixels.
  assert strong.interior < 1e-3
  assert strong.border > 0.1 and strong.overall > 0.05
  tiny = script.blur_error(crop, corners, spec.patch_size,
                           script.local_blur(0.1, spec, aug)[0], taps)
  assert tiny.overall < 1e-3 and tiny.max < 0.01
  delta = script.blur_error(crop, corners, spec.patch_size, 1.0, 1)
  assert delta.overall == delta.max == 0.0


def test_border_band_and_transfer_bytes(spec):
  d = script.border_distance(64)
  assert d[0, 30] == 0 and d[63, 63] == 0 and d[31, 32] == 31
  assert np.mean(d < 13) == pytest.approx(1 - (38 / 64) ** 2)
  nbytes = script.transfer_bytes(spec)
  assert nbytes == {"patches": 18 * 64 * 64 * 3, "crops": 2 * 255 * 255 * 3,
                    "global": 2 * 224 * 224 * 3}


def test_markdown_table():
  table = script.markdown_table(["a", "b"], [["1", "2"]])
  assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
