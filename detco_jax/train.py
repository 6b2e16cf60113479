"""Pretraining as a job: state, data and the jitted step, for the loop.

`run(config, workdir)` runs (or resumes) a DetCo pretraining run through the
shared job loop (`detco_jax.loop`): a workdir that already holds a
checkpoint resumes from its latest step, data stream included; SIGTERM saves
a checkpoint and returns; a NaN loss stops the run before anything after it
is saved.
"""

import functools

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from detco_jax import config_lib
from detco_jax import loop
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax import visualize
from detco_jax.data import augment
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.eval import knn

# The console line's accuracies: res5's three terms (MoCo v2 has gg only).
CONSOLE = ("res5/gg_acc", "res5/ll_acc", "res5/gl_acc")


def _write_config(config: ml_collections.ConfigDict, workdir: str,
                  writer: metric_writers.MetricWriter) -> None:
  """Records the config next to the run and as TensorBoard hparams."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(
        config.to_json_best_effort(indent=2))
  flat = {}
  def visit(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        visit(name + ".", value)
      else:
        flat[name] = value if isinstance(value, (int, float, str, bool)) \
            else str(value)
  visit("", config)
  writer.write_hparams(flat)


def _write_views_image(config, batch, step: int, writer) -> None:
  """Writes the first sample's four augmented views to TensorBoard once."""
  first = {k: np.asarray(v[:1]) for k, v in batch.items()}
  views = jax.jit(lambda b: augment.augment_views(
      b, jax.random.key(config.seed), config.aug, config.views))(first)
  panel = visualize.views_panel(
      views["global"][0], views["local"][0] if "local" in views else None,
      config.aug.mean, config.aug.std)
  writer.write_images(step, {"views/I_q,I_k,P_q,P_k": panel[None]})


def job(config: ml_collections.ConfigDict, workdir: str) -> loop.Job:
  """Pretraining in `workdir` as a job for `loop.run`.

  Args:
    config: the experiment config (see configs/detco.py).
    workdir: where checkpoints, TensorBoard events and the config go.

  Returns:
    The job.

  Raises:
    ValueError: on an inconsistent config (the message names the fix).
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh()
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state, shardings = step_lib.create_train_state(config, model, tx, mesh,
                                                 init_rng)
  train_step = step_lib.make_train_step(config, model, tx, schedule, mesh,
                                        shardings)
  sources.prepare_builtin(config.data)

  def step(state, host_batch):
    return train_step(state, sharding.host_to_global(host_batch, mesh),
                      step_rng)

  def on_start(state, start, writer):
    del state
    if start == 0:
      _write_config(config, workdir, writer)

  knn_every = config.knn.every_steps if "knn" in config else 0
  return loop.Job(
      name="pretraining", workdir=workdir,
      init_state=lambda resuming: state,
      data=lambda start: pipeline.make_pretrain_iterator(config,
                                                         start_step=start),
      step=step, total_steps=config_lib.total_steps(config),
      batch_size=config.batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      steps_per_epoch=config_lib.steps_per_epoch(config), console=CONSOLE,
      hooks=(loop.Periodic(knn_every, functools.partial(
          _knn_monitor, config, mesh)),),
      on_start=on_start,
      first_batch=(functools.partial(_write_views_image, config)
                   if config.write_views_image else None),
      profile_steps=tuple(config.profile_steps))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs or resumes pretraining in `workdir`.

  Args:
    config: the experiment config (see configs/detco.py).
    workdir: where checkpoints, TensorBoard events and the config go.

  Returns:
    The metrics of the last logging window (empty if no step ran).
  """
  return loop.run(job(config, workdir)).last


def _knn_monitor(config, mesh, step: int, state, writer) -> None:
  """Writes the query backbone's kNN top-1 (`knn/top1`) at `step`."""
  backbone = pretrained.from_encoder(config, state.params, state.batch_stats,
                                     step)
  results = knn.evaluate(backbone, config, mesh)
  writer.write_scalars(step, {"knn/top1": results["knn_top1"]})
  logging.info("Step %d: kNN top-1 %.4f (%s, %d train / %d test).", step,
               results["knn_top1"], config.knn.stage, results["num_train"],
               results["num_test"])
