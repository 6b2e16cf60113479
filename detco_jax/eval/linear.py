r"""The linear-probe job: frozen backbone, one linear classifier per stage.

  python -m detco_jax.eval.linear --config=configs/linear_probe.py \
      --config.pretrained=PRETRAIN_WORKDIR --workdir=DIR

It restores the query backbone of a pretraining checkpoint (or the ResNet of
a checkpoint file, `--config.pretrained=FILE.pth`: docs/checkpoints.md),
freezes it, and trains a linear classifier on the global-average-pooled map
of each stage (res2..res5, the paper's Table 12) with the MoCo protocol: SGD,
lr 30, momentum 0.9, no weight decay, step decay; RandomResizedCrop + flip
for training, resize + centre crop for test. All four heads train in one jitted
step on the same frozen features. Top-1 and top-5 per stage go to
TensorBoard, the log and `<workdir>/linear_results.json`. A workdir with a
checkpoint resumes, data stream included; SIGTERM saves and exits.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

if __name__ == "__main__":
  # The flags and the config are checked before JAX and TensorFlow load: the
  # job runs from this module imported again under its own name.
  cli.run_job(
      "detco_jax.eval.linear:run",
      config_help="Probe config, e.g. configs/linear_probe.py:demo.",
      workdir_help="Directory for the probe's checkpoints, events and "
      "linear_results.json.", report="detco_jax.eval.linear:report",
      precheck="detco_jax.config_checks:check_probe")

# pylint: disable=g-import-not-at-top,wrong-import-order
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from detco_jax import loop
from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import sharding
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.eval import features
from detco_jax.eval import probe

RESULTS_FILE = "linear_results.json"
Heads = dict[str, dict[str, jax.Array]]


def init_heads(channels: dict[str, int], stages: Sequence[str],
               num_classes: int, rng: jax.Array) -> Heads:
  """One linear layer per stage; weights N(0, 0.01), bias 0 (MoCo).

  Args:
    channels: the backbone's channels per stage.
    stages: stages that get a head.
    num_classes: output classes.
    rng: PRNG key.

  Returns:
    `{stage: {"kernel": [C, num_classes], "bias": [num_classes]}}`.
  """
  keys = jax.random.split(rng, len(stages))
  return {s: {"kernel": 0.01 * jax.random.normal(k, (channels[s],
                                                     num_classes)),
              "bias": jnp.zeros((num_classes,))}
          for s, k in zip(stages, keys)}


def head_logits(params: Heads, pooled: dict[str, jax.Array],
                stats: dict[str, dict[str, jax.Array]]
                ) -> dict[str, jax.Array]:
  """Each stage's logits from its (standardised) pooled features."""
  return {s: features.standardize(pooled[s], stats[s]) @ p["kernel"]
          + p["bias"] for s, p in params.items()}


