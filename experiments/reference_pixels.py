r"""How far this pipeline's pixels are from the reference (MoCo's PyTorch) ones.

  nice -n 10 python experiments/reference_pixels.py [--long_side=500]
      [--crops_per_photo=30] [--jigsaw_per_photo=4] [--repeats=31]
      [--out=FILE]

The reference pipeline works on PIL images: torchvision's RandomResizedCrop
is `img.crop(box).resize((224, 224), Image.BILINEAR)`, and PIL's BILINEAR
antialiases when it shrinks (its triangle filter widens with the shrink
factor); MoCo v2 blurs the 224 px view with `ImageFilter.GaussianBlur`, and
DetCo's paper augments the whole jigsaw crop before cutting it into patches.
On the photographs bundled with scikit-image (no download), each resized with
PIL's LANCZOS to ImageNet's typical size (longer side 500 px), it measures

  1. global views: the mean absolute difference in grey levels (0-255) of our
     224 px view (`views.crop_resize_flip`, antialias False and True) from
     PIL's, by the crop's shrink factor, for RandomResizedCrop boxes drawn by
     `views.sample_crops` with the config's area and ratio ranges;
  2. jigsaw blur: blurring each 64 px patch on its own with reflect padding
     (what `augment.augment_views` does) against blurring the materialised
     255 px jigsaw crop once and cutting the same patches (the paper's
     order), overall, near the patch borders and in their interior;
  3. cost, on one thread: a global view with and without antialias, the
     jitted device-side blur of a 9 x 64^2 patch set against a 255^2 crop,
     and the host -> device bytes of each design.

It prints one Markdown table per measurement, with the command and date.
About two minutes on a 2-core CPU.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # One thread for XLA:CPU, set before jax is imported (measurement 3).
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
      " intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

# pylint: disable=g-import-not-at-top,g-bad-import-order
import argparse
import dataclasses
import datetime
import platform
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import PIL
import skimage
import tensorflow as tf
from PIL import Image

from configs import detco
from detco_jax.benchmark import photos as bundled
from detco_jax.benchmark import report
from detco_jax.data import augment
from detco_jax.data import views

# The bundled photographs (`bundled.COLOUR` and `bundled.GREY`): colour ones,
# then grey ones (made RGB), in this order, which seeds the crops.
COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "stereo_motorcycle", "retina", "immunohistochemistry")
GREY = ("camera", "coins", "moon", "grass", "gravel", "brick")

# Shrink-factor bins of a global view: (label, low, high).
SHRINK_BINS = (("< 1 (enlarging)", 0.0, 1.0), ("1-2", 1.0, 2.0),
               ("2-3", 2.0, 3.0), ("> 3", 3.0, float("inf")))


# ----------------------------------------------------------------------------
# Photographs.


def load_photo(name: str) -> np.ndarray:
  """A scikit-image photograph as uint8 RGB [H, W, 3] (grey ones repeated)."""
  image = bundled.load(name)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  return np.ascontiguousarray(image.astype(np.uint8))


def resize_long_side(image: np.ndarray, long_side: int | None) -> np.ndarray:
  """Resizes with PIL's LANCZOS so the longer side is `long_side` (None: as is).

  Args:
    image: uint8 [H, W, 3].
    long_side: target length of the longer side; None keeps the image.

  Returns:
    uint8 [H', W', 3].
  """
  if not long_side:
    return image
  h, w = image.shape[:2]
  scale = long_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def load_photos(long_side: int | None,
                names: Sequence[str] = COLOUR + GREY) -> dict[str, np.ndarray]:
  """The photographs `names`, longer side `long_side` (None: native)."""
  return {name: resize_long_side(load_photo(name), long_side)
          for name in names}


# ----------------------------------------------------------------------------
# 1. Global views against PIL.


def sample_box(shape: Sequence[int], seed: Sequence[int],
               spec: views.ViewSpec) -> np.ndarray:
  """One RandomResizedCrop box (top, left, height, width), as the pipeline
  draws a global view's crop."""
  crops = views.sample_crops(tf.constant(seed, tf.int64),
                             tf.constant(shape[:2], tf.int32), 1,
                             spec.global_area, spec.global_ratio)
  return crops.numpy()[0]


