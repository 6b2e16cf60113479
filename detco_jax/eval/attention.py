r"""Activation ("attention") maps of pretrained backbones (DetCo, Fig. 4).

For a few test images, draws where each stage of one or more backbones is
active, DetCo and MoCo v2 side by side:

  python -m detco_jax.eval.attention \
      --run=detco:$DETCO_WORKDIR --run=mocov2:$MOCO_WORKDIR \
      --run=random:random --out=$OUT [--num_images=8] [--split=test] \
      [--data_dir=...] [--step=...] [--p=1] [--ratio_images=500]
  python -m detco_jax.eval.attention \
      --run=mocov2:moco_v2_200ep_pretrain.pth.tar --run=random:random \
      --config=configs/linear_probe.py --out=$OUT

`--run=LABEL:WORKDIR[@STEP]` names a pretraining run (its latest checkpoint,
`--step`, or STEP); `--run=LABEL:FILE` a checkpoint file (a torchvision /
MoCo / DetCo `.pth`, a detectron2 `.pkl`; `detco_jax.pretrained.load_file`);
`--run=LABEL:random` is the untrained floor, with the architecture of the
first other run. The images are the first `--num_images` of a dataset
(`config.data`, split `--split`, default its `eval_split`), resized and
centre-cropped like the linear probe's test views; every run sees the same
images. The dataset is that of `--config` (a probe config, e.g.
`--config=configs/linear_probe.py:demo`, whose `pretrained_file` settings
the file runs also take), else that of the first workdir run; a file names
no dataset.

A stage's map (Zagoruyko & Komodakis, "Paying more attention to attention",
activation-based attention): the channel mean of |a|^p of the stage's output
a [h, w, C] (post-ReLU, so |a| = a), bilinearly upsampled to the image size
and min-max normalised to [0, 1] per image and stage. p = 1 by default;
p = 2 (mean of squares) stresses the strongest positions more.

Where a backbone looks, as a number: on datasets with object masks (the
built-in `detco_shapes`), the object/background ratio of each stage is the
mean channel-mean |a|^p over object pixels (mask > 0) divided by that over
background pixels (mask 0), the stage's map bilinearly upsampled to the
image (not normalised), pooled over the first `--ratio_images` test images.
Above 1, a stage is more active on objects than on the background; a
detector needs that.

Written to `--out` (process 0 only; every process may run the command):

  * `attention.png`: rows = images; columns = the image, then res2..res5 of
    each run, as heat maps over the (dimmed) image; a header row names the
    columns and shows the colour scale (0 = blue, 1 = red);
  * `attention_<label>.png`: the same for each run alone;
  * TensorBoard images `attention/all` and `attention/<label>`;
  * `attention_maps.npz`: "images" uint8 [N, S, S, 3], "image_labels" [N],
    "runs" (the labels), and per run and stage "<label>/<stage>" float32
    [N, S, S] (the normalised maps) and "<label>/<stage>/raw" [N, h, w] (the
    channel means before upsampling and normalisation);
  * `attention_ratio.json`: {"images": n, "ratios": {label: {stage:
    ratio}}} (with masks only), also logged as a table.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import dataclasses
import os
import re
import sys

from absl import flags
from ml_collections import config_flags

from detco_jax import config_checks

# A run whose workdir is one of these is a random initialisation.
RANDOM_WORKDIRS = ("random", "random_init")
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


# ----------------------------------------------------------------------------
# Command line: parsed and checked before JAX and TensorFlow load; the job
# then runs from this module imported again under its own name.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One `--run`: a label and a workdir or checkpoint file (None: random
  initialisation)."""
  label: str
  workdir: str | None
  step: int | None = None


def parse_run(spec: str) -> RunSpec:
  """Parses `LABEL:WORKDIR[@STEP]` or `LABEL:random`.

  Args:
    spec: the flag value. The label ends at the first ":" (so gs:// workdirs
      work); `@STEP` picks a checkpoint of that run.

  Returns:
    The run.

  Raises:
    ValueError: on a malformed spec or a label unfit for a file name.
  """
  label, sep, workdir = spec.partition(":")
  if not sep or not workdir:
    raise ValueError(f"--run={spec!r}: expected LABEL:WORKDIR[@STEP] or "
                     "LABEL:random.")
  if not _LABEL.match(label):
    raise ValueError(f"--run={spec!r}: the label {label!r} must be letters, "
                     "digits or _.+- (it names files and TensorBoard tags).")
  if workdir in RANDOM_WORKDIRS:
    return RunSpec(label, None)
  match = re.fullmatch(r"(.+)@(\d+)", workdir)
  if match:
    return RunSpec(label, match.group(1), int(match.group(2)))
  return RunSpec(label, workdir)


