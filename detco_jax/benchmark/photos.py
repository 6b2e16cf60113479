"""A folder of real photographs at ImageNet's sizes, for the input benchmarks.

The host pipeline's cost is mostly JPEG decoding, which depends on the
pixels (how much detail the entropy coder carries) and on the image's size.
So the benchmark reads real photographs, not synthetic fields: those that
scikit-image ships inside its wheel (`skimage.data`, no download), cut and
resized to sizes drawn from an ImageNet-like distribution and re-encoded as
JPEGs.

Sizes (`draw_size`; an assumed mixture, chosen to match two checkable
aggregates of ILSVRC-2012's 1,281,167 training images: most were stored at
500 px on the longer side, and the training archive is 138 GB, about 108 KB
per image):

  * 80%: longer side 500 px; the shorter side 375 (4:3, 45% of these), 333
    (3:2, 25%) or uniform in [250, 500] (30%);
  * 17%: longer side uniform in [150, 500);
  * 3%: longer side log-uniform in (500, 2000], the long tail;

one in four portrait. A decoder's time follows the file's bytes as well as
its pixels (libjpeg-turbo through TF, one thread: 0.49 ms for a 500x375
photograph at 32 KB, 0.91 ms for the same pixels at 105 KB), and these
photographs are smoother than ImageNet's, so the JPEG quality (uniform in
[97, 99]) is set for the bytes, not for realism: the set's mean file is
about 100 KB (0.52 bytes per pixel), near ImageNet's 108 KB. A photograph
smaller than its drawn size is enlarged (bicubic), so the few largest files
are smoother than real ones of their size. `write_folder` reports the
set's mean file size and bytes per pixel.

ImageNet also holds odd files that a decoder must survive: 22 CMYK JPEGs,
one PNG named `.JPEG`, and greyscale JPEGs. Here one file in 100 is a CMYK
JPEG, one in 100 a PNG named `.JPEG`, and one in 50 a single-channel JPEG
(far more often than in ImageNet, so that a few hundred files hold each
kind).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
from PIL import Image

# The photographs of `skimage.data` that its wheel bundles (no download).
COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "retina", "immunohistochemistry", "stereo_motorcycle")
GREY = ("camera", "coins", "moon", "grass", "gravel", "brick")

CMYK_EVERY = 100
PNG_EVERY = 100
GREY_EVERY = 50
QUALITY = (97, 99)


@dataclasses.dataclass(frozen=True)
class FolderSummary:
  """What `write_folder` wrote.

  Attributes:
    count: files written.
    mean_kb: mean file size in kB (1,000 bytes).
    bytes_per_pixel: total bytes over total pixels.
    mean_pixels: mean width x height.
    share_over_1000: fraction of files whose longer side exceeds 1,000 px.
    kinds: files per kind ("rgb", "grey", "cmyk", "png").
  """
  count: int
  mean_kb: float
  bytes_per_pixel: float
  mean_pixels: float
  share_over_1000: float
  kinds: dict[str, int]


def load(name: str) -> np.ndarray:
  """One bundled photograph of scikit-image.

  Args:
    name: one of `COLOUR` or `GREY`.

  Returns:
    uint8 [H, W, 3] (colour) or [H, W] (grey).

  Raises:
    ImportError: scikit-image is not installed, with the fix.
  """
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "The benchmark's photographs come from scikit-image: pip install "
        "scikit-image (it is in the [test] extra).") from e
  image = getattr(data, name)()
  if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disp).
    image = image[0]
  return np.ascontiguousarray(image[..., :3] if image.ndim == 3 else image)


def load_photographs() -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The bundled photographs of scikit-image.

  Returns:
    (colour, grey): uint8 arrays [H, W, 3] and [H, W].

  Raises:
    ImportError: scikit-image is not installed, with the fix.
  """
  return [load(name) for name in COLOUR], [load(name) for name in GREY]


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
  """One (width, height) from the ImageNet-like mixture of the docstring.

  Args:
    rng: numpy generator.

  Returns:
    (width, height) in pixels.
  """
  u = rng.random()
  if u < 0.80:
    long = 500
    v = rng.random()
    short = 375 if v < 0.45 else 333 if v < 0.70 else int(
        rng.integers(250, 501))
  else:
    if u < 0.97:
      long = int(rng.integers(150, 500))
    else:
      long = int(round(math.exp(rng.uniform(math.log(501), math.log(2000)))))
    short = int(round(long * rng.uniform(0.5, 1.0)))
  return (short, long) if rng.random() < 0.25 else (long, short)


