"""Tests of the device-side augmentation: augment, randaugment, colorspace.

Every op is checked against an independent NumPy reference written from the
equations (torchvision / PIL semantics), then the pipeline's probabilities,
group sharing, determinism, shapes, and that it all traces under jit/vmap
without host work.
"""

import colorsys
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from detco_jax.data import augment
from detco_jax.data import colorspace
from detco_jax.data import randaugment

LUMA = np.array([0.299, 0.587, 0.114])
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def aug_cfg(**overrides) -> ml_collections.ConfigDict:
  """The paper's `aug` section (configs/detco.py), with overrides."""
  cfg = ml_collections.ConfigDict(dict(
      jitter_prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
      gray_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
      blur_kernel_frac=0.1, randaugment=False, randaugment_layers=2,
      randaugment_magnitude=9, mean=tuple(MEAN), std=tuple(STD)))
  cfg.update(overrides)
  return cfg


def views_cfg(local_size=36) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(local_size=local_size))


def photometric_batch(x, rng, cfg, **kwargs):
  """Jitted `photometric` over a batch of groups, one key per group."""
  fn = lambda a, k: augment.photometric(a, k, cfg, **kwargs)
  keys = jax.random.split(rng, x.shape[0])
  return np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(x), keys))


def group_batch(u, rng, cfg, **kwargs):
  """Jitted `augment_group_batch` (eager op-by-op dispatch is slow on CPU)."""
  fn = lambda a, k: augment.augment_group_batch(a, k, cfg, **kwargs)
  return np.asarray(jax.jit(fn)(jnp.asarray(u), rng))


def rand_image(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def rand_uint8(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ---- NumPy references, from the equations.


def np_gray(x):
  return x @ LUMA


def np_brightness(x, f):
  return np.clip(f * x, 0, 1)


def np_contrast(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x).mean(), 0, 1)


def np_saturation(x, f):
  return np.clip(f * x + (1 - f) * np_gray(x)[..., None], 0, 1)


def np_hue(x, delta):
  flat = x.reshape(-1, 3).astype(np.float64)
  out = np.empty_like(flat)
  for i, (r, g, b) in enumerate(flat):
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out[i] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  return out.reshape(x.shape)


def np_blur(x, sigma, kernel_size):
  """Direct (non-separable) 2-D convolution of `[H, W, C]`, reflect padded."""
  r = kernel_size // 2
  t = np.arange(-r, r + 1)
  k1 = np.exp(-0.5 * (t / sigma) ** 2)
  k2 = np.outer(k1, k1)
  k2 /= k2.sum()
  h, w, _ = x.shape
  p = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
  out = np.zeros(x.shape, np.float64)
  for dy in range(kernel_size):
    for dx in range(kernel_size):
      out += k2[dy, dx] * p[dy:dy + h, dx:dx + w]
  return out


# ---- Single ops.


def test_to_grayscale_matches_luma():
  x = rand_image((2, 5, 7, 3))
  out = np.asarray(colorspace.to_grayscale(jnp.asarray(x)))
  ref = np_gray(x)
  for c in range(3):
    np.testing.assert_allclose(out[..., c], ref, atol=1e-6)


@pytest.mark.parametrize("f", [0.6, 1.0, 1.4])
def test_blend_ops_match_torchvision_equations(f):
  x = rand_image((3, 6, 5, 3), seed=1)  # A group: contrast's mean is over all.
  j = jnp.asarray(x)
  np.testing.assert_allclose(augment.adjust_brightness(j, f),
                             np_brightness(x, f), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(j, f),
                             np_contrast(x, f), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(j, f),
                             np_saturation(x, f), atol=1e-6)


@pytest.mark.parametrize("delta", [0.0, 0.07, -0.1, 0.5, -0.33])
def test_hue_shift_matches_colorsys(delta):
  x = rand_image((6, 7, 3), seed=2)
  x[0, :3] = [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.2, 0.9]]  # Gray, ties.
  x[1, :2] = [[0.7, 0.7, 0.1], [0.0, 0.0, 0.0]]
  out = augment.adjust_hue(jnp.asarray(x), delta)
  np.testing.assert_allclose(out, np_hue(x, delta), atol=2e-6)