def _define_flags() -> None:
  """Defines the CLI flags.

  Only when run as a program: importing this module next to other jobs'
  modules (tests, notebooks) must not clash on flag names such as --step.
  """
  flags.DEFINE_multi_string(
      "run", None, "LABEL:WORKDIR[@STEP] of a pretraining run, LABEL:FILE "
      "of a checkpoint file, or LABEL:random for the untrained floor; "
      "repeat for several.", required=True)
  config_flags.DEFINE_config_file(
      "config", None, "A probe config (e.g. configs/linear_probe.py:demo): "
      "its data and eval_views give the images, its pretrained_file the "
      "file runs' settings; default the first workdir run's dataset.",
      lock_config=True)
  flags.DEFINE_string("out", None, "Output directory.", required=True)
  flags.DEFINE_integer("num_images", 8, "Images (rows).")
  flags.DEFINE_string("split", None,
                      "Split; default the first run's data.eval_split.")
  flags.DEFINE_string("data_dir", None, "Overrides the runs' data.data_dir.")
  flags.DEFINE_integer("step", None,
                       "Checkpoint of runs without @STEP; default latest.")
  flags.DEFINE_float("p", 1.0, "Maps are the channel mean of |a|^p.")
  flags.DEFINE_integer("seed", 0, "Initialisation seed of random runs.")
  flags.DEFINE_float("alpha", 0.5, "Opacity of the heat maps.")
  flags.DEFINE_integer("ratio_images", 500,
                       "Test images for the object/background ratios (0: "
                       "none).")


def check_flags() -> None:
  """Each run's workdir or file and `--out`, checked before JAX loads."""
  f = flags.FLAGS
  for run in map(parse_run, f.run):
    if run.workdir is None:
      continue
    # A file has no steps: only its own @STEP is a mistake.
    step = run.step
    if step is None and not os.path.isfile(run.workdir):
      step = f.step
    config_checks.check_source(run.workdir, step)
  config_checks.check_directory("out", f.out)


if __name__ == "__main__":
  cli.make_configs_importable(sys.argv)
  cli.run("detco_jax.eval.attention:main", _define_flags,
          precheck=check_flags)

import copy
import io
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from PIL import Image

from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import visualize
from detco_jax.data import pipeline
from detco_jax.data import segmentation
from detco_jax.data import sources
from detco_jax.eval import features

Array = jax.Array

STAGES = ("res2", "res3", "res4", "res5")
RATIO_FILE = "attention_ratio.json"


# ----------------------------------------------------------------------------
# The maps.


def channel_energy(maps: Array, p: float = 1.0) -> Array:
  """Mean over channels of |a|^p: [B, h, w, C] -> [B, h, w]."""
  a = jnp.abs(maps.astype(jnp.float32))
  return jnp.mean(a if p == 1 else a**p, axis=-1)


def normalize_minmax(maps: Array, eps: float = 1e-12) -> Array:
  """Each [..., H, W] map scaled to [0, 1]; a constant map becomes 0."""
  low = maps.min(axis=(-2, -1), keepdims=True)
  high = maps.max(axis=(-2, -1), keepdims=True)
  return (maps - low) / jnp.maximum(high - low, eps)


def attention_map(maps: Array, size: tuple[int, int],
                  p: float = 1.0) -> Array:
  """A stage's activation-based attention map.

  Args:
    maps: stage activations [B, h, w, C].
    size: the image size (H, W) to upsample to.
    p: the exponent of |a|.

  Returns:
    float32 [B, H, W] in [0, 1]: channel mean of |a|^p, bilinearly resized
    (half-pixel centres, edges clamped) and min-max normalised per image.
  """
  energy = channel_energy(maps, p)
  resized = jax.image.resize(energy, (energy.shape[0], *size), "bilinear")
  return normalize_minmax(resized)