def measure_stats(config: ml_collections.ConfigDict,
                  backbone: pretrained.Backbone, mesh: Mesh) -> probe.Stats:
  """Per-stage channel statistics of pooled features (`standardize`).

  MoCo's lr 30 suits ResNet-50 features, whose pooled values are small;
  other backbones (narrow ones, random ones) have pooled features large
  enough to make it diverge. `feature_norm="standardize"` fixes the scale
  with statistics of `stats_batches` test-transform batches of the train
  split, measured once.

  Args:
    config: the probe config.
    backbone: the frozen backbone.
    mesh: the device mesh.

  Returns:
    `{stage: {"mean": [C], "inv_std": [C]}}`.
  """
  return probe.measure_stats(backbone, mesh, probe.train_images(config),
                             config.stages, config.stats_batches, pool=True)


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and step decay at `lr_decay_epochs`.

  Weight decay is added to the gradient before momentum, as PyTorch's SGD
  does, so the protocol's numbers carry over.

  Args:
    config: the probe config.
    steps_per_epoch: optimiser steps per epoch.

  Returns:
    (tx, schedule).
  """
  boundaries = {int(round(e * steps_per_epoch)): config.lr_decay_factor
                for e in config.lr_decay_epochs}
  schedule = optax.piecewise_constant_schedule(config.lr, boundaries)
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum))
  return tx, schedule


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label's logit beats all but k - 1 others, per example.

  A logit tied with the label's counts against it: a head (or a collapsed
  backbone) that outputs equal logits for every class scores 0, not 100%.
  """
  k = min(k, logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Others at least as large as the label's (the label itself excluded).
  rivals = jnp.sum(logits >= label_logit, axis=-1) - 1
  return (rivals < k).astype(jnp.float32)


def make_train_step(backbone: pretrained.Backbone,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, state_sharding: Any):
  """The jitted probe update (the state is donated).

  Args:
    backbone: the frozen backbone.
    tx: the heads' optimiser.
    schedule: its learning-rate schedule (logged).
    mesh: the device mesh.
    state_sharding: the state's shardings (replicated).

  Returns:
    `step(state, backbone_variables, batch) -> (state, metrics)`.
  """
  def step(state, variables, batch):
    stages = tuple(state.params)
    pooled = features.pooled(features.stage_maps(backbone, variables,
                                                 batch["image"], stages))

    def loss_fn(params):
      logits = head_logits(params, pooled, state.stats)
      per_stage = {s: optax.softmax_cross_entropy_with_integer_labels(
          l, batch["label"]).mean() for s, l in logits.items()}
      return sum(per_stage.values()), (per_stage, logits)

    grads, (per_stage, logits) = jax.grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"lr": schedule(state.step), "loss": sum(per_stage.values())}
    for s in stages:
      metrics[f"{s}/loss"] = per_stage[s]
      metrics[f"{s}/train_top1"] = _topk_correct(logits[s], batch["label"],
                                                 1).mean()
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(state_sharding, rep, data),
                 out_shardings=(state_sharding, rep), donate_argnums=0)


def make_eval_step(backbone: pretrained.Backbone, mesh: Mesh):
  """The jitted test step: counts of correct top-1/top-5 and real examples.

  Args:
    backbone: the frozen backbone.
    mesh: the device mesh.

  Returns:
    `step(state, backbone_variables, batch) -> {"count", stage/top1,
    stage/top5}`, sums over the global batch (padding excluded).
  """
  def step(state, variables, batch):
    stages = tuple(state.params)
    pooled = features.pooled(features.stage_maps(backbone, variables,
                                                 batch["image"], stages))
    logits = head_logits(state.params, pooled, state.stats)
    mask = batch["mask"].astype(jnp.float32)
    sums = {"count": mask.sum()}
    for s in stages:
      for k in (1, 5):
        sums[f"{s}/top{k}"] = jnp.sum(
            _topk_correct(logits[s], batch["label"], k) * mask)
    return sums

  rep, data = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, rep, data), out_shardings=rep)


def evaluate(eval_step, state: probe.ProbeState, variables: Any,
             batches: Any, mesh: Mesh) -> dict[str, dict[str, float]]:
  """Top-1 and top-5 accuracy per stage over one pass of test batches.

  Args:
    eval_step: from `make_eval_step`.
    state: the probe (heads and feature statistics).
    variables: the frozen backbone's variables.
    batches: this process's test batches (with "mask").
    mesh: the device mesh.

  Returns:
    `{stage: {"top1": ..., "top5": ...}}` over all processes' examples.
  """
  totals = None
  for batch in batches:
    batch = {k: batch[k] for k in ("image", "label", "mask")}
    sums = eval_step(state, variables, sharding.host_to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals.pop("count")), 1.0)
  results: dict[str, dict[str, float]] = {}
  for name, value in totals.items():
    stage, metric = name.split("/")
    results.setdefault(stage, {})[metric] = float(value) / count
  return results


def _check_config(config: ml_collections.ConfigDict) -> None:
  """A bad value stops the job at once, with the fix in the message."""
  if config.feature_norm not in ("none", "standardize"):
    raise ValueError(f"Bad config: feature_norm={config.feature_norm!r} must "
                     "be 'none' (MoCo protocol) or 'standardize'.")
  probe.check_batch_sizes(config)