@pytest.mark.parametrize("sigma,kernel_size,shape", [
    (1.3, 7, (9, 11, 3)),
    (0.4, 3, (5, 4, 3)),
    (2.0, 9, (4, 5, 3)),  # Radius 4 > side - 1: reflected more than once.
])
def test_blur_matches_direct_2d_convolution(sigma, kernel_size, shape):
  x = rand_image(shape, seed=3)
  out = augment.gaussian_blur(jnp.asarray(x), jax.random.key(0),
                              sigma_range=(sigma, sigma),
                              kernel_size=kernel_size)
  np.testing.assert_allclose(out, np_blur(x, sigma, kernel_size), atol=1e-5)


def test_blur_keeps_constant_images_and_borders():
  x = np.full((2, 8, 8, 3), 0.7, np.float32)  # Zero padding would darken it.
  out = augment.gaussian_blur(jnp.asarray(x), jax.random.key(1),
                              sigma_range=(2.0, 2.0), kernel_size=7)
  np.testing.assert_allclose(out, x, atol=1e-6)


def test_blur_sizes_scale_with_the_view():
  assert augment.blur_kernel_size_for(224, 0.1) == 23  # MoCo v2.
  assert augment.blur_kernel_size_for(255, 0.1) == 27
  assert augment.blur_kernel_size_for(64, 0.1) == 7
  assert augment.blur_kernel_size_for(4, 0.1) == 1
  np.testing.assert_allclose(augment.blur_sigma_for((0.1, 2.0), 112),
                             (0.05, 1.0))
  with pytest.raises(ValueError):
    augment.gaussian_blur(jnp.zeros((4, 4, 3)), jax.random.key(0),
                          sigma_range=(1, 1), kernel_size=4)


def _jitter_reference(x, rng, brightness, contrast, saturation, hue):
  """NumPy ColorJitter with the same draws as `color_jitter` (same key use)."""
  u = np.asarray(jax.random.uniform(rng, (8,)), np.float64)
  draw = lambda v, s: max(0, 1 - s) + (1 + s - max(0, 1 - s)) * v
  f_b, f_c, f_s = draw(u[4], brightness), draw(u[5], contrast), draw(
      u[6], saturation)
  delta = hue * (2 * u[7] - 1)
  order = [int(i) for i in np.argsort(u[:4])]
  ops = [lambda y: np_brightness(y, f_b), lambda y: np_contrast(y, f_c),
         lambda y: np_saturation(y, f_s), lambda y: np_hue(y, delta)]
  for i in order:
    x = ops[i](x)
  return x, order


def test_color_jitter_matches_reference_in_every_order():
  x = rand_image((2, 5, 6, 3), seed=4)
  hue_positions = set()
  jitter = jax.jit(functools.partial(
      augment.color_jitter, brightness=0.4, contrast=0.4, saturation=0.4,
      hue=0.1))
  for seed in range(12):
    rng = jax.random.key(seed)
    ref, order = _jitter_reference(x, rng, 0.4, 0.4, 0.4, 0.1)
    out = jitter(jnp.asarray(x), rng)
    np.testing.assert_allclose(out, ref, atol=1e-5, err_msg=str(order))
    hue_positions.add(order.index(3))
  assert hue_positions == {0, 1, 2, 3}


def test_color_jitter_zero_strength_is_identity():
  x = rand_image((4, 5, 3), seed=5)
  jitter = jax.jit(functools.partial(
      augment.color_jitter, brightness=0, contrast=0, saturation=0, hue=0))
  out = jitter(jnp.asarray(x), jax.random.key(0))
  np.testing.assert_array_equal(out, x)


# ---- The pipeline.


