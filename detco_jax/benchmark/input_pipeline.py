r"""Throughput of the DetCo host input pipeline (samples per second).

  python -m detco_jax.benchmark.input_pipeline [--num_images=300] \
      [--windows=5] [--folder=DIR] [--breakdown] [--antialias]

Measures DetCo samples (2 global views + 2 jigsaw sets of 9 patches, i.e. 20
images) per second through the real pipeline, `make_pretrain_iterator`'s
dataset: source -> decode -> all views -> batches -> numpy, in two settings:

  imagenet  real photographs at ImageNet's sizes (`photos.write_folder`:
            scikit-image's bundled photographs re-encoded as `.JPEG` files,
            about 100 KB each, a few CMYK, greyscale and PNG-in-JPEG ones),
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

`--antialias` adds a one-thread row with `views.antialias=True` (the
reference's antialiased global views). `--breakdown` prints where one
thread's time goes at ImageNet scale: the CPU time per sample of cumulative
stages (decode; + global views; + jigsaw sets; + batches of the views; +
numpy), each stage the difference from the one before. Every stage is
batched, so that none pays Python's per-element iteration.

Target: >= 400 DetCo samples/s per core at ImageNet scale on one thread.
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

from absl import flags  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from configs import detco  # pylint: disable=g-import-not-at-top
from detco_jax import cli  # pylint: disable=g-import-not-at-top
from detco_jax.benchmark import photos  # pylint: disable=g-import-not-at-top
from detco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from detco_jax.data import sources  # pylint: disable=g-import-not-at-top
from detco_jax.data import views  # pylint: disable=g-import-not-at-top


def single_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` restricted to one tf.data thread, without intra-op threads."""
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
  return _rates(it, config.batch_size, warmup=warmup, windows=windows,
                elements=window_batches)


def _rates(it, samples_per_element: int, *, warmup: int, windows: int,
           elements: int) -> dict[str, float]:
  """Median samples/s (wall and CPU time) of drawing from iterator `it`.

  Args:
    it: an iterator; each element holds `samples_per_element` samples.
    samples_per_element: samples per element.
    warmup: elements discarded first.
    windows: timed windows.
    elements: elements per window.

  Returns:
    {"wall": samples per wall second, "cpu": samples per CPU second}.
  """
  for _ in range(warmup):
    next(it)
  wall, cpu = [], []
  for _ in range(windows):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(elements):
      next(it)
    samples = elements * samples_per_element
    wall.append(samples / (time.perf_counter() - t0))
    cpu.append(samples / (time.process_time() - c0))
  return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def imagenet_config(folder: str, batch: int, antialias: bool = False):
  """`configs/detco.py` (ImageNet scale) reading the JPEG `folder`."""
  c = detco.get_config()
  c.views.antialias = antialias
  c.data.dataset = f"folder:{folder}"
  c.data.prefetch = 2
  c.batch_size = batch
  return c


def builtin_config(data_dir: str, batch: int, num_train: int):
  """`configs/detco.py:demo` on a generated built-in dataset."""
  c = detco.get_config("demo")
  c.data.data_dir = data_dir
  c.data.builtin_num_train = num_train
  c.data.builtin_num_test = 16
  c.data.shuffle_buffer = 1024
  c.batch_size = batch
  return c