def our_view(image: np.ndarray, box: np.ndarray, size: int,
             antialias: bool) -> np.ndarray:
  """Our global view of `box` (no flip): uint8 [size, size, 3]."""
  return views.crop_resize_flip(
      tf.constant(image), tf.constant(box, tf.int32), tf.constant(False),
      size, antialias=antialias).numpy()


def pil_view(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
  """torchvision's RandomResizedCrop of a PIL image: crop, BILINEAR resize."""
  top, left, h, w = (int(v) for v in box)
  crop = Image.fromarray(image).crop((left, top, left + w, top + h))
  return np.asarray(crop.resize((size, size), Image.BILINEAR))


def pil_float_view(image: np.ndarray, box: np.ndarray,
                   size: int) -> np.ndarray:
  """PIL's BILINEAR crop-resize in float32 (mode "F") per channel, rounded.

  PIL resizes uint8 images in fixed point; the float path is the same filter
  without it, so their difference is the rounding floor of any comparison.
  """
  top, left, h, w = (int(v) for v in box)
  out = []
  for c in range(3):
    plane = Image.fromarray(image[..., c].astype(np.float32))
    plane = plane.crop((left, top, left + w, top + h))
    out.append(np.asarray(plane.resize((size, size), Image.BILINEAR)))
  return np.clip(np.floor(np.stack(out, -1) + 0.5), 0, 255).astype(np.uint8)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
  """Mean absolute difference, in the arrays' units, over every element."""
  return float(np.mean(np.abs(a.astype(np.float64) - b.astype(np.float64))))


@dataclasses.dataclass(frozen=True)
class ViewError:
  """One global view's mean |difference| from PIL's, in grey levels."""
  shrink: float      # Longer crop side / output side.
  bilinear: float    # Ours, antialias=False.
  antialias: float   # Ours, antialias=True.
  pil_float: float   # PIL's uint8 path vs its float path (rounding floor).
  antialias_float: float  # Ours, antialias=True, vs PIL's float path.


def view_error(image: np.ndarray, box: np.ndarray, size: int) -> ViewError:
  """Compares our two global views of `box` with PIL's."""
  reference = pil_view(image, box, size)
  exact = pil_float_view(image, box, size)
  antialiased = our_view(image, box, size, True)
  return ViewError(
      shrink=float(max(box[2], box[3])) / size,
      bilinear=mean_abs(our_view(image, box, size, False), reference),
      antialias=mean_abs(antialiased, reference),
      pil_float=mean_abs(exact, reference),
      antialias_float=mean_abs(antialiased, exact))


def global_view_errors(photos: dict[str, np.ndarray], spec: views.ViewSpec,
                       crops_per_photo: int, size: int | None = None,
                       seed: int = 0) -> list[ViewError]:
  """`view_error` of `crops_per_photo` random boxes of each photograph.

  Box k of photograph i is drawn with the stateless seed (seed + i, k).
  """
  size = size or spec.global_size
  errors = []
  for i, image in enumerate(photos.values()):
    for k in range(crops_per_photo):
      box = sample_box(image.shape, (seed + i, k), spec)
      errors.append(view_error(image, box, size))
  return errors


def shrink_rows(errors: Sequence[ViewError]) -> list[list[str]]:
  """Table rows per shrink bin and overall: count, share, the four MAEs."""
  groups = [(label, [e for e in errors if lo <= e.shrink < hi])
            for label, lo, hi in SHRINK_BINS]
  groups.append(("all", list(errors)))
  rows = []
  for label, group in groups:
    if not group:
      rows.append([label, "0", "0%", "-", "-", "-", "-"])
      continue
    rows.append([label, str(len(group)), f"{len(group) / len(errors):.0%}"]
                + [f"{np.mean([getattr(e, f) for e in group]):.2f}"
                   for f in ("bilinear", "antialias", "pil_float")]
                + [f"{np.mean([e.antialias_float for e in group]):.4f}"])
  return rows


# ----------------------------------------------------------------------------
# 2. Jigsaw blur: whole crop vs per patch.


def jigsaw_crop(image: np.ndarray, seed: Sequence[int],
                spec: views.ViewSpec) -> np.ndarray:
  """The pipeline's jigsaw crop, materialised: uint8 [side, side, 3].

  The crop is drawn by `views.local_crops` and resampled exactly as the
  pipeline samples its patches (`views.boxes_in_crop`, align corners), but
  as one `local_size`^2 image; no flip.
  """
  shape = tf.constant(image.shape, tf.int32)
  crops, _ = views.local_crops(tf.constant(seed, tf.int64), shape, spec, 1)
  side = spec.local_size
  zero = tf.zeros([1, 1], tf.float32)
  boxes = views.boxes_in_crop(crops, tf.constant([False]), zero, zero, side,
                              side, shape)
  return views.resample_patches(tf.constant(image), boxes, side).numpy()[0, 0]


def patch_corners(rng: np.random.Generator,
                  spec: views.ViewSpec) -> np.ndarray:
  """First (row, col) of the grid^2 patches: a random offset in each cell.

  Returns:
    int [grid^2, 2], cell by cell (the permutation does not matter here).
  """
  g, cell, patch = spec.grid, spec.cell_size, spec.patch_size
  cells = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"),
                   -1).reshape(-1, 2) * cell
  return cells + rng.integers(0, cell - patch + 1, size=cells.shape)