def test_photometric_stays_in_unit_range_and_normalize_is_affine():
  x = rand_image((16, 1, 12, 12, 3), seed=6)
  cfg = aug_cfg(jitter_prob=1.0, brightness=0.9, contrast=0.9, blur_prob=1.0)
  out = photometric_batch(x, jax.random.key(0), cfg)
  assert out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0
  np.testing.assert_allclose(augment.normalize(jnp.asarray(out), cfg),
                             (out - MEAN) / STD, atol=1e-6)


def test_probability_zero_is_just_normalisation():
  u = rand_uint8((5, 9, 8, 8, 3), seed=7)
  cfg = aug_cfg(jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0)
  out = group_batch(u, jax.random.key(3), cfg)
  np.testing.assert_allclose(out, (u / 255.0 - MEAN) / STD, atol=1e-6)
  # With the blur "applied" through a delta kernel, still exactly x / 255.
  cfg = aug_cfg(jitter_prob=0.0, gray_prob=0.0, blur_prob=0.5)
  out = group_batch(u, jax.random.key(3), cfg, blur_sigma=(1e-3, 1e-3),
                    blur_kernel_size=5)
  np.testing.assert_allclose(out, (u / 255.0 - MEAN) / STD, atol=1e-6)


def test_probability_one_always_applies():
  x = rand_image((32, 1, 6, 6, 3), seed=8)
  run = lambda cfg: photometric_batch(x, jax.random.key(0), cfg,
                                      blur_sigma=(1.0, 2.0),
                                      blur_kernel_size=5)
  gray = run(aug_cfg(jitter_prob=0.0, gray_prob=1.0, blur_prob=0.0))
  np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-6)
  np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
  np.testing.assert_allclose(gray[..., 0], np_gray(x), atol=1e-6)
  # Blur always applied: every image is smoother than its input.
  blur = run(aug_cfg(jitter_prob=0.0, gray_prob=0.0, blur_prob=1.0))
  tv = lambda a: np.abs(np.diff(a, axis=-2)).mean(axis=(-1, -2, -3, -4))
  assert np.all(tv(blur) < 0.8 * tv(x))
  # Jitter always applied (brightness only): no image is left unchanged.
  bright = run(aug_cfg(jitter_prob=1.0, contrast=0, saturation=0, hue=0,
                       gray_prob=0.0, blur_prob=0.0))
  assert np.all(np.abs(bright - x).max(axis=(1, 2, 3, 4)) > 0)


def test_probabilities_are_respected_in_frequency():
  x = rand_image((400, 1, 2, 2, 3), seed=9)
  cfg = aug_cfg(jitter_prob=0.0, gray_prob=0.3, blur_prob=0.0)
  out = photometric_batch(x, jax.random.key(1), cfg)
  is_gray = np.all(np.abs(out[..., 0] - out[..., 1]) < 1e-6, axis=(1, 2, 3))
  assert 0.22 < is_gray.mean() < 0.38


def test_patch_set_shares_one_draw():
  """The 9 patches of a set share gray decision and jitter factors."""
  n, s = 24, 9
  base = rand_image((n, s, 6, 6, 3), seed=10) * 0.5 + 0.1  # Never clipped.
  u = jnp.asarray(np.round(base * 255).astype(np.uint8))
  x = np.asarray(u) / 255.0
  undo = lambda y: np.asarray(y) * STD + MEAN
  # Gray only (p = 0.5): within a set, all or none of the patches are gray.
  cfg = aug_cfg(jitter_prob=0.0, gray_prob=0.5, blur_prob=0.0)
  out = undo(group_batch(u, jax.random.key(0), cfg))
  gray = np.all(np.abs(out[..., 0] - out[..., 2]) < 1e-5, axis=(2, 3))
  assert np.all(gray.all(axis=1) | ~gray.any(axis=1))
  assert 0 < gray[:, 0].sum() < n  # Different sets decide differently.
  # Brightness only: one factor per set, different factors across sets.
  cfg = aug_cfg(jitter_prob=1.0, contrast=0, saturation=0, hue=0,
                gray_prob=0.0, blur_prob=0.0)
  out = undo(group_batch(u, jax.random.key(1), cfg))
  ratio = out / x
  per_set = ratio.reshape(n, -1)
  np.testing.assert_allclose(per_set, np.broadcast_to(per_set[:, :1],
                                                      per_set.shape), rtol=1e-4)
  assert np.unique(np.round(per_set[:, 0], 4)).size == n


