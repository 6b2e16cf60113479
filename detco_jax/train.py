"""Pretraining as a job: state, data and the jitted step, for the loop.

The method (`config.method`: DetCo by default, or a classic pretext task;
`detco_jax.methods`) supplies the host views, the state and the step; this
module hands them to the loop and never branches on the method.
`run(config, workdir)` runs (or resumes) a pretraining run through the
shared job loop (`detco_jax.loop`): a workdir that already holds a
checkpoint resumes from its latest step, data stream included; SIGTERM saves
a checkpoint and returns; a NaN loss stops the run before anything after it
is saved.
"""

import functools

import jax
import ml_collections
from absl import logging
from clu import metric_writers
from etils import epath

from detco_jax import config_lib
from detco_jax import loop
from detco_jax import methods
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.eval import knn


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


def _write_views_image(config, method, batch, step: int, writer) -> None:
  """Writes the first sample's augmented views to TensorBoard once."""
  panel = method.views_panel(config, batch)
  writer.write_images(step, {f"views/{method.name}": panel[None]})


def job(config: ml_collections.ConfigDict, workdir: str) -> loop.Job:
  """Pretraining in `workdir` as a job for `loop.run`.

  Args:
    config: the experiment config (see configs/detco.py; `method` picks
      the method).
    workdir: where checkpoints, TensorBoard events and the config go.

  Returns:
    The job.

  Raises:
    ValueError: on an inconsistent config (the message names the fix).
  """
  method = methods.get(config)
  method.validate(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh()
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state, train_step = method.build(config, mesh, init_rng)
  sources.prepare_builtin(config.data)
  # Before the loop makes the workdir: a missing dataset writes nothing.
  sources.check_available(config.data, config.data.train_split)
  example_views = method.example_views(config)

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
      data=lambda start: pipeline.make_pretrain_iterator(
          config, start_step=start, example_views=example_views),
      step=step, total_steps=config_lib.total_steps(config),
      batch_size=config.batch_size, log_every=config.log_every,
      checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints,
      steps_per_epoch=config_lib.steps_per_epoch(config),
      console=method.console,
      hooks=(loop.Periodic(knn_every, functools.partial(
          _knn_monitor, config, mesh)),),
      on_start=on_start,
      first_batch=(functools.partial(_write_views_image, config, method)
                   if config.write_views_image else None),
      profile_steps=tuple(config.profile_steps),
      on_window=method.watch(config) if method.watch else None)


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