def cut_patches(crop: np.ndarray, corners: np.ndarray,
                patch: int) -> np.ndarray:
  """The patches [K, patch, patch, C] of `crop` at `corners` [K, 2]."""
  return np.stack([crop[r:r + patch, c:c + patch] for r, c in corners])


def border_distance(patch: int) -> np.ndarray:
  """int [patch, patch]: each pixel's distance in pixels to the patch edge."""
  i = np.arange(patch)
  d = np.minimum(i, patch - 1 - i)
  return np.minimum(d[:, None], d[None, :])


@jax.jit
def _blur(images: jax.Array, weights: jax.Array) -> jax.Array:
  return augment.blur_with_kernel(images, weights)


def local_blur(sigma_224: float, spec: views.ViewSpec,
               aug: Any) -> tuple[float, int]:
  """The sigma (pixels) and taps `augment_views` uses on the patch sets.

  The config's sigma is in pixels of a 224 px view; the code scales it by
  `side / 224` with `side` the image the blur is conceptually applied to,
  which for the patches is the jigsaw crop (`views.local_size`), not the
  64 px patch; the kernel is `odd(round(blur_kernel_frac * local_size))`.
  """
  sigma = augment.blur_sigma_for((sigma_224, sigma_224), spec.local_size)[0]
  return sigma, augment.blur_kernel_size_for(spec.local_size,
                                             aug.blur_kernel_frac)


@dataclasses.dataclass(frozen=True)
class BlurError:
  """Per-patch vs whole-crop blur of one crop: mean |diff| in grey levels."""
  overall: float
  border: float    # Pixels closer than the kernel radius to a patch edge.
  interior: float  # The others.
  max: float


def blur_error(crop: np.ndarray, corners: np.ndarray, patch: int,
               sigma: float, kernel_size: int) -> BlurError:
  """Blurs the patches on their own and the whole crop, then compares.

  Args:
    crop: uint8 [side, side, 3], the materialised jigsaw crop.
    corners: int [K, 2] first (row, col) of each patch.
    patch: patch side.
    sigma: blur sigma in pixels of the crop (shared by the K patches).
    kernel_size: odd number of taps.

  Returns:
    The differences, float grey levels (0-255, not re-quantised).
  """
  x = crop.astype(np.float32) / 255.0
  weights = augment.gaussian_kernel1d(sigma, kernel_size)
  per_patch = np.asarray(_blur(cut_patches(x, corners, patch), weights))
  whole = np.asarray(_blur(x[None], weights))[0]
  diff = 255.0 * np.abs(per_patch - cut_patches(whole, corners, patch))
  band = border_distance(patch) < kernel_size // 2
  return BlurError(overall=float(diff.mean()),
                   border=float(diff[:, band].mean()) if band.any() else 0.0,
                   interior=float(diff[:, ~band].mean()) if (~band).any()
                   else 0.0,
                   max=float(diff.max()))