def test_identical_patches_stay_identical_under_the_full_pipeline():
  img = rand_uint8((1, 1, 8, 8, 3), seed=11)
  u = jnp.asarray(np.broadcast_to(img, (6, 9, 8, 8, 3)))
  cfg = aug_cfg(jitter_prob=1.0, blur_prob=1.0)
  out = group_batch(u, jax.random.key(2), cfg)
  np.testing.assert_allclose(out, np.broadcast_to(out[:, :1], out.shape),
                             atol=1e-6)
  assert not np.allclose(out[0], out[1])


def test_patches_are_blurred_separately_with_the_group_sigma():
  x = rand_image((1, 3, 7, 7, 3), seed=12)
  cfg = aug_cfg(jitter_prob=0.0, gray_prob=0.0, blur_prob=1.0)
  out = jax.jit(lambda a, k: augment.photometric(
      a, k, cfg, blur_sigma=(1.5, 1.5), blur_kernel_size=5))(
          jnp.asarray(x[0]), jax.random.key(0))
  ref = np.stack([np_blur(p, 1.5, 5) for p in x[0]])
  np.testing.assert_allclose(out, ref, atol=1e-5)


def _batch(b=8, g=16, p=6, local=True, seed=0):
  batch = {"global": jnp.asarray(rand_uint8((b, 2, g, g, 3), seed))}
  if local:
    batch["local"] = jnp.asarray(rand_uint8((b, 2, 9, p, p, 3), seed + 1))
  return batch


def _views_fn(**overrides):
  cfg = aug_cfg(**overrides)
  return lambda b, k: augment.augment_views(b, k, cfg, views_cfg())


@functools.lru_cache(maxsize=None)
def _jitted_views():
  """The one jitted `augment_views` most tests share (compiled once).

  Jitter always on, so that views with identical pixels always differ.
  """
  return jax.jit(_views_fn(jitter_prob=1.0))


@pytest.mark.parametrize("local", [True, False])
def test_augment_views_shapes_and_dtypes(local):
  batch = _batch(local=local)
  batch["label"] = jnp.arange(8)
  out = jax.eval_shape(jax.jit(_views_fn()), batch, jax.random.key(0))
  assert set(out) == set(batch)
  for key in ("global", "local") if local else ("global",):
    assert out[key].shape == batch[key].shape
    assert out[key].dtype == jnp.float32
  assert out["label"].shape == (8,) and out["label"].dtype == jnp.int32


def test_augment_views_is_deterministic_and_key_dependent():
  batch = _batch()
  f = _jitted_views()
  a = f(batch, jax.random.key(5))
  b = f(batch, jax.random.key(5))
  c = f(batch, jax.random.key(6))
  for key in ("global", "local"):
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a[key], c[key])


def test_views_and_sets_get_independent_draws():
  """Identical pixels everywhere: any difference comes from the draws."""
  img = rand_uint8((1, 1, 16, 16, 3), seed=13)
  patch = img[..., :6, :6, :]
  batch = {"global": jnp.asarray(np.broadcast_to(img[0], (8, 2, 16, 16, 3))),
           "local": jnp.asarray(np.broadcast_to(patch, (8, 2, 9, 6, 6, 3)))}
  out = _jitted_views()(batch, jax.random.key(0))
  g = np.asarray(out["global"]).reshape(16, -1)
  loc = np.asarray(out["local"]).reshape(16, 9, -1)
  assert len({row.tobytes() for row in g}) == 16       # 2B distinct views.
  assert len({row[0].tobytes() for row in loc}) == 16  # 2B distinct sets.
  np.testing.assert_allclose(loc, np.broadcast_to(loc[:, :1], loc.shape),
                             atol=1e-6)                # Shared within a set.