def compute_maps(backbone: pretrained.Backbone, images: np.ndarray,
                 p: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
  """The attention maps of every stage of one backbone (this process only).

  Args:
    backbone: the backbone (evaluation-mode BN, its pretraining
      normalisation).
    images: uint8 [N, S, S, 3].
    p: the exponent of |a|.

  Returns:
    {"maps": {stage: float32 [N, S, S]}, "raw": {stage: float32 [N, h, w]}}.
  """
  size = images.shape[1:3]

  def fn(variables, images):
    stage = features.stage_maps(backbone, variables, images, STAGES)
    return {"maps": {s: attention_map(m, size, p) for s, m in stage.items()},
            "raw": {s: channel_energy(m, p) for s, m in stage.items()}}

  # Host copies: the variables may be global (multi-process) arrays, and
  # this small job runs on one process's default device.
  variables = jax.device_get(backbone.variables)
  return jax.device_get(jax.jit(fn)(variables, images))


def masked_sums(energy: Array, masks: Array) -> Array:
  """Sums and pixel counts of `energy` on objects and on background.

  Args:
    energy: float [N, H, W] maps at the masks' size (not normalised).
    masks: [N, H, W] ints: 0 background, 1..K objects, others ignored
      (`segmentation.IGNORE`, padding).

  Returns:
    float32 [4]: object sum, object pixels, background sum, background
    pixels.
  """
  masks = masks.astype(jnp.int32)
  objects = (masks > 0) & (masks != segmentation.IGNORE)
  background = masks == 0
  total = lambda where: jnp.sum(jnp.where(where, energy, 0.0))
  return jnp.stack([total(objects), jnp.sum(objects), total(background),
                    jnp.sum(background)]).astype(jnp.float32)


def ratio_of_sums(sums: Any) -> float:
  """Object mean over background mean, from `masked_sums` (added up)."""
  sums = np.asarray(sums, np.float64)
  return float((sums[0] / max(sums[1], 1)) / (sums[2] / max(sums[3], 1)))


def stage_ratios(backbone: pretrained.Backbone, images: np.ndarray,
                 masks: np.ndarray, p: float = 1.0,
                 batch_size: int = 100) -> dict[str, float]:
  """Each stage's object/background ratio over `images` (this process).

  Args:
    backbone: the backbone.
    images: uint8 [N, S, S, 3].
    masks: [N, S, S] object masks (0 background).
    p: the exponent of |a|.
    batch_size: images per forward pass.

  Returns:
    {stage: ratio}, pooled over every pixel of every image.
  """
  size = images.shape[1:3]

  @jax.jit
  def sums(variables, images, masks):
    stage = features.stage_maps(backbone, variables, images, STAGES)
    out = {}
    for s, m in stage.items():
      energy = channel_energy(m, p)
      energy = jax.image.resize(energy, (energy.shape[0], *size), "bilinear")
      out[s] = masked_sums(energy, masks)
    return out

  variables = jax.device_get(backbone.variables)
  total = None
  for i in range(0, len(images), batch_size):
    part = jax.device_get(sums(variables, images[i:i + batch_size],
                               masks[i:i + batch_size]))
    total = part if total is None else {s: total[s] + part[s] for s in part}
  return {s: ratio_of_sums(t) for s, t in total.items()}


# ----------------------------------------------------------------------------
# Runs and images.


def load_backbones(runs: Sequence[RunSpec], step: int | None = None,
                   seed: int = 0,
                   file_settings: Any = None) -> list[pretrained.Backbone]:
  """Loads each run's backbone, in order (every process must call this).

  Args:
    runs: the runs; labels must be distinct and at least one must have a
      workdir or a file.
    step: the checkpoint of workdir runs without their own `@STEP`; None:
      latest.
    seed: the initialisation seed of random runs.
    file_settings: the settings of file runs (a probe config's
      `pretrained_file`); None: `pretrained.FILE_DEFAULTS`.

  Returns:
    One backbone per run. Random runs take the first other run's config.

  Raises:
    ValueError: duplicate labels, only random runs, or a step for a file.
  """
  labels = [r.label for r in runs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--run labels must be distinct, got {labels}.")

  def load(run):
    if pretrained.is_file(run.workdir):
      # A file has no steps: only its own @STEP is a mistake.
      return pretrained.load_source(run.workdir, run.step, file_settings)
    return pretrained.load(run.workdir,
                           run.step if run.step is not None else step)

  loaded = {r.label: load(r) for r in runs if r.workdir is not None}
  if not loaded:
    raise ValueError("A random run needs a workdir run (or a checkpoint "
                     "file) to copy its architecture from: add "
                     "--run=LABEL:WORKDIR.")
  config = next(iter(loaded.values())).config
  return [loaded[r.label] if r.workdir is not None
          else pretrained.random_init(config, seed) for r in runs]


def images_config(backbones: Sequence[pretrained.Backbone],
                  config: ml_collections.ConfigDict | None
                  ) -> ml_collections.ConfigDict:
  """The config whose `data` and `eval_views` give the images.

  Args:
    backbones: the runs' backbones.
    config: the `--config` probe config, if given.

  Returns:
    `config`, else the first workdir run's pretraining config.

  Raises:
    ValueError: when neither names a dataset (only file and random runs).
  """
  if config is not None:
    return config
  for backbone in backbones:
    if "data" in backbone.config:
      return backbone.config
  raise ValueError(
      "No run names a dataset (checkpoint files carry none): add "
      "--config=configs/linear_probe.py:VARIANT, whose data and eval_views "
      "give the images.")


def load_images(config: ml_collections.ConfigDict, split: str | None,
                num_images: int,
                data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_images` test views of a pretraining run's dataset.

  Read as if by a single process, so the images do not depend on how many
  processes run the job.

  Args:
    config: the pretraining config (`data`, `views` / `eval_views`).
    split: the split; None: `config.data.eval_split`.
    num_images: how many (fewer if the split is smaller).
    data_dir: overrides `config.data.data_dir`.

  Returns:
    (uint8 [n, S, S, 3] images, int [n] labels).
  """
  config = copy.deepcopy(config)
  if data_dir:
    config.data.data_dir = data_dir
  split = split or config.data.get("eval_split", "test")
  batch = next(pipeline.make_eval_iterator(
      config, split, train=False, batch_size=num_images, process_index=0,
      process_count=1))
  real = batch["mask"] > 0  # The split may be shorter than the batch.
  if not real.all():
    logging.warning("Split %r holds only %d images.", split, int(real.sum()))
  return batch["image"][real], batch["label"][real]


def load_masked_images(config: ml_collections.ConfigDict, split: str | None,
                       num_images: int, data_dir: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray] | None:
  """The first `num_images` test views with their object masks.

  The same resize and centre crop as `load_images` (the linear probe's test
  views), cut identically from the mask (nearest neighbour).

  Args:
    config: the pretraining config.
    split: the split; None: `config.data.eval_split`.
    num_images: how many at most.
    data_dir: overrides `config.data.data_dir`.

  Returns:
    (uint8 [n, S, S, 3] images, uint8 [n, S, S] masks); None when the
    dataset has no object masks (only the built-in one has).
  """
  if config.data.dataset.split("/")[0] != sources.BUILTIN_NAME:
    return None
  config = copy.deepcopy(config)
  if data_dir:
    config.data.data_dir = data_dir
  config.data.eval_split = split or config.data.get("eval_split", "test")
  # The built-in dataset's `mask`: 0 background, c + 1 for class c.
  config.data.mask_key, config.data.mask_offset = "mask", 0
  config.data.num_classes = sources.num_classes(config.data) + 1
  config.views = ml_collections.ConfigDict(dict(
      crop_size=config.eval_views.crop_size,
      resize_size=config.eval_views.resize_size))
  images, masks, seen = [], [], 0
  for batch in segmentation.make_test_iterator(
      config, batch_size=min(num_images, 256), process_index=0,
      process_count=1):
    real = batch["valid"] > 0
    images.append(batch["image"][real])
    masks.append(batch["mask"][real])
    seen += int(real.sum())
    if seen >= num_images:
      break
  return (np.concatenate(images)[:num_images],
          np.concatenate(masks)[:num_images])


def log_ratios(ratios: dict[str, dict[str, float]], num_images: int) -> None:
  """Logs the object/background ratios as a Markdown table."""
  lines = ["| backbone | " + " | ".join(STAGES) + " |",
           "|---" * (len(STAGES) + 1) + "|"]
  lines += [f"| {label} | " + " | ".join(f"{r[s]:.2f}" for s in STAGES)
            + " |" for label, r in ratios.items()]
  logging.info("Object/background attention ratio over %d images:\n%s",
               num_images, "\n".join(lines))


# ----------------------------------------------------------------------------
# Outputs.


def write_outputs(out: str, images: np.ndarray, image_labels: np.ndarray,
                  results: dict[str, dict[str, dict[str, np.ndarray]]],
                  step: int, alpha: float = 0.5) -> None:
  """Writes the PNGs, the npz and the TensorBoard images (see module doc).

  Args:
    out: the output directory (local or gs://).
    images: uint8 [N, S, S, 3].
    image_labels: [N] class labels.
    results: {run label: `compute_maps` output}, in column order.
    step: the TensorBoard step.
    alpha: the heat maps' opacity.
  """
  out_dir = epath.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  pictures = {"all": visualize.grid(
      images, {k: r["maps"] for k, r in results.items()}, alpha)}
  for label, result in results.items():
    pictures[label] = visualize.grid(images, {label: result["maps"]}, alpha)
  for name, picture in pictures.items():
    filename = "attention.png" if name == "all" else f"attention_{name}.png"
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    (out_dir / filename).write_bytes(buffer.getvalue())
  arrays = {"images": images, "image_labels": image_labels,
            "runs": np.asarray(list(results))}
  for label, result in results.items():
    for stage in result["maps"]:
      arrays[f"{label}/{stage}"] = result["maps"][stage]
      arrays[f"{label}/{stage}/raw"] = result["raw"][stage]
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  (out_dir / "attention_maps.npz").write_bytes(buffer.getvalue())
  writer = metric_writers.create_default_writer(out)
  writer.write_images(step, {f"attention/{name}": picture[None]
                             for name, picture in pictures.items()})
  writer.flush()
  writer.close()


def run(specs: Sequence[str], out: str, *, num_images: int = 8,
        split: str | None = None, data_dir: str | None = None,
        step: int | None = None, p: float = 1.0, seed: int = 0,
        alpha: float = 0.5, ratio_images: int = 500,
        config: ml_collections.ConfigDict | None = None
        ) -> dict[str, Any] | None:
  """The job: load, compute on process 0, write (see module doc).

  Args:
    specs: the `--run` values.
    out: the output directory.
    num_images: how many images (rows).
    split: the split; None: the first run's `config.data.eval_split`.
    data_dir: overrides the dataset's data dir.
    step: the checkpoint of runs without `@STEP`; None: latest.
    p: the exponent of |a|.
    seed: the random runs' initialisation seed.
    alpha: the heat maps' opacity.
    ratio_images: test images for the object/background ratios (0: none;
      datasets without masks have none).
    config: a probe config whose `data` and `eval_views` give the images
      and whose `pretrained_file` the file runs take; None: the first
      workdir run's dataset and `pretrained.FILE_DEFAULTS`.

  Returns:
    On process 0 {"images", "image_labels", "results"} as written, and
    "ratios" ({label: {stage: ratio}}) when measured; None on other
    processes.
  """
  runs = [parse_run(s) for s in specs]
  if not runs:
    raise ValueError("Give at least one --run=LABEL:WORKDIR.")
  backbones = load_backbones(
      runs, step, seed, config.get("pretrained_file") if config else None)
  config = images_config(backbones, config)
  if jax.process_index() != 0:
    return None
  images, image_labels = load_images(config, split, num_images, data_dir)
  results = {}
  for spec, backbone in zip(runs, backbones):
    logging.info("Attention maps of %r (%s).", spec.label, backbone.source)
    results[spec.label] = compute_maps(backbone, images, p)
  write_outputs(out, images, image_labels, results, backbones[0].step, alpha)
  logging.info("Wrote %d images x %d runs to %s.", len(images), len(runs),
               out)
  returned = {"images": images, "image_labels": image_labels,
              "results": results}
  masked = (load_masked_images(config, split, ratio_images, data_dir)
            if ratio_images > 0 else None)
  if masked is not None:
    ratios = {spec.label: stage_ratios(backbone, *masked, p)
              for spec, backbone in zip(runs, backbones)}
    reporting.write_json(out, RATIO_FILE, {"images": len(masked[0]),
                                           "ratios": ratios})
    log_ratios(ratios, len(masked[0]))
    returned["ratios"] = ratios
  return returned


# ----------------------------------------------------------------------------
# Command line.


def main() -> None:
  """Runs the job with the command-line flags."""
  f = flags.FLAGS
  run(f.run, f.out, num_images=f.num_images, split=f.split,
      data_dir=f.data_dir, step=f.step, p=f.p, seed=f.seed, alpha=f.alpha,
      ratio_images=f.ratio_images, config=f.config)
  cli.log_outputs(f.out)