def job(config: ml_collections.ConfigDict, workdir: str) -> loop.Job:
  """The probe in `workdir` as a job for `loop.run`.

  Args:
    config: the probe config (see configs/linear_probe.py).
    workdir: where checkpoints, TensorBoard events and the results go.

  Returns:
    The job; its `finish` evaluates the heads and writes the results.
  """
  _check_config(config)
  mesh = sharding.make_mesh()
  sources.prepare_builtin(config.data)
  backbone = probe.backbone_for(config, mesh,
                               lambda: probe.train_images(config))
  n_train = (config.num_train_examples if config.num_train_examples > 0 else
             sources.num_examples(config.data, config.data.train_split))
  steps_per_epoch = max(n_train // config.batch_size, 1)
  num_classes = sources.num_classes(config.data)
  tx, schedule = build_optimizer(config, steps_per_epoch)
  rep = sharding.replicated(mesh)
  train_step = make_train_step(backbone, tx, schedule, mesh, rep)
  # One jitted test step for the periodic and the final evaluations.
  eval_step = make_eval_step(backbone, mesh)

  def init_state(resuming):
    # Restored on resume; measuring them again would cost a data pass.
    stats = probe.identity_stats(backbone.channels, config.stages)
    if config.feature_norm == "standardize" and not resuming:
      stats = measure_stats(config, backbone, mesh)
    return probe.create_state(
        lambda rng: init_heads(backbone.channels, config.stages, num_classes,
                               rng), tx, stats, mesh, config.seed)

  def data(start):
    return pipeline.make_eval_iterator(config, config.data.train_split,
                                       train=True,
                                       batch_size=config.batch_size,
                                       start_step=start)

  def step(state, batch):
    batch = {k: batch[k] for k in ("image", "label")}
    return train_step(state, backbone.variables,
                      sharding.host_to_global(batch, mesh))

  def test(step, state, writer):
    _write_eval(writer, step, evaluate(eval_step, state, backbone.variables,
                                       _test_batches(config), mesh))

  def finish(state, writer):
    return _final_results(config, workdir, backbone, state, mesh, eval_step,
                          steps_per_epoch, writer)

  logging.info("Linear probe of %s on %s: %d classes.", backbone.source,
               config.data.dataset, num_classes)
  last = config.stages[-1]
  return loop.Job(
      name="linear probe", workdir=workdir, init_state=init_state, data=data,
      step=step, total_steps=int(round(config.num_epochs * steps_per_epoch)),
      batch_size=config.batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      steps_per_epoch=steps_per_epoch,
      console=(f"{last}/loss", f"{last}/train_top1"),
      hooks=(loop.Periodic(config.eval_every, test, at_end=False),),
      finish=finish)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the probe in `workdir`, then evaluates it.

  Args:
    config: the probe config (see configs/linear_probe.py).
    workdir: where checkpoints, TensorBoard events and the results go.

  Returns:
    The results written to `linear_results.json`; "stages" holds top-1 and
    top-5 per stage. A run stopped by SIGTERM returns {} before evaluating.
  """
  return loop.run(job(config, workdir)).results


def _test_batches(config: ml_collections.ConfigDict):
  return pipeline.make_eval_iterator(config, config.data.eval_split,
                                     train=False,
                                     batch_size=config.batch_size)


def _write_eval(writer, step: int, results: dict[str, dict[str, float]]
                ) -> None:
  scalars = {f"{s}/test_{m}": v for s, r in results.items()
             for m, v in r.items()}
  writer.write_scalars(step, scalars)
  logging.info("Step %d test accuracy: %s", step, ", ".join(
      f"{s} top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}"
      for s, r in results.items()))


def _final_results(config, workdir, backbone, state, mesh, eval_step,
                   steps_per_epoch, writer) -> dict[str, Any]:
  """Evaluates the trained heads and writes the results file."""
  stages = evaluate(eval_step, state,
                    backbone.variables, _test_batches(config), mesh)
  step = int(state.step)
  _write_eval(writer, step, stages)
  results = dict(probe.results_header(config, backbone), steps=step,
                 epochs=step / steps_per_epoch, stages=stages)
  reporting.write_json(workdir, RESULTS_FILE, results)
  return results


def report(results: dict[str, Any]) -> None:
  """Logs each stage's accuracies on every process."""
  for stage, r in results.get("stages", {}).items():
    logging.info("Process %d: %s top-1 %.4f top-5 %.4f", jax.process_index(),
                 stage, r["top1"], r["top5"])