def _project_config(arg):
  path = pathlib.Path(__file__).parents[1] / "configs" / "detco.py"
  spec = importlib.util.spec_from_file_location("detco_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("variant", ["", "tiny", "tiny,aa"])
def test_project_config_contract(variant):
  config = _project_config(variant)
  assert dict(aug_cfg().items()).keys() == dict(config.aug.items()).keys()
  if not variant:
    assert dict(aug_cfg().items()) == dict(config.aug.items())
  g, p = config.views.global_size, config.views.patch_size
  batch = {"global": jax.ShapeDtypeStruct((2, 2, g, g, 3), jnp.uint8),
           "local": jax.ShapeDtypeStruct((2, 2, 9, p, p, 3), jnp.uint8)}
  out = jax.eval_shape(
      lambda b, k: augment.augment_views(b, k, config.aug, config.views),
      batch, jax.random.key(0))
  assert out["local"].shape == batch["local"].shape


def test_traces_under_jit_and_vmap_without_host_work():
  batch = _batch()
  fn = _views_fn()
  jaxpr = str(jax.make_jaxpr(fn)(batch, jax.random.key(0)))
  for name in ("callback", "io_callback", "debug"):
    assert name not in jaxpr
  # vmap over an extra leading axis (e.g. microbatches) also traces.
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), batch)
  keys = jax.random.split(jax.random.key(1), 2)
  out = jax.eval_shape(jax.jit(jax.vmap(fn)), stacked, keys)
  assert out["local"].shape == (2,) + batch["local"].shape
  # Inputs already on device: no transfer of any kind during the call.
  f = _jitted_views()
  key = jax.random.key(2)
  f(batch, key)  # Compile outside the guard.
  with jax.transfer_guard("disallow"):
    jax.block_until_ready(f(batch, key))


def test_runs_on_a_sharded_batch():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      "data"))
  batch = _batch()
  sharded = jax.device_put(batch, sharding)
  out = _jitted_views()(sharded, jax.random.key(0))
  assert out["local"].shape == (8, 2, 9, 6, 6, 3)
  assert out["global"].sharding.is_equivalent_to(sharding, 5)
  ref = _jitted_views()(batch, jax.random.key(0))  # Same draws unsharded.
  for key in ("global", "local"):
    np.testing.assert_allclose(out[key], ref[key], atol=1e-5)


# ---- RandAugment ("DetCo+AA").


def _pil(x):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(np.round(x * 255).astype(np.uint8))


def _from_pil(img):
  return np.asarray(img, np.float32) / 255.0


def _levels(x):
  """0..255 levels of a [0, 1] image (exact comparison modulo x / 255)."""
  return np.round(np.asarray(x) * 255).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _all_ops(magnitude):
  """Jitted: every RandAugment op on one image, vmapped over op indices."""
  num = len(randaugment.RANDAUGMENT_OPS)
  fn = lambda im, sign: jax.vmap(
      lambda op: randaugment.apply_randaugment_op(im, op, sign, magnitude))(
          jnp.arange(num))
  return jax.jit(fn)


def _ra_outputs(x, sign=1.0, magnitude=9):
  out = np.asarray(_all_ops(magnitude)(jnp.asarray(x), sign))
  return dict(zip(randaugment.RANDAUGMENT_OPS, out))


