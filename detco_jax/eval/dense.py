r"""Dense linear probe: per-pixel classifiers on frozen stage maps, mIoU.

  python -m detco_jax.eval.dense --config=configs/dense_probe.py:demo \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR \
      [--config.random_init=True] [--config.pretrained_step=N]

(`--config.pretrained` may also be a checkpoint file: docs/checkpoints.md.)

Each stage's map (res2..res5) of the frozen backbone is standardised per
channel with fixed statistics (measured once on training batches), and a 1x1
conv per stage predicts class logits, which are upsampled bilinearly to the
mask's resolution. The four classifiers train together, in one jitted step,
on softmax cross-entropy over labelled pixels. The test pass sums a
confusion matrix per stage over the test split (padding and ignored pixels
excluded) and reports mIoU (mean over classes with a non-empty union of
TP / (TP + FP + FN)), pixel accuracy and per-class IoU to TensorBoard, the
log and `<workdir>/dense_results.json`. With `data.foreground_background`
(`configs/dense_probe.py:demo,fgbg`) the classes are merged into background
and foreground, and the probe asks only where the objects are.

Resumable: a workdir with a checkpoint continues from it; a finished one
is only evaluated again. The workdir records which backbone it probes and
refuses another one.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

if __name__ == "__main__":
  # The flags and the config are checked before JAX and TensorFlow load: the
  # job runs from this module imported again under its own name.
  cli.run_job(
      "detco_jax.eval.dense:run",
      config_help="Dense-probe config, e.g. configs/dense_probe.py:demo.",
      workdir_help="The probe's directory (checkpoints, results).",
      report="detco_jax.eval.dense:report",
      precheck="detco_jax.config_checks:check_probe")

# pylint: disable=g-import-not-at-top,wrong-import-order
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from etils import epath

from detco_jax import config_checks
from detco_jax import loop
from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import sharding
from detco_jax.data import segmentation
from detco_jax.data import sources
from detco_jax.eval import features
from detco_jax.eval import probe

Array = jax.Array

RESULTS_FILE = "dense_results.json"
BACKBONE_FILE = "dense_backbone.json"
CONFIG_FILE = "dense_config.json"


class DenseHeads(nn.Module):
  """One 1x1 conv (a Dense on the channel axis) per stage."""
  num_classes: int
  stages: Sequence[str]

  @nn.compact
  def __call__(self, maps: dict[str, Array]) -> dict[str, Array]:
    # Zero init: every head starts at the uniform prediction, log K loss.
    return {s: nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                        name=s)(maps[s]) for s in self.stages}


# ----------------------------------------------------------------------------
# Metrics.


def confusion_matrix(labels: Array, predictions: Array, valid: Array,
                     num_classes: int) -> Array:
  """Counts of (true class, predicted class) over the valid pixels.

  Args:
    labels: int true classes, any shape; values where `valid` is False are
      ignored (they may be out of range).
    predictions: int predicted classes, the same shape.
    valid: bool, the same shape.
    num_classes: K.

  Returns:
    int32 [K, K]: rows are true classes, columns predictions.
  """
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[
      index.ravel()].add(valid.ravel().astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict[str, Any]:
  """mIoU, pixel accuracy and per-class IoU of a confusion matrix.

  Args:
    confusion: [K, K] counts, rows true, columns predicted.

  Returns:
    {"miou": mean IoU over classes whose union (TP + FP + FN) is non-empty,
    "pixel_accuracy": float, "iou": [K] floats, NaN for classes absent from
    both labels and predictions}. NaN mIoU/accuracy when nothing was counted.
  """
  confusion = np.asarray(confusion, np.float64)
  tp = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    accuracy = tp.sum() / confusion.sum()
  miou = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
  return {"miou": miou, "pixel_accuracy": float(accuracy), "iou": iou}


# ----------------------------------------------------------------------------
# The probe's forward pass and steps.


def standardize(maps: dict[str, Array], stats: Any) -> dict[str, Array]:
  """(x - mean) * inv_std per channel, for the stages in `stats`."""
  return {s: features.standardize(maps[s], st) for s, st in stats.items()}


def pixel_logits(backbone: pretrained.Backbone, variables: Any, params: Any,
                 stats: Any, images: Array, size: int,
                 num_classes: int) -> dict[str, Array]:
  """Per-stage class logits at `size`^2 (traceable).

  Args:
    backbone: the frozen backbone.
    variables: its variables.
    params: the classifiers' params.
    stats: the standardisation statistics (their keys pick the stages).
    images: uint8 [B, H, W, 3].
    size: output side (the mask's).
    num_classes: K.

  Returns:
    `{stage: float32 [B, size, size, K]}`.
  """
  stages = tuple(stats)
  maps = features.stage_maps(backbone, variables, images, stages)
  logits = DenseHeads(num_classes, stages).apply({"params": params},
                                                 standardize(maps, stats))
  # Upsampling the K logits equals (both are linear) upsampling the C
  # features before the 1x1 conv, at K/C of the cost.
  return {s: jax.image.resize(l, (l.shape[0], size, size, num_classes),
                              "bilinear") for s, l in logits.items()}


def pixel_loss(logits: Array, mask: Array,
               num_classes: int) -> tuple[Array, Array, Array]:
  """Cross-entropy sum, labelled-pixel count and correct count.

  Args:
    logits: [B, S, S, K].
    mask: int [B, S, S]; values outside [0, K) are not counted.
    num_classes: K.

  Returns:
    (sum of cross-entropies, number of labelled pixels, number right).
  """
  valid = mask < num_classes
  labels = jnp.where(valid, mask, 0).astype(jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  right = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(ce * valid), jnp.sum(valid), jnp.sum(right)


def make_train_step(backbone: pretrained.Backbone,
                    tx: optax.GradientTransformation, num_classes: int,
                    size: int, mesh: jax.sharding.Mesh):
  """The jitted step `(state, variables, batch) -> (state, metrics)`.

  Only the classifiers are differentiated; the backbone's variables are an
  input, never an output, and are not donated.

  Args:
    backbone: the frozen backbone.
    tx: the classifiers' optimiser.
    num_classes: K.
    size: mask side.
    mesh: the mesh (state replicated, batch split over `data`).

  Returns:
    The step; metrics are `{stage/loss, stage/pixel_accuracy}` and `loss`
    (the sum over stages, which is what is minimised).
  """

  def loss_fn(params, stats, variables, batch):
    logits = pixel_logits(backbone, variables, params, stats, batch["image"],
                          size, num_classes)
    metrics = {}
    for s, l in logits.items():
      ce, count, right = pixel_loss(l, batch["mask"], num_classes)
      count = jnp.maximum(count, 1)
      metrics[f"{s}/loss"] = ce / count
      metrics[f"{s}/pixel_accuracy"] = right / count
    loss = sum(metrics[f"{s}/loss"] for s in logits)
    return loss, dict(metrics, loss=loss)

  def step(state, variables, batch):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state.params, state.stats, variables, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, rep, data),
                 out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(backbone: pretrained.Backbone, num_classes: int, size: int,
                   mesh: jax.sharding.Mesh):
  """The jitted `(state, variables, batch) -> {stage: int32 [K, K]}`.

  The confusion matrices are of the whole global batch (summed over
  devices), counting pixels of valid examples with a label in [0, K); the
  batch also gets "examples", the number of valid examples.
  """

  def step(state, variables, batch):
    logits = pixel_logits(backbone, variables, state.params, state.stats,
                          batch["image"], size, num_classes)
    mask = batch["mask"].astype(jnp.int32)
    valid = (mask < num_classes) & (batch["valid"][:, None, None] > 0)
    out = {s: confusion_matrix(mask, jnp.argmax(l, -1), valid, num_classes)
           for s, l in logits.items()}
    out["examples"] = jnp.sum(batch["valid"])
    return out

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, rep, data), out_shardings=rep)


# ----------------------------------------------------------------------------
# State: standardisation statistics, init, restore.


def measure_stats(config: ml_collections.ConfigDict,
                  backbone: pretrained.Backbone,
                  mesh: jax.sharding.Mesh) -> dict[str, dict[str, Array]]:
  """Per-channel mean and inverse std of each stage on training batches.

  Args:
    config: the dense-probe config (`stats_batches` batches of its training
      stream, from its start).
    backbone: the frozen backbone.
    mesh: the mesh.

  Returns:
    `{stage: {"mean": [C], "inv_std": [C]}}`, replicated.
  """
  # The small eps of the variance keeps dead (all-zero) ReLU channels from
  # dividing by zero.
  batches = segmentation.make_train_iterator(config)
  return probe.measure_stats(backbone, mesh, (b["image"] for b in batches),
                             config.stages, config.stats_batches, pool=False)


def init_state(stats: Any, channels: dict[str, int], num_classes: int,
               tx: optax.GradientTransformation) -> probe.ProbeState:
  """A fresh probe state (traceable: also used for its abstract shape).

  Args:
    stats: the standardisation statistics (their keys pick the stages).
    channels: channels of each stage's map.
    num_classes: K.
    tx: the optimiser.

  Returns:
    The state at step 0.
  """
  stages = tuple(stats)
  dummy = {s: jnp.zeros((1, 1, 1, channels[s])) for s in stages}
  params = DenseHeads(num_classes, stages).init(jax.random.key(0),
                                                dummy)["params"]
  return probe.ProbeState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), stats=stats)


# ----------------------------------------------------------------------------
# The job.


def total_steps(config: ml_collections.ConfigDict) -> int:
  """`total_steps` if > 0, else `num_epochs` passes over the training split."""
  if config.total_steps > 0:
    return int(config.total_steps)
  n = sources.num_examples(config.data, config.data.train_split)
  return max(1, int(config.num_epochs * n) // config.batch_size)


def make_optimizer(config: ml_collections.ConfigDict,
                   total: int) -> optax.GradientTransformation:
  """Adam, learning rate cosine-decayed to 0 over `total` steps."""
  return optax.adam(optax.cosine_decay_schedule(config.lr, total))


def _check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Rejects sizes the mesh cannot split and a probe inside its pretraining."""
  probe.check_batch_sizes(config, ("batch_size", "eval_batch_size"))
  if len(config.data.class_names) != config.data.num_classes:
    raise ValueError("config.data.class_names must name the "
                     f"{config.data.num_classes} classes of num_classes.")
  config_checks.check_probe(config, workdir)


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def _record_backbone(workdir: str, backbone: pretrained.Backbone,
                     config: ml_collections.ConfigDict) -> None:
  """Writes which backbone the workdir probes, or checks it is the same."""
  record = {"pretrained": _abs(config.pretrained), "step": backbone.step,
            "random_init": bool(config.random_init)}
  path = epath.Path(workdir) / BACKBONE_FILE
  if path.exists():
    previous = json.loads(path.read_text())
    if previous != record:
      raise ValueError(
          f"{workdir} holds a dense probe of {previous}, not of {record}: "
          "use another --workdir (or set --config.pretrained_step to the "
          "step probed there).")
  elif jax.process_index() == 0:
    path.write_text(json.dumps(record, indent=2))
    (epath.Path(workdir) / CONFIG_FILE).write_text(
        config.to_json_best_effort(indent=2))


def job(config: ml_collections.ConfigDict, workdir: str) -> loop.Job:
  """The dense probe in `workdir` as a job for `loop.run`.

  Args:
    config: the dense-probe config (configs/dense_probe.py).
    workdir: the probe's directory: checkpoints, TensorBoard events, results.

  Returns:
    The job; its `finish` tests the classifiers and writes the results.

  Raises:
    ValueError: on a bad config, or a workdir that probes another backbone.
  """
  _check_config(config, workdir)
  mesh = sharding.make_mesh()
  sources.prepare_builtin(config.data)
  # Before anything is written: a missing dataset leaves no workdir behind.
  sources.check_available(config.data, config.data.train_split)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  backbone = probe.backbone_for(
      config, mesh,
      lambda: (b["image"] for b in segmentation.make_train_iterator(config)))
  _record_backbone(workdir, backbone, config)
  total = total_steps(config)
  tx = make_optimizer(config, total)
  size = config.views.crop_size
  k, _ = segmentation.probe_classes(config.data)
  train_step = make_train_step(backbone, tx, k, size, mesh)

  def init_state_for(resuming):
    # On resume the statistics are restored: only their shapes matter.
    stats = (probe.identity_stats(backbone.channels, config.stages)
             if resuming else measure_stats(config, backbone, mesh))
    return jax.device_put(init_state(stats, backbone.channels, k, tx),
                          sharding.replicated(mesh))

  def step(state, batch):
    return train_step(state, backbone.variables,
                      sharding.host_to_global(batch, mesh))

  started = {}  # The step this run started from, for the results.

  def on_start(state, start, writer):
    del state, writer
    started["step"] = start

  def finish(state, writer):
    results = _test(config, backbone, state, mesh)
    results.update(start_step=started["step"], steps_trained=int(state.step))
    _report(results, writer, workdir)
    return results

  logging.info("Dense probe of %s on %s.", backbone.source,
               config.data.dataset)
  last = config.stages[-1]
  return loop.Job(
      name="dense probe", workdir=workdir, init_state=init_state_for,
      data=lambda start: segmentation.make_train_iterator(config,
                                                          start_step=start),
      step=step, total_steps=total, batch_size=config.batch_size,
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      console=(f"{last}/loss", f"{last}/pixel_accuracy"), on_start=on_start,
      finish=finish)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or skips if finished) the probe, then tests it.

  Args:
    config: the dense-probe config (configs/dense_probe.py).
    workdir: the probe's directory: checkpoints, TensorBoard events, results.

  Returns:
    The results, as written to `<workdir>/dense_results.json`; {} when a
    SIGTERM stopped the training (rerun the same command to resume).
  """
  return loop.run(job(config, workdir)).results


def _test(config, backbone, state, mesh) -> dict[str, Any]:
  """Confusion matrices over the test split -> per-stage results."""
  (k, names), size = (segmentation.probe_classes(config.data),
                      config.views.crop_size)
  logging.info("Dense probe: testing on %s split %s.", config.data.dataset,
               config.data.eval_split)
  eval_step = make_eval_step(backbone, k, size, mesh)
  data = segmentation.make_test_iterator(config,
                                         batch_size=config.eval_batch_size)
  # Kept on the device until the end: no host sync per batch.
  outs = [eval_step(state, backbone.variables,
                    sharding.host_to_global(batch, mesh)) for batch in data]
  outs = jax.device_get(outs)
  stages = {}
  for s in config.stages:
    confusion = np.sum([np.asarray(o[s], np.int64) for o in outs], axis=0)
    m = segmentation_metrics(confusion)
    stages[s] = {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
                 "iou": {n: (None if np.isnan(v) else float(v))
                         for n, v in zip(names, m["iou"])}}
  return {**probe.results_header(config, backbone),
          "eval_examples": int(sum(int(o["examples"]) for o in outs)),
          "num_classes": k, "crop_size": size, "stages": stages}


def _report(results: dict[str, Any], writer: metric_writers.MetricWriter,
            workdir: str) -> None:
  """Writes the results to TensorBoard, the log and the JSON file."""
  scalars = {}
  for s, r in results["stages"].items():
    scalars[f"dense/{s}/miou"] = r["miou"]
    scalars[f"dense/{s}/pixel_accuracy"] = r["pixel_accuracy"]
    scalars.update({f"dense/{s}/iou/{n}": v for n, v in r["iou"].items()
                    if v is not None})
    logging.info("Dense probe %s: mIoU %.4f, pixel accuracy %.4f.", s,
                 r["miou"], r["pixel_accuracy"])
  writer.write_scalars(results["steps_trained"], scalars)
  reporting.write_json(workdir, RESULTS_FILE, results)


# ----------------------------------------------------------------------------
# Command line.


def report(results: dict[str, Any]) -> None:
  """Logs each stage's mIoU on every process."""
  for stage, r in results.get("stages", {}).items():
    logging.info("Process %d: %s mIoU %.4f", jax.process_index(), stage,
                 r["miou"])
