r"""What TF's JPEG decoder options would save, on the benchmark's photographs.

  python experiments/decode_options.py [--num_images=300] [--folder=DIR]

Decodes every JPEG of an ImageNet-like folder (`photos.write_folder`, or
`--folder`) on one thread, once per option, and prints the median CPU time
per image against the pipeline's decode (`sources.decode_image`), with the
mean absolute difference of the pixels where the option changes them:

  * `decode_jpeg` with `dct_method` INTEGER_FAST / INTEGER_ACCURATE;
  * `fancy_upscaling=False` (nearest chroma upsampling, not PIL's);
  * `ratio=2` (the DCT-domain half-size decode; usable only where every
    crop of a sample shrinks by 2x or more);
  * `decode_and_crop_jpeg` of a centred window of 64% of the area (what a
    sample whose four crops all lay in such a window could decode).

PNG files (one in 100) are left out: the options are JPEG's.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from detco_jax.benchmark import photos  # pylint: disable=g-import-not-at-top
from detco_jax.data import sources  # pylint: disable=g-import-not-at-top


def _window(encoded: tf.Tensor) -> tf.Tensor:
  """A centred crop window of 80% x 80% (64% of the area)."""
  shape = tf.io.extract_jpeg_shape(encoded)
  return tf.stack([shape[0] // 10, shape[1] // 10, shape[0] * 8 // 10,
                   shape[1] * 8 // 10])


OPTIONS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "pipeline (decode_image)": sources.decode_image,
    "decode_jpeg, dct INTEGER_FAST": lambda r: tf.io.decode_jpeg(
        r, channels=3, dct_method="INTEGER_FAST"),
    "decode_jpeg, dct INTEGER_ACCURATE": lambda r: tf.io.decode_jpeg(
        r, channels=3, dct_method="INTEGER_ACCURATE"),
    "fancy_upscaling=False": lambda r: tf.io.decode_jpeg(
        r, channels=3, fancy_upscaling=False),
    "ratio=2 (half size)": lambda r: tf.io.decode_jpeg(r, channels=3,
                                                       ratio=2),
    "decode_and_crop, 64% of the area": lambda r: tf.io.decode_and_crop_jpeg(
        r, _window(r), channels=3),
}


def time_option(decode: Callable[[tf.Tensor], tf.Tensor],
                files: list[tf.Tensor], repeats: int) -> float:
  """Median over `repeats` passes of the CPU seconds per image."""
  fn = tf.function(decode, input_signature=[tf.TensorSpec([], tf.string)])
  for encoded in files[:5]:
    fn(encoded)
  times = []
  for _ in range(repeats):
    start = time.process_time()
    for encoded in files:
      fn(encoded)
    times.append((time.process_time() - start) / len(files))
  return statistics.median(times)


def pixel_difference(decode: Callable[[tf.Tensor], tf.Tensor],
                     files: list[tf.Tensor]) -> float | None:
  """Mean |option - pipeline| in grey levels; None if the shapes differ."""
  diffs = []
  for encoded in files:
    a = sources.decode_image(encoded).numpy().astype(np.int16)
    b = decode(encoded).numpy().astype(np.int16)
    if a.shape != b.shape:
      return None
    diffs.append(np.abs(a - b).mean())
  return float(np.mean(diffs))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=300)
  parser.add_argument("--folder", default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    folder = args.folder or tmp
    if not args.folder:
      photos.write_folder(folder, args.num_images)
    files = [tf.constant(open(os.path.join(folder, f), "rb").read())
             for f in sorted(os.listdir(folder))]
  files = [f for f in files if bool(tf.io.is_jpeg(f))]
  print(f"{len(files)} JPEGs, one thread, median of {args.repeats} passes; "
        f"{time.strftime('%Y-%m-%d')}.\n")
  print("| decode | ms per image | vs pipeline | mean abs. difference |")
  print("|---|---|---|---|")
  base = None
  for name, decode in OPTIONS.items():
    seconds = time_option(decode, files, args.repeats)
    base = base or seconds
    diff = pixel_difference(decode, files[:20])
    shown = "other size" if diff is None else f"{diff:.3f}"
    print(f"| {name} | {seconds * 1e3:.3f} | {seconds / base - 1:+.0%} | "
          f"{shown} |", flush=True)


if __name__ == "__main__":
  main()