def test_randaugment_pixel_ops_match_pil():
  from PIL import ImageEnhance, ImageOps  # pylint: disable=g-import-not-at-top
  x = rand_uint8((11, 13, 3), seed=20).astype(np.float32) / 255.0
  x[..., 2] = 0.3 + 0.4 * x[..., 2]  # A channel that does not span 0..255.
  x = np.round(x * 255) / 255
  img = _pil(x)
  m = 0.9  # Magnitude 9.
  for sign in (1.0, -1.0):
    out = _ra_outputs(x, sign)
    f = 1 + sign * 0.9 * m
    np.testing.assert_array_equal(out["identity"], x)
    np.testing.assert_array_equal(_levels(out["equalize"]),
                                  np.asarray(ImageOps.equalize(img)))
    np.testing.assert_allclose(out["autocontrast"],
                               _from_pil(ImageOps.autocontrast(img)),
                               atol=1.01 / 255)
    np.testing.assert_array_equal(
        _levels(out["solarize"]),
        np.asarray(ImageOps.solarize(img, 256 * (1 - m))))
    np.testing.assert_array_equal(_levels(out["posterize"]),
                                  np.asarray(ImageOps.posterize(img, 5)))
    for name, enhancer in [("color", ImageEnhance.Color),
                           ("contrast", ImageEnhance.Contrast),
                           ("brightness", ImageEnhance.Brightness),
                           ("sharpness", ImageEnhance.Sharpness)]:
      np.testing.assert_allclose(
          out[name], _from_pil(enhancer(img).enhance(f)), atol=2.01 / 255,
          err_msg=name)


def test_randaugment_equalize_matches_pil_on_narrow_histograms():
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(21)
  x = (rng.integers(100, 110, (9, 10, 3)) / 255).astype(np.float32)
  x[..., 1] = 0.5  # A constant channel: PIL leaves it unchanged.
  out = np.asarray(jax.jit(randaugment.equalize)(jnp.asarray(x)))
  np.testing.assert_array_equal(_levels(out),
                                np.asarray(ImageOps.equalize(_pil(x))))


def test_randaugment_geometric_ops():
  x = rand_image((7, 7, 3), seed=22)
  fill = np.float32(128 / 255)
  warp = jax.jit(randaugment._affine_warp, static_argnums=2)
  # Exact constructs: a 90 degree rotation, an integer shift, a unit shear.
  c, s = np.cos(np.pi / 2), np.sin(np.pi / 2)
  rot = np.asarray(warp(jnp.asarray(x), jnp.asarray(
      [[c, -s, 0], [s, c, 0]], jnp.float32), fill))
  np.testing.assert_array_equal(rot, np.rot90(x, 1, axes=(0, 1)))
  shift = np.asarray(warp(jnp.asarray(x), jnp.asarray(
      [[1, 0, 2], [0, 1, 0]], jnp.float32), fill))
  np.testing.assert_array_equal(shift[:, :5], x[:, 2:])
  np.testing.assert_array_equal(shift[:, 5:], fill)
  shear = np.asarray(warp(jnp.asarray(x), jnp.asarray(
      [[1, 1, 0], [0, 1, 0]], jnp.float32), fill))
  np.testing.assert_array_equal(shear[3], x[3])        # The centre row stays.
  np.testing.assert_array_equal(shear[4, :6], x[4, 1:])  # Below: from right.
  # Magnitude 0: every geometric op is the identity.
  out = _ra_outputs(x, 1.0, magnitude=0)
  for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
    np.testing.assert_array_equal(out[name], x, err_msg=name)
  # At magnitude 9 they move pixels and fill with gray.
  out = _ra_outputs(x, -1.0)
  for name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
    assert not np.allclose(out[name], x), name
    assert np.any(np.all(out[name] == fill, axis=-1)), name


def test_randaugment_in_augment_views():
  batch = _batch()
  f = jax.jit(_views_fn(randaugment=True, jitter_prob=0.0, gray_prob=0.0,
                        blur_prob=0.0))
  out = f(batch, jax.random.key(0))
  g = np.asarray(out["global"]) * STD + MEAN
  assert g.min() >= -1e-5 and g.max() <= 1 + 1e-5
  plain = np.asarray(batch["global"]) / 255.0
  changed = np.abs(g - plain).max(axis=(2, 3, 4)) > 1e-3
  assert changed.mean() > 0.5
  # Local patch sets are untouched by RandAugment: only normalised.
  np.testing.assert_allclose(
      out["local"], (np.asarray(batch["local"]) / 255.0 - MEAN) / STD,
      atol=1e-5)
  np.testing.assert_array_equal(
      f(batch, jax.random.key(0))["global"], out["global"])