def jigsaw_crops(photos: dict[str, np.ndarray], spec: views.ViewSpec,
                 per_photo: int, seed: int = 0
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(materialised crop, patch corners) pairs, `per_photo` per photograph."""
  rng = np.random.default_rng(seed)
  out = []
  for i, image in enumerate(photos.values()):
    for k in range(per_photo):
      out.append((jigsaw_crop(image, (seed + i, 1000 + k), spec),
                  patch_corners(rng, spec)))
  return out


def mean_blur_error(pairs: Iterable[tuple[np.ndarray, np.ndarray]],
                    spec: views.ViewSpec, sigma: float,
                    kernel_size: int) -> BlurError:
  """`blur_error` averaged over crops (each crop weighs the same)."""
  errors = [blur_error(c, corners, spec.patch_size, sigma, kernel_size)
            for c, corners in pairs]
  return BlurError(*(float(np.mean([getattr(e, f.name) for e in errors]))
                     if f.name != "max" else
                     float(np.max([e.max for e in errors]))
                     for f in dataclasses.fields(BlurError)))


def pipeline_patch_gap(image: np.ndarray, seed: Sequence[int],
                       corners: np.ndarray, spec: views.ViewSpec) -> float:
  """Max |diff| (grey levels) of patches sliced from `jigsaw_crop` vs the
  pipeline's own `crop_and_resize` patches at the same places."""
  shape = tf.constant(image.shape, tf.int32)
  crops, _ = views.local_crops(tf.constant(seed, tf.int64), shape, spec, 1)
  rows = tf.constant(corners[None, :, 0], tf.float32)
  cols = tf.constant(corners[None, :, 1], tf.float32)
  boxes = views.boxes_in_crop(crops, tf.constant([False]), rows, cols,
                              spec.patch_size, spec.local_size, shape)
  ours = views.resample_patches(tf.constant(image), boxes,
                                spec.patch_size).numpy()[0]
  sliced = cut_patches(jigsaw_crop(image, seed, spec), corners,
                       spec.patch_size)
  return float(np.max(np.abs(ours.astype(int) - sliced.astype(int))))


# ----------------------------------------------------------------------------
# 3. Cost.


def median_seconds(fns: Sequence[Callable[[], object]],
                   repeats: int) -> list[float]:
  """Median wall time of each `fn()` over `repeats` calls, interleaved.

  After one warm-up call each, the functions run in turn in every repeat,
  so that background load weighs on all of them alike.
  """
  for fn in fns:
    fn()
  times = np.zeros([repeats, len(fns)])
  for r in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      times[r, i] = time.perf_counter() - start
  return [float(t) for t in np.median(times, axis=0)]


def global_view_fn(image: np.ndarray, boxes: np.ndarray, size: int,
                   antialias: bool) -> Callable[[], object]:
  """A call making the global views of all `boxes` in one TF graph."""
  image_t = tf.constant(image)
  boxes_t = tf.constant(boxes, tf.int32)

  # Arguments, not captured constants: the graph optimiser must not fold
  # the work away.
  @tf.function
  def run(image_t, boxes_t):
    return tf.stack([
        views.crop_resize_flip(image_t, boxes_t[i], tf.constant(False), size,
                               antialias) for i in range(len(boxes))])

  return lambda: run(image_t, boxes_t).numpy()


def detco_views_fn(image: np.ndarray, spec: views.ViewSpec,
                   num: int) -> Callable[[], object]:
  """A call making `num` samples' `views.detco_views` in one TF graph."""
  image_t = tf.constant(image)

  @tf.function
  def run(image_t):
    return [views.detco_views(image_t, tf.constant([7, k], tf.int64), spec)
            for k in range(num)]

  return lambda: [v["local"].numpy() for v in run(image_t)]


def decode_fn(image: np.ndarray, num: int) -> Callable[[], object]:
  """A call decoding `num` JPEGs (quality 90) of `image`, for context.

  `num` different JPEGs (the image shifted by k columns): identical decodes
  in one graph would be merged by the graph optimiser.
  """
  jpegs = tf.stack([tf.io.encode_jpeg(tf.constant(np.roll(image, k, 1)),
                                      quality=90) for k in range(num)])

  @tf.function
  def run(jpegs):
    return [tf.io.decode_jpeg(jpegs[k], channels=3) for k in range(num)]

  return lambda: [x.numpy() for x in run(jpegs)]


def blur_fn(shape: Sequence[int], kernel_size: int) -> Callable[[], object]:
  """A call of the jitted `blur_with_kernel` on float32 images `shape`."""
  images = jnp.asarray(np.random.default_rng(0).random(shape, np.float32))
  weights = augment.gaussian_kernel1d(1.0, kernel_size)
  return lambda: _blur(images, weights).block_until_ready()


def transfer_bytes(spec: views.ViewSpec) -> dict[str, int]:
  """uint8 bytes per sample shipped to the device, per design."""
  patches = 2 * spec.num_patches * spec.patch_size ** 2 * 3
  crops = 2 * spec.local_size ** 2 * 3
  global_views = 2 * spec.global_size ** 2 * 3
  return {"patches": patches, "crops": crops, "global": global_views}


# ----------------------------------------------------------------------------
# Output.


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]
                   ) -> str:
  """A GitHub Markdown table (`report.table`'s)."""
  return "\n".join(report.table(header, rows))


