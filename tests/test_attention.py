"""Attention maps: the definition against NumPy, the picture, the CLI."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from detco_jax import visualize
from detco_jax.eval import attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_energy(x: np.ndarray, p: float) -> np.ndarray:
  return np.mean(np.abs(x.astype(np.float64))**p, axis=-1)


def _np_normalize(m: np.ndarray) -> np.ndarray:
  low = m.min(axis=(-2, -1), keepdims=True)
  high = m.max(axis=(-2, -1), keepdims=True)
  return (m - low) / (high - low)


def _np_resize_axis(m: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Bilinear along one axis: half-pixel centres, clamped at the edges."""
  n = m.shape[axis]
  src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, n - 1)
  w = (src - i0).reshape([-1 if a == axis else 1 for a in range(m.ndim)])
  return np.take(m, i0, axis) * (1 - w) + np.take(m, i1, axis) * w


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_map_without_resize_matches_numpy(p):
  # Signed values: the map must use |a| (exact for post-ReLU maps anyway).
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  got = np.asarray(attention.attention_map(x, (3, 4), p))
  np.testing.assert_allclose(got, _np_normalize(_np_energy(x, p)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(attention.channel_energy(x, p)),
                             _np_energy(x, p), rtol=1e-5)


def test_upsampled_map_shape_range_and_values():
  x = np.random.default_rng(1).uniform(size=(2, 4, 4, 6)).astype(np.float32)
  got = np.asarray(attention.attention_map(x, (16, 12)))
  assert got.shape == (2, 16, 12)
  assert got.dtype == np.float32
  # Exactly 0 and 1 per image: min-max normalisation per image.
  np.testing.assert_array_equal(got.min(axis=(1, 2)), [0.0, 0.0])
  np.testing.assert_array_equal(got.max(axis=(1, 2)), [1.0, 1.0])
  energy = _np_energy(x, 1.0)
  want = _np_resize_axis(_np_resize_axis(energy, 16, 1), 12, 2)
  np.testing.assert_allclose(got, _np_normalize(want), atol=1e-5)


def test_constant_map_is_zero_not_nan():
  got = np.asarray(attention.attention_map(np.ones((1, 2, 2, 3)), (4, 4)))
  np.testing.assert_array_equal(got, np.zeros((1, 4, 4)))


@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (3, 1)])
def test_map_peaks_where_the_activation_is(cell):
  x = np.zeros((1, 4, 4, 8), np.float32)
  x[0, cell[0], cell[1], :3] = 5.0  # Only some channels fire.
  got = np.asarray(attention.attention_map(x, (32, 32)))[0]
  y, x_ = np.unravel_index(np.argmax(got), got.shape)
  assert (y // 8, x_ // 8) == cell
  assert got[y, x_] == 1.0
  # Farther than one cell, bilinear interpolation leaves nothing.
  mask = np.ones_like(got, bool)
  mask[max(0, 8 * cell[0] - 8):8 * cell[0] + 16,
       max(0, 8 * cell[1] - 8):8 * cell[1] + 16] = False
  assert np.all(got[mask] == 0.0)


def _np_ratio(energy, masks):
  objects = (masks > 0) & (masks != 255)
  return energy[objects].mean() / energy[masks == 0].mean()


def test_object_background_ratio_matches_numpy():
  rng = np.random.default_rng(3)
  energy = rng.random((5, 8, 8)).astype(np.float32)
  masks = rng.integers(0, 4, (5, 8, 8)).astype(np.uint8)
  masks[0, :2] = 255   # Ignored pixels count for neither side.
  energy[masks > 0] *= 3.0
  got = attention.ratio_of_sums(attention.masked_sums(energy, masks))
  np.testing.assert_allclose(got, _np_ratio(energy, masks), rtol=1e-5)
  # Sums add up over batches: two halves give the same ratio.
  halves = sum(np.asarray(attention.masked_sums(energy[i:i + 3],
                                                masks[i:i + 3]))
               for i in (0, 3))
  np.testing.assert_allclose(attention.ratio_of_sums(halves), got, rtol=1e-5)


def test_stage_ratios_match_numpy_on_the_raw_maps(tiny_pretrain_workdir,
                                                  builtin_data_dir):
  from detco_jax import pretrained  # pylint: disable=g-import-outside-toplevel
  backbone = pretrained.load(tiny_pretrain_workdir)
  images, masks = attention.load_masked_images(
      backbone.config, None, 10, data_dir=builtin_data_dir)
  assert images.shape == (10, 32, 32, 3) and masks.shape == (10, 32, 32)
  assert (masks == 0).any() and (masks > 0).any()
  ratios = attention.stage_ratios(backbone, images, masks, batch_size=4)
  raw = attention.compute_maps(backbone, images)["raw"]
  for stage in attention.STAGES:
    up = _np_resize_axis(_np_resize_axis(raw[stage].astype(np.float64), 32,
                                         1), 32, 2)
    np.testing.assert_allclose(ratios[stage], _np_ratio(up, masks),
                               rtol=1e-4)


def test_parse_run():
  assert attention.parse_run("detco:/a/b") == attention.RunSpec(
      "detco", "/a/b")
  assert attention.parse_run("m:gs://bucket/x@300") == attention.RunSpec(
      "m", "gs://bucket/x", 300)
  assert attention.parse_run("floor:random") == attention.RunSpec(
      "floor", None)
  assert attention.parse_run("floor:random_init").workdir is None
  for bad in ["/no/label", "detco:", "bad label:/x", "a/b:/x"]:
    with pytest.raises(ValueError):
      attention.parse_run(bad)


def test_random_runs_need_a_workdir_run_and_distinct_labels():
  with pytest.raises(ValueError, match="workdir run"):
    attention.load_backbones([attention.RunSpec("r", None)])
  with pytest.raises(ValueError, match="distinct"):
    attention.load_backbones([attention.RunSpec("a", None),
                              attention.RunSpec("a", "/x")])


def _expected_size(rows: int, cols: int, side: int) -> tuple[int, int]:
  gap = visualize.GAP_PX
  return (visualize.HEADER_PX + gap + rows * (side + gap) - gap,
          cols * (side + gap) - gap)


def test_grid_layout_and_colours():
  images = np.zeros((2, 32, 32, 3), np.uint8)
  ramp = np.broadcast_to(np.linspace(0, 1, 32), (2, 32, 32))
  maps = {s: ramp for s in attention.STAGES}
  picture = visualize.grid(images, {"a": maps, "b": maps}, alpha=1.0)
  side = visualize.tile_size(32)
  assert side == 96
  assert picture.shape == (*_expected_size(2, 9, side), 3)
  assert picture.dtype == np.uint8
  # Alpha 1 shows the colour map alone: blue at 0, red at 1.
  top = visualize.HEADER_PX + visualize.GAP_PX
  first_map = picture[top:top + side, side + visualize.GAP_PX:][:, :side]
  assert tuple(visualize.colormap(0.0)) == (0, 0, 128)
  assert tuple(visualize.colormap(1.0)) == (128, 0, 0)
  assert first_map[side // 2, 0, 2] > first_map[side // 2, 0, 0]
  assert first_map[side // 2, -1, 0] > first_map[side // 2, -1, 2]


def _png_size(data: bytes) -> tuple[int, int]:
  with Image.open(io.BytesIO(data)) as image:
    return image.height, image.width


@pytest.mark.long
def test_cli_end_to_end(tiny_pretrain_workdir, tmp_path):
  out = str(tmp_path / "attention")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # The same run twice (latest step and step 3) stands in for DetCo and
  # MoCo v2; the random floor copies its architecture.
  subprocess.run(
      [sys.executable, "-m", "detco_jax.eval.attention",
       f"--run=detco:{tiny_pretrain_workdir}",
       f"--run=mocov2:{tiny_pretrain_workdir}@3", "--run=random:random",
       f"--out={out}", "--num_images=3", "--ratio_images=20"],
      check=True, env=env, cwd=REPO, timeout=300)

  side = visualize.tile_size(32)
  with open(os.path.join(out, "attention.png"), "rb") as f:
    assert _png_size(f.read()) == _expected_size(3, 1 + 3 * 4, side)
  for label in ["detco", "mocov2", "random"]:
    with open(os.path.join(out, f"attention_{label}.png"), "rb") as f:
      assert _png_size(f.read()) == _expected_size(3, 1 + 4, side)

  with np.load(os.path.join(out, "attention_maps.npz")) as npz:
    assert npz["images"].shape == (3, 32, 32, 3)
    assert npz["images"].dtype == np.uint8
    assert npz["image_labels"].shape == (3,)
    assert list(npz["runs"]) == ["detco", "mocov2", "random"]
    # cifar stem: strides 1, 2, 4, 8 at 32 px.
    for label in ["detco", "mocov2", "random"]:
      for stage, h in zip(attention.STAGES, [32, 16, 8, 4]):
        maps = npz[f"{label}/{stage}"]
        assert maps.shape == (3, 32, 32)
        np.testing.assert_allclose(maps.min(axis=(1, 2)), 0.0)
        np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
        assert npz[f"{label}/{stage}/raw"].shape == (3, h, h)
    # Different checkpoints, different maps.
    assert not np.allclose(npz["detco/res5/raw"], npz["mocov2/res5/raw"])
    assert not np.allclose(npz["detco/res5/raw"], npz["random/res5/raw"])

  with open(os.path.join(out, attention.RATIO_FILE)) as f:
    ratio = json.load(f)
  assert ratio["images"] == 20
  assert sorted(ratio["ratios"]) == ["detco", "mocov2", "random"]
  for stages in ratio["ratios"].values():
    assert sorted(stages) == list(attention.STAGES)
    assert all(0 < r < 100 for r in stages.values())

  acc = event_accumulator.EventAccumulator(
      out, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()["tensors"]
  assert sorted(tags) == ["attention/all", "attention/detco",
                          "attention/mocov2", "attention/random"]
  event = acc.Tensors("attention/all")[0]
  assert event.step == 6  # The first run's checkpoint.
  width, height, png = event.tensor_proto.string_val
  assert (int(height), int(width)) == _expected_size(3, 13, side)
  assert _png_size(png) == _expected_size(3, 13, side)