def cut(photo: np.ndarray, size: tuple[int, int],
        rng: np.random.Generator) -> Image.Image:
  """A random window of `photo` with `size`'s aspect ratio, resized to it.

  Where the photograph is large enough, the window is `size` itself, cut at
  the photograph's own resolution (no resampling, which would smooth away
  the detail that decoding pays for); otherwise it is the largest window of
  that ratio that fits, enlarged.

  Args:
    photo: uint8 [H, W(, 3)].
    size: (width, height) of the result.
    rng: numpy generator.

  Returns:
    The PIL image, `size` pixels.
  """
  h, w = photo.shape[:2]
  width, height = size
  scale = min(1.0, w / width, h / height)
  cw, ch = max(1, int(width * scale)), max(1, int(height * scale))
  left = int(rng.integers(0, w - cw + 1))
  top = int(rng.integers(0, h - ch + 1))
  window = Image.fromarray(photo[top:top + ch, left:left + cw])
  return window if (cw, ch) == size else window.resize(size, Image.BICUBIC)


def encode(image: Image.Image, kind: str, quality: int) -> bytes:
  """The file's bytes: a JPEG of `kind`'s colour model, or a PNG.

  Args:
    image: RGB or L image.
    kind: "rgb", "grey" or "cmyk" (JPEG), or "png".
    quality: JPEG quality.

  Returns:
    The encoded bytes.
  """
  out = io.BytesIO()
  if kind == "png":
    image.save(out, "PNG")
  else:
    mode = {"rgb": "RGB", "grey": "L", "cmyk": "CMYK"}[kind]
    image.convert(mode).save(out, "JPEG", quality=quality)
  return out.getvalue()


def write_folder(directory: str, count: int, seed: int = 0) -> FolderSummary:
  """Writes `count` ImageNet-like `.JPEG` files into `directory`.

  Args:
    directory: an existing folder.
    count: files to write.
    seed: numpy seed; the same seed writes the same files.

  Returns:
    The `FolderSummary` of what was written.
  """
  rng = np.random.default_rng(seed)
  colour, grey = load_photographs()
  total_bytes = total_pixels = over = 0
  kinds = {"rgb": 0, "grey": 0, "cmyk": 0, "png": 0}
  for i in range(count):
    kind = ("cmyk" if i % CMYK_EVERY == CMYK_EVERY - 1 else
            "png" if i % PNG_EVERY == PNG_EVERY // 2 else
            "grey" if i % GREY_EVERY == GREY_EVERY // 4 else "rgb")
    pool = grey if kind == "grey" else colour
    size = draw_size(rng)
    image = cut(pool[int(rng.integers(len(pool)))], size, rng)
    data = encode(image, kind, int(rng.integers(QUALITY[0], QUALITY[1] + 1)))
    with open(os.path.join(directory, f"{i:05d}.JPEG"), "wb") as f:
      f.write(data)
    kinds[kind] += 1
    total_bytes += len(data)
    total_pixels += size[0] * size[1]
    over += max(size) > 1000
  return FolderSummary(
      count=count, mean_kb=total_bytes / max(count, 1) / 1000,
      bytes_per_pixel=total_bytes / max(total_pixels, 1),
      mean_pixels=total_pixels / max(count, 1),
      share_over_1000=over / max(count, 1), kinds=kinds)