def breakdown(config, windows: int, samples: int = 256) -> list[tuple[str, float]]:
  """Where one thread's time goes: CPU ms per sample of cumulative stages.

  Args:
    config: the ImageNet-scale config.
    windows: timed windows per stage (median).
    samples: samples per window.

  Returns:
    [(stage, ms per sample of the stages up to it)], in pipeline order.
  """
  source = sources.open_source(config.data, config.data.train_split,
                               process_index=0, process_count=1,
                               drop_remainder=True)
  stream = pipeline.slot_stream(source, order_key=1, start_position=0)
  spec = views.ViewSpec.from_config(config.views)
  batch = config.batch_size

  def seed(example):
    return pipeline.view_seed(7, example["position"])

  def first_pixels(*images):
    # One value of each tensor: it must be computed, but nothing else is
    # copied, and batches of these scalars cost next to nothing. (A static
    # figure such as the size would let TF prune the op that made it.)
    return [tf.reshape(x, [-1])[0] for x in images]

  def views_of(e):
    return views.detco_views(e["image"], seed(e), spec)

  stages = [
      ("decode (read, decode, slot bookkeeping)",
       stream.map(lambda e: first_pixels(e["image"]))),
      ("+ 2 global views", stream.map(lambda e: first_pixels(
          views.global_views(e["image"], seed(e), spec)))),
      ("+ 2 jigsaw sets", stream.map(lambda e: first_pixels(
          *views_of(e).values()))),
      ("+ batches of views", stream.map(views_of)),
  ]
  stages = [(name, ds.batch(batch), batch) for name, ds in stages]
  out = []
  for name, ds, per in stages:
    rates = _rates(iter(single_thread(ds)), per, warmup=max(1, 32 // per),
                   windows=windows, elements=max(1, samples // per))
    out.append((name, 1e3 / rates["cpu"]))
  full = measure(config, one_thread=True, warmup=1, windows=windows,
                 window_batches=max(1, samples // batch))
  out.append(("+ numpy (the whole pipeline)", 1e3 / full["cpu"]))
  return out


def print_breakdown(config, windows: int) -> None:
  """Prints `breakdown`: each stage's own cost and the cumulative one."""
  print(f"\n{'stage (one thread)':40s} {'ms/sample':>9s} {'cumulative':>10s} "
        f"{'share':>6s}")
  rows = breakdown(config, windows)
  total, previous = rows[-1][1], 0.0
  for name, cumulative in rows:
    own = cumulative - previous
    print(f"{name:40s} {own:9.3f} {cumulative:10.3f} {own / total:6.0%}",
          flush=True)
    previous = cumulative


def define_flags() -> None:
  """The benchmark's flags."""
  flags.DEFINE_integer("num_images", 300, "Photographs written for the "
                       "ImageNet-scale folder.")
  flags.DEFINE_string("folder", None, "Read this folder of images instead "
                      "of writing one (e.g. a sample of real ImageNet).")
  flags.DEFINE_integer("builtin_images", 1024,
                       "Train images of the generated built-in dataset.")
  flags.DEFINE_integer("batch_size", 64, "Global batch.")
  flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
  flags.DEFINE_integer("windows", 5, "Timed windows (median).")
  flags.DEFINE_integer("window_batches", 4, "Batches per window.")
  flags.DEFINE_bool("skip_builtin", False, "Time the JPEG folder only.")
  flags.DEFINE_bool("antialias", False, "Add a one-thread row with the "
                    "antialiased global views (views.antialias=True).")
  flags.DEFINE_bool("breakdown", False, "Print where one thread's time "
                    "goes at ImageNet scale.")


def _imagenet_folder(tmp: str, args) -> str:
  """The photographs' folder: `--folder`, or written into `tmp`."""
  if args.folder:
    return args.folder
  folder = os.path.join(tmp, "jpegs")
  os.makedirs(folder)
  t = time.perf_counter()
  summary = photos.write_folder(folder, args.num_images)
  print(f"Wrote {summary.count} photographs in "
        f"{time.perf_counter() - t:.1f}s: mean {summary.mean_kb:.0f} KB, "
        f"{summary.mean_pixels / 1e3:.0f}k pixels, "
        f"{summary.bytes_per_pixel:.2f} bytes/pixel, "
        f"{summary.share_over_1000:.1%} over 1,000 px; {summary.kinds}.")
  return folder


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
    folder = _imagenet_folder(tmp, args)
    print(f"{cores} cores.")
    settings = [("imagenet", imagenet_config(folder, args.batch_size), True)]
    if args.antialias:
      settings.append(("antialias", imagenet_config(
          folder, args.batch_size, antialias=True), False))
    if not args.skip_builtin:
      t = time.perf_counter()
      config = builtin_config(os.path.join(tmp, "tfds"), args.batch_size,
                              args.builtin_images)
      pipeline.sources.num_examples(config.data, "train")  # Generates it.
      print(f"Generated detco_shapes ({args.builtin_images} train images) in "
            f"{time.perf_counter() - t:.1f}s.")
      settings.append(("builtin", config, True))

    print(f"\n{'setting':9s} {'threads':8s} {'samples/s':>10s} "
          f"{'per core':>9s} {'per CPU-s':>10s}")
    for name, config, all_threads in settings:
      for one_thread in ((False, True) if all_threads else (True,)):
        r = measure(config, one_thread=one_thread, warmup=args.warmup,
                    windows=args.windows, window_batches=args.window_batches)
        per_core = r["wall"] if one_thread else r["wall"] / cores
        print(f"{name:9s} {'1' if one_thread else 'all':8s} "
              f"{r['wall']:10.1f} {per_core:9.1f} {r['cpu']:10.1f}",
              flush=True)
    if args.breakdown:
      print_breakdown(settings[0][1], args.windows)


if __name__ == "__main__":
  # Alone, it needs no accelerator. Not on import: the suite imports this
  # module after JAX has taken the GPUs (TensorFlow is kept off them by
  # `sources.hide_accelerators_from_tf` either way).
  os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
  cli.run(main, define_flags)
