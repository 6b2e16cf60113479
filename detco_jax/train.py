"""The pretraining loop: state, data, the jitted step, checkpoints, metrics.

`train_and_evaluate(config, workdir)` runs (or resumes) a DetCo pretraining
run. A workdir that already holds a checkpoint resumes from its latest step,
data stream included. SIGTERM (sent by preemptible TPU VMs and SLURM) saves a
checkpoint and returns cleanly; a NaN loss stops the run before anything
after it is saved.
"""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import config_lib
from detco_jax import preemption
from detco_jax import pretrained
from detco_jax import reporting
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax import visualize
from detco_jax.data import augment
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


def _write_views_image(config, batch, writer, step: int) -> None:
  """Writes the first sample's four augmented views to TensorBoard once."""
  first = {k: np.asarray(v[:1]) for k, v in batch.items()}
  views = jax.jit(lambda b: augment.augment_views(
      b, jax.random.key(config.seed), config.aug, config.views))(first)
  panel = visualize.views_panel(
      views["global"][0], views["local"][0] if "local" in views else None,
      config.aug.mean, config.aug.std)
  writer.write_images(step, {"views/I_q,I_k,P_q,P_k": panel[None]})


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Runs or resumes pretraining in `workdir`.

  Args:
    config: the experiment config (see configs/detco.py).
    workdir: where checkpoints, TensorBoard events and the config go.

  Returns:
    The metrics of the last logging window (empty if no step ran).
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
  mesh = sharding.make_mesh()
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  state, shardings = step_lib.create_train_state(config, model, tx, mesh,
                                                 init_rng)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  if ckpt.latest_step() is not None:
    logging.info("Resuming from checkpoint %d in %s.", ckpt.latest_step(),
                 ckpt.directory)
    state = ckpt.restore(state)
  start, total = int(state.step), config_lib.total_steps(config)
  train_step = step_lib.make_train_step(config, model, tx, schedule, mesh,
                                        shardings)
  sources.prepare_builtin(config.data)
  data = pipeline.make_pretrain_iterator(config, start_step=start)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)
  if start == 0:
    _write_config(config, workdir, writer)
  report = periodic_actions.ReportProgress(num_train_steps=total,
                                           writer=writer)
  stop = preemption.StopRequest()
  stop.install()
  history, last, window_start = [], {}, time.perf_counter()
  previous = None  # The last step's metrics, checked after the next dispatch.
  steps_per_epoch = config_lib.steps_per_epoch(config)
  logging.info("Training steps %d..%d on %d devices (%d processes), "
               "%d steps per epoch.", start, total, jax.device_count(),
               jax.process_count(), steps_per_epoch)
  try:
    step = start
    while step < total:
      _profile(config, workdir, step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with report.timed("data", wait_jax_async_dispatch=False):
          host_batch = next(data)
        if step == start and config.write_views_image:
          _write_views_image(config, host_batch, writer, step)
        batch = sharding.host_to_global(host_batch, mesh)
        state, metrics = train_step(state, batch, step_rng)
      if previous is not None:  # Done or nearly done: cheap to fetch.
        step_lib.check_finite(float(previous["loss"]), step - 1)
      previous = metrics
      history.append(metrics)
      step += 1
      report(step)
      stopping = (ckpt.reached_preemption(step) or
                  stop.agreed(at_sync_point=step % config.log_every == 0))
      if step % config.log_every == 0 or step == total or stopping:
        last = _log(history, step, steps_per_epoch, window_start, config,
                    data, writer)
        history, window_start = [], time.perf_counter()
      if _knn_due(config, step, total) and not stopping:
        _knn_monitor(config, state, step, mesh, writer)
      if step % config.checkpoint_every == 0 or step == total or stopping:
        step_lib.check_finite(float(metrics["loss"]), step - 1)
        with report.timed("checkpoint"):
          ckpt.save(step, state)
      if stopping:
        logging.warning("Stopped at step %d after a SIGTERM or preemption "
                        "notice; resume by running the same command.", step)
        break
  finally:
    stop.uninstall()
    ckpt.close()
    writer.flush()
    writer.close()
  return last


def _log(history, step, steps_per_epoch, window_start, config, data,
         writer) -> dict[str, float]:
  """Writes the window's mean metrics, throughput and data counters."""
  scalars = reporting.window_means(history)
  seconds = time.perf_counter() - window_start
  scalars["images_per_sec"] = len(history) * config.batch_size / seconds
  scalars["epoch"] = step / steps_per_epoch
  scalars["data/skipped_images"] = float(data.num_corrupt)
  writer.write_scalars(step, scalars)
  return scalars


def _knn_due(config, step: int, total: int) -> bool:
  """Whether the kNN monitor runs after `step` (every N steps and at the end)."""
  every = config.knn.every_steps if "knn" in config else 0
  return every > 0 and (step % every == 0 or step == total)


def _knn_monitor(config, state, step: int, mesh, writer) -> None:
  """Writes the query backbone's kNN top-1 (`knn/top1`) at `step`."""
  backbone = pretrained.from_encoder(config, state.params, state.batch_stats,
                                     step)
  results = knn.evaluate(backbone, config, mesh)
  writer.write_scalars(step, {"knn/top1": results["knn_top1"]})
  logging.info("Step %d: kNN top-1 %.4f (%s, %d train / %d test).", step,
               results["knn_top1"], config.knn.stage, results["num_train"],
               results["num_test"])


def _profile(config, workdir: str, step: int) -> None:
  """Starts/stops the JAX profiler at `config.profile_steps` = (start, end)."""
  if not config.profile_steps or jax.process_index() != 0:
    return
  begin, end = config.profile_steps
  if step == begin:
    jax.profiler.start_trace(os.path.join(workdir, "profile"))
  elif step == end:
    jax.profiler.stop_trace()
