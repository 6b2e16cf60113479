r"""Throughput of the DetCo host input pipeline (samples per second).

  python -m detco_jax.benchmark.input_pipeline [--num_images=300] [--windows=5]

Measures DetCo samples (2 global views + 2 jigsaw sets of 9 patches, i.e. 20
images) per second through the real pipeline, `make_pretrain_iterator`'s
dataset: source -> decode -> all views -> batches -> numpy, in two settings:

  imagenet  a folder of JPEGs of about 500x375 px (ImageNet's typical size,
            smooth random content plus noise, written here to a temp folder),
            ImageNet view sizes (global 224, jigsaw 255 -> 3x3 cells, 64 px
            patches), batch 64;
  builtin   the built-in `detco_shapes` dataset (64 px PNGs, generated into a
            temp data dir with small counts) at `configs/detco.py:demo` view
            sizes, batch 64.

Each setting runs twice: with tf.data's defaults (all cores, AUTOTUNE) and
with tf.data restricted to one thread (`private_threadpool_size = 1`,
`max_intra_op_parallelism = 1`), the single-core figure. A warm-up (pipeline
start, autotuning, file cache) is excluded; the figure is the median over
several timed windows. "per core" is the all-core rate divided by the cores;
"CPU-s" divides by the CPU time the process used instead of wall time, which
stays meaningful on a machine shared with other jobs.

Target: >= 100 DetCo samples/s per core at ImageNet scale.
"""

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Run from any directory of a checkout: make its `configs` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from configs import detco  # pylint: disable=g-import-not-at-top
from detco_jax import cli  # pylint: disable=g-import-not-at-top
from detco_jax.data import pipeline  # pylint: disable=g-import-not-at-top


def write_jpegs(directory: str, count: int, seed: int = 0) -> None:
  """Writes `count` JPEGs of ~500x375: smooth colour fields plus noise.

  Args:
    directory: where to write.
    count: number of files.
    seed: numpy seed.
  """
  rng = np.random.default_rng(seed)
  for i in range(count):
    width, height = (500, 375) if i % 4 else (375, 500)  # Some portrait.
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(smooth, np.float32) + rng.normal(0, 6,
                                                         (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(directory, f"{i:05d}.jpg"), quality=90)


def single_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def measure(config, *, one_thread: bool, warmup: int, windows: int,
            window_batches: int) -> dict[str, float]:
  """Median samples/s (wall and CPU time) of the pretraining stream.

  Args:
    config: the experiment config.
    one_thread: restrict tf.data to one thread.
    warmup: batches discarded first.
    windows: timed windows.
    window_batches: batches per window.

  Returns:
    {"wall": samples per wall second, "cpu": samples per CPU second}.
  """
  ds = pipeline.make_pretrain_dataset(config, process_index=0,
                                      process_count=1)
  if one_thread:
    ds = single_thread(ds)
  it = pipeline.InputIterator(ds, batch_size=config.batch_size,
                              num_examples=0)
  for _ in range(warmup):
    next(it)
  wall, cpu = [], []
  for _ in range(windows):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(window_batches):
      next(it)
    samples = window_batches * config.batch_size
    wall.append(samples / (time.perf_counter() - t0))
    cpu.append(samples / (time.process_time() - c0))
  return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def imagenet_config(folder: str, batch: int):
  c = detco.get_config()
  c.data.dataset = f"folder:{folder}"
  c.data.prefetch = 2
  c.batch_size = batch
  return c


def builtin_config(data_dir: str, batch: int, num_train: int):
  c = detco.get_config("demo")
  c.data.data_dir = data_dir
  c.data.builtin_num_train = num_train
  c.data.builtin_num_test = 16
  c.data.shuffle_buffer = 1024
  c.batch_size = batch
  return c


def define_flags() -> None:
  """The benchmark's flags."""
  flags.DEFINE_integer("num_images", 300, "JPEGs written for the folder "
                       "source.")
  flags.DEFINE_integer("builtin_images", 1024,
                       "Train images of the generated built-in dataset.")
  flags.DEFINE_integer("batch_size", 64, "Global batch.")
  flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
  flags.DEFINE_integer("windows", 5, "Timed windows (median).")
  flags.DEFINE_integer("window_batches", 4, "Batches per window.")
  flags.DEFINE_bool("skip_builtin", False, "Time the JPEG folder only.")


def main() -> None:
  """Times the input pipeline with the command-line flags."""
  args = flags.FLAGS

  cores = os.cpu_count() or 1
  load = os.getloadavg()[0]
  if load > 1.5:
    # Other jobs compete for the cores: wall-clock rates drop, the CPU-time
    # column much less.
    print(f"Note: load average {load:.1f} on {cores} cores before starting.")
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "jpegs")
    os.makedirs(folder)
    t = time.perf_counter()
    write_jpegs(folder, args.num_images)
    print(f"Wrote {args.num_images} JPEGs (~500x375) in "
          f"{time.perf_counter() - t:.1f}s; {cores} cores.")
    settings = [("imagenet", imagenet_config(folder, args.batch_size))]
    if not args.skip_builtin:
      t = time.perf_counter()
      config = builtin_config(os.path.join(tmp, "tfds"), args.batch_size,
                              args.builtin_images)
      pipeline.sources.num_examples(config.data, "train")  # Generates it.
      print(f"Generated detco_shapes ({args.builtin_images} train images) in "
            f"{time.perf_counter() - t:.1f}s.")
      settings.append(("builtin", config))

    print(f"\n{'setting':9s} {'threads':8s} {'samples/s':>10s} "
          f"{'per core':>9s} {'per CPU-s':>10s}")
    for name, config in settings:
      for one_thread in (False, True):
        r = measure(config, one_thread=one_thread, warmup=args.warmup,
                    windows=args.windows, window_batches=args.window_batches)
        per_core = r["wall"] if one_thread else r["wall"] / cores
        print(f"{name:9s} {'1' if one_thread else 'all':8s} "
              f"{r['wall']:10.1f} {per_core:9.1f} {r['cpu']:10.1f}",
              flush=True)


if __name__ == "__main__":
  # Alone, it needs no accelerator. Not on import: the suite imports this
  # module after JAX has taken the GPUs (TensorFlow is kept off them by
  # `sources.hide_accelerators_from_tf` either way).
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  cli.run(main, define_flags)