def blur_rows(pairs: list[tuple[np.ndarray, np.ndarray]],
              spec: views.ViewSpec, aug: Any, sigmas: Sequence[float],
              mix_points: int) -> list[list[str]]:
  """Rows of table 2: fixed sigmas, the U[blur_sigma] mean and the mix."""
  def row(label, err, sigma_text, taps):
    return [label, sigma_text, str(taps), f"{err.overall:.3f}",
            f"{err.border:.3f}", f"{err.interior:.4f}", f"{err.max:.1f}"]

  rows = []
  for s in sigmas:
    sigma, taps = local_blur(s, spec, aug)
    rows.append(row(f"{s:g}", mean_blur_error(pairs, spec, sigma, taps),
                    f"{sigma:.3f}", taps))
  lo, hi = aug.blur_sigma
  grid = lo + (hi - lo) * (np.arange(mix_points) + 0.5) / mix_points
  errs = [mean_blur_error(pairs, spec, *local_blur(s, spec, aug))
          for s in grid]
  taps = local_blur(lo, spec, aug)[1]
  when = BlurError(*(float(np.mean([getattr(e, f.name) for e in errs]))
                     for f in dataclasses.fields(BlurError)[:3]),
                   max=float(np.max([e.max for e in errs])))
  lo_s, hi_s = local_blur(lo, spec, aug)[0], local_blur(hi, spec, aug)[0]
  rows.append(row(f"U[{lo:g}, {hi:g}], blurred", when,
                  f"U[{lo_s:.3f}, {hi_s:.3f}]", taps))
  p = aug.blur_prob
  mix = BlurError(p * when.overall, p * when.border, p * when.interior,
                  when.max)
  rows.append(row(f"MoCo v2 mix (blur p={p:g})", mix, "as above", taps))
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--long_side", type=int, default=500,
                      help="Longer side of the photographs (ImageNet's).")
  parser.add_argument("--crops_per_photo", type=int, default=30,
                      help="Global-view boxes (seeds) per photograph.")
  parser.add_argument("--jigsaw_per_photo", type=int, default=4,
                      help="Jigsaw crops per photograph.")
  parser.add_argument("--sigmas", default="0.1,1.0,2.0",
                      help="Blur sigmas, pixels of a 224 px view.")
  parser.add_argument("--mix_points", type=int, default=16,
                      help="Midpoints of U[aug.blur_sigma] averaged over.")
  parser.add_argument("--repeats", type=int, default=31,
                      help="Timing repeats (the median is reported).")
  parser.add_argument("--no_native", action="store_true",
                      help="Skip the global-view rows at native resolution.")
  parser.add_argument("--out", default=None,
                      help="Also write the tables to this file.")
  args = parser.parse_args(argv)

  # Before any TF op: one thread (XLA's is set at import, above).
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  start = time.time()
  config = detco.get_config()
  spec = views.ViewSpec.from_config(config.views)
  aug = config.aug
  command = "python experiments/reference_pixels.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  printed: list[str] = []

  def emit(lines: list[str]) -> None:
    printed.extend(lines)
    print("\n".join(lines), flush=True)

  emit([
      "# Pixels of this pipeline vs the reference (PIL, torchvision)",
      "",
      f"Command: `{command.strip()}`  ",
      f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; TensorFlow "
      f"{tf.__version__}, JAX {jax.__version__}, Pillow {PIL.__version__}, "
      f"scikit-image {skimage.__version__}  ",
      f"Photographs: scikit-image's {', '.join(COLOUR)}; grey {', '.join(GREY)}"
      f" (as RGB); LANCZOS to a longer side of {args.long_side} px.  ",
      f"Config: configs/detco.py (global {spec.global_size}, area "
      f"{spec.global_area}, local {spec.local_size}, grid {spec.grid}, patch "
      f"{spec.patch_size}; blur p={aug.blur_prob}, sigma {aug.blur_sigma}, "
      f"kernel frac {aug.blur_kernel_frac}).",
      ""])

  # 1. Global views.
  photos = load_photos(args.long_side)
  rows = [["ImageNet size"] + r for r in shrink_rows(global_view_errors(
      photos, spec, args.crops_per_photo))]
  if not args.no_native:
    native = load_photos(None)
    rows += [["native"] + r for r in shrink_rows(global_view_errors(
        native, spec, args.crops_per_photo))]
  emit([
      "## 1. Global views: mean |ours - PIL| in grey levels (0-255)",
      "",
      f"{args.crops_per_photo} RandomResizedCrop boxes per photograph "
      "(`views.sample_crops`, one stateless seed each), each resized to "
      f"{spec.global_size}^2 by `views.crop_resize_flip` (no flip) and by "
      "PIL's `crop(box).resize(..., BILINEAR)`; mean over all pixels and "
      "channels, then over crops. Shrink = longer crop side / "
      f"{spec.global_size}. \"native\": the photographs unresized (longer "
      "side 384-1411 px). \"PIL uint8 vs float\": PIL's fixed-point uint8 "
      "path vs its float32 path (mode F, rounded), the rounding floor; "
      "last column: ours antialiased vs that float path. PIL's "
      "`reducing_gap=None` is its default, so that sanity line would "
      "compare a call with itself: skipped.",
      "",
      markdown_table(["photographs", "shrink", "crops", "share",
                      "ours bilinear", "ours antialias",
                      "PIL uint8 vs float", "ours antialias vs PIL float"],
                     rows),
      ""])

  # 2. Jigsaw blur.
  pairs = jigsaw_crops(photos, spec, args.jigsaw_per_photo)
  first = next(iter(photos.values()))
  gap = pipeline_patch_gap(first, (0, 1000), pairs[0][1], spec)
  sigmas = [float(s) for s in args.sigmas.split(",")]
  radius = local_blur(1.0, spec, aug)[1] // 2
  band = np.mean(border_distance(spec.patch_size) < radius)
  patch_taps = augment.blur_kernel_size_for(spec.patch_size,
                                            aug.blur_kernel_frac)
  emit([
      "## 2. Jigsaw blur: per-patch vs whole-crop, mean |diff| in grey "
      "levels",
      "",
      f"{len(pairs)} jigsaw crops ({args.jigsaw_per_photo} per photograph, "
      f"`views.local_crops`), materialised at {spec.local_size}^2 with the "
      f"pipeline's resampling (patches sliced from it differ from the "
      f"pipeline's own by at most {gap:g} grey level); {spec.num_patches} "
      f"patches of {spec.patch_size} px at a random offset in each "
      f"{spec.cell_size} px cell. (a) each patch blurred on its own with "
      "reflect padding, one sigma per set (`augment.blur_with_kernel`, as "
      "`augment_views` does); (b) the whole crop blurred once (reflect at "
      "its edges), then cut. Sigma convention: the config's sigma is in "
      "pixels of a 224 px view, scaled by side / 224 where side is the "
      f"image the blur stands for: the {spec.local_size} px crop for both "
      "(a) and (b) (`blur_sigma_for(sigma, local_size)`, "
      "`blur_kernel_size_for(local_size, frac)`), as `augment_views` uses "
      f"for patches (scaling to the {spec.patch_size} px patch itself would "
      f"give sigma x {spec.patch_size}/224 and {patch_taps} taps). Border: "
      f"pixels closer than the kernel radius ({radius} px) to a patch edge "
      f"({band:.0%} of a patch); interior: the rest. Float differences, "
      "not re-quantised. "
      "The config has one `aug.blur_prob` for global views and patch sets "
      "alike (no separate local probability). The mix row = blur_prob x "
      f"the mean over {args.mix_points} midpoints of the sigma range.",
      "",
      markdown_table(["sigma at 224 px", "sigma at crop px", "taps",
                      "all pixels", "border", "interior", "max"],
                     blur_rows(pairs, spec, aug, sigmas, args.mix_points)),
      ""])

  # 3. Cost.
  photo = np.asarray(Image.fromarray(load_photo("chelsea")).resize(
      (500, 375), Image.LANCZOS))
  boxes = np.stack([sample_box(photo.shape, (99, k), spec)
                    for k in range(16)])
  num = len(boxes)
  t_bil, t_aa = (1e6 * t / num for t in median_seconds(
      [global_view_fn(photo, boxes, spec.global_size, False),
       global_view_fn(photo, boxes, spec.global_size, True)], args.repeats))
  aa_spec = dataclasses.replace(spec, antialias=True)
  t_views, t_views_aa, t_decode = (1e6 * t / 8 for t in median_seconds(
      [detco_views_fn(photo, spec, 8), detco_views_fn(photo, aa_spec, 8),
       decode_fn(photo, 8)], args.repeats))
  taps = local_blur(1.0, spec, aug)[1]
  sets = 16
  p = spec.patch_size
  t_set, t_crop = (1e6 * t / sets for t in median_seconds(
      [blur_fn((sets, spec.num_patches, p, p, 3), taps),
       blur_fn((sets, spec.local_size, spec.local_size, 3), taps)],
      args.repeats))
  nbytes = transfer_bytes(spec)
  extra = nbytes["crops"] - nbytes["patches"]
  per_sample = nbytes["global"] + nbytes["patches"]
  emit([
      "## 3. Cost on one thread (median of "
      f"{args.repeats} repeats)",
      "",
      "Host: TensorFlow graphs (intra- and inter-op threads 1) on a 500x375 "
      "photograph (chelsea, LANCZOS): 16 boxes per graph for a view, 8 "
      "samples per graph for `detco_views`, 8 JPEGs for the decode; the "
      "calls compared run in turn in each repeat. Device side: the jitted "
      f"`augment.blur_with_kernel` ({taps} taps) on XLA:CPU with one "
      f"thread, {sets} sets per call; an accelerator's times differ, the "
      "ratio is the point.",
      "",
      markdown_table(["operation", "per", "microseconds", "vs baseline"], [
          ["global view, bilinear", "view", f"{t_bil:.0f}", "1.00"],
          ["global view, antialias", "view", f"{t_aa:.0f}",
           f"{t_aa / t_bil:.2f}"],
          ["`detco_views` (2 views + 2 x 9 patches), bilinear", "sample",
           f"{t_views:.0f}", "1.00"],
          ["`detco_views`, global views antialiased", "sample",
           f"{t_views_aa:.0f}", f"{t_views_aa / t_views:.2f}"],
          ["JPEG decode of the 500x375 photograph (context)", "sample",
           f"{t_decode:.0f}", "-"],
          [f"blur of {spec.num_patches} x {p}^2 patches", "set",
           f"{t_set:.0f}", "1.00"],
          [f"blur of one {spec.local_size}^2 crop", "set", f"{t_crop:.0f}",
           f"{t_crop / t_set:.2f}"],
      ]),
      "",
      markdown_table(["host -> device, uint8 per sample", "bytes"], [
          [f"2 x {spec.num_patches} patches of {p}^2 x 3 (now)",
           f"{nbytes['patches']:,}"],
          [f"2 crops of {spec.local_size}^2 x 3 (whole-crop design)",
           f"{nbytes['crops']:,}"],
          ["extra for the whole-crop design",
           f"{extra:,} (+{extra / nbytes['patches']:.0%} of the patches, "
           f"+{extra / per_sample:.0%} of a sample with its 2 global views "
           f"of {nbytes['global']:,})"],
      ]),
      "",
      f"Wall time: {time.time() - start:.0f} s.",
      ""])
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(printed) + "\n")

if __name__ == "__main__":
  main()
