"""The job loop: one loop for every long-running job.

Pretraining, the linear and dense probes (and detection fine-tuning) are each
a `Job`: a state, a data stream, a jitted step and a few hooks. `run(job)`
drives any of them, and it alone knows about

- the step range and resume: a workdir with a checkpoint continues from its
  latest step, data stream included (the job's `data(start_step)`);
- SIGTERM and the TPU preemption notice: every process saves at the same
  step and returns;
- one NaN policy: each step's "loss" is checked (one step late, so the
  device is never idle waiting for it) and before every save; a non-finite
  loss stops the job with the step named, and nothing from that step on is
  saved, so the last checkpoint is the last good state;
- log windows: mean step metrics, images/s and data counters to
  TensorBoard, and one short console line per window;
- checkpoint cadence, the metric writer's lifetime and a prompt exit.

A fix here fixes every job; tests/test_loop.py pins the behaviour once, and
each job's tests check that it is wired to it.
"""

import dataclasses
import datetime
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from absl import logging
from clu import metric_writers
from etils import epath

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import preemption
from detco_jax import reporting

State = Any
Metrics = Mapping[str, Any]
Writer = metric_writers.MetricWriter


@dataclasses.dataclass(frozen=True)
class Periodic:
  """A hook run after every `every` steps (and after the last one).

  Attributes:
    every: the period in steps; 0 or less: never.
    fn: `fn(step, state, writer)`.
    at_end: also run after the job's last step.
  """
  every: int
  fn: Callable[[int, State, Writer], None]
  at_end: bool = True

  def due(self, step: int, total: int) -> bool:
    """Whether the hook runs after `step` of `total`."""
    if self.every <= 0:
      return False
    return step % self.every == 0 or (self.at_end and step == total)


@dataclasses.dataclass(frozen=True)
class Job:
  """What a job hands the loop.

  Attributes:
    name: for logs, e.g. "pretraining", "linear probe".
    workdir: checkpoints and TensorBoard events go here (local or gs://).
    init_state: `init_state(resuming) -> state`, already sharded. With
      `resuming` True it only serves as the restore target (shapes and
      shardings), so it may skip costly work such as measuring statistics.
      The state has a scalar `step` field: optimiser steps taken.
    data: `data(start_step) -> iterator` of host batches, the stream as it
      continues after `start_step` steps.
    step: `step(state, host_batch) -> (state, metrics)`; metrics hold a
      scalar "loss" (the NaN guard's) and any other scalars to log.
    total_steps: the step to train to.
    batch_size: global examples per step, for images/s.
    log_every: steps per log window (also where processes agree to stop
      when JAX's preemption sync manager is off; `detco_jax.preemption`).
    checkpoint_every: steps between checkpoints (and the last step).
    keep_checkpoints: how many checkpoints to keep.
    steps_per_epoch: when set, "epoch" is logged.
    console: metric names shown on the console line besides the loss.
    hooks: `Periodic` hooks run after steps (not after a stopping step).
    on_start: `on_start(state, start_step, writer)`, before the first step
      (e.g. writing the config); also when there is nothing left to train.
    first_batch: `first_batch(host_batch, step, writer)` on the first batch
      this run reads (e.g. a picture of the views).
    finish: `finish(state, writer) -> results` once the last step is done
      (also when it was done before this run); not after a stop.
    profile_steps: (begin, end): profiler trace of these steps (process 0).
    on_window: `on_window(step, window_means)` after each log window's
      console line, on process 0 (e.g. the collapse monitor's warnings).
  """
  name: str
  workdir: str
  init_state: Callable[[bool], State]
  data: Callable[[int], Iterator[Any]]
  step: Callable[[State, Any], tuple[State, Metrics]]
  total_steps: int
  batch_size: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int = 3
  steps_per_epoch: int | None = None
  console: Sequence[str] = ()
  hooks: Sequence[Periodic] = ()
  on_start: Callable[[State, int, Writer], None] | None = None
  first_batch: Callable[[Any, int, Writer], None] | None = None
  finish: Callable[[State, Writer], dict[str, Any]] | None = None
  profile_steps: Sequence[int] = ()
  on_window: Callable[[int, dict[str, float]], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Result:
  """How a job's run ended.

  Attributes:
    state: the final state.
    last: the last log window's scalars ({} if no step ran).
    stopped: True when SIGTERM or a preemption notice stopped the run (a
      checkpoint was saved; the same command resumes).
    results: what `finish` returned ({} when stopped or without one).
  """
  state: State
  last: dict[str, float]
  stopped: bool
  results: dict[str, Any]


def create_writer(workdir: str) -> Writer:
  """TensorBoard events from process 0, asynchronous; nothing elsewhere.

  Nothing goes to the log: the loop prints its own short line per window.
  """
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  summary = metric_writers.SummaryWriter(os.fspath(workdir))
  return metric_writers.AsyncMultiWriter([summary])


def run(job: Job) -> Result:
  """Runs or resumes `job` to its last step, then finishes it.

  Args:
    job: the job.

  Returns:
    The outcome.

  Raises:
    FloatingPointError: at the first step whose loss is not finite; nothing
      from that step on was saved.
  """
  epath.Path(job.workdir).mkdir(parents=True, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(job.workdir, keep=job.keep_checkpoints)
  writer = create_writer(job.workdir)
  stop = preemption.StopRequest()
  stop.install()
  try:
    latest = ckpt.latest_step()
    state = job.init_state(latest is not None)
    if latest is not None:
      logging.info("%s: resuming from checkpoint %d in %s.", job.name, latest,
                   ckpt.directory)
      state = ckpt.restore(state)
    start = int(state.step)
    if job.on_start is not None:
      job.on_start(state, start, writer)
    state, last, stopped = _train(job, state, start, ckpt, writer, stop)
    results = {}
    if not stopped and job.finish is not None:
      results = job.finish(state, writer)
  finally:
    stop.uninstall()
    ckpt.close()
    writer.close()
  return Result(state, last, stopped, results)


def _train(job: Job, state: State, start: int,
           ckpt: checkpoint_lib.Checkpointer, writer: Writer,
           stop: preemption.StopRequest
           ) -> tuple[State, dict[str, float], bool]:
  """Steps `start`..`total`; returns (state, last window, stopped)."""
  total = job.total_steps
  if start >= total:
    logging.info("%s: already at step %d of %d.", job.name, start, total)
    return state, {}, False
  logging.info("%s: steps %d..%d on %d devices (%d processes).", job.name,
               start, total, jax.device_count(), jax.process_count())
  data = job.data(start)
  window = _Window(job, start)
  last, previous, stopping = {}, None, False
  for step in range(start + 1, total + 1):
    _profile(job, step - 1)
    with jax.profiler.StepTraceAnnotation(job.name, step_num=step - 1):
      batch = next(data)
      if step == start + 1 and job.first_batch is not None:
        job.first_batch(batch, step - 1, writer)
      state, metrics = job.step(state, batch)
    if previous is not None:  # Done, or nearly: cheap to fetch now.
      check_finite(job, previous, step - 1, ckpt)
    previous = metrics
    window.add(metrics)
    stopping = (ckpt.reached_preemption(step) or
                stop.agreed(at_sync_point=step % job.log_every == 0))
    if step % job.log_every == 0 or step == total or stopping:
      last = window.write(step, data, writer)
    if not stopping:
      for hook in job.hooks:
        if hook.due(step, total):
          hook.fn(step, state, writer)
    if step % job.checkpoint_every == 0 or step == total or stopping:
      check_finite(job, metrics, step, ckpt)
      ckpt.save(step, state)
    if stopping:
      logging.warning("%s stopped at step %d by SIGTERM or a preemption "
                      "notice; run the same command to resume.", job.name,
                      step)
      break
  return state, last, stopping


def check_finite(job: Job, metrics: Metrics, step: int,
                 ckpt: checkpoint_lib.Checkpointer) -> None:
  """The NaN policy: stop at a non-finite loss, naming the step.

  Args:
    job: the job (its name goes in the message).
    metrics: the metrics of `step`.
    step: the step (1-based: the state after it has `step == step`).
    ckpt: the job's checkpointer, to name the last good checkpoint.

  Raises:
    FloatingPointError: when `metrics["loss"]` is NaN or infinite.
  """
  loss = float(metrics["loss"])
  if math.isfinite(loss):
    return
  ckpt.wait()
  latest = ckpt.latest_step()
  kept = (f"checkpoint {latest} is the last good state and is intact"
          if latest is not None else "no checkpoint was saved")
  raise FloatingPointError(
      f"{job.name}: loss is {loss} at step {step}; stopped before saving "
      f"it ({kept}). Lower the learning rate (or add warm-up), check the "
      "input data, then run the same command to resume.")


class _Window:
  """The metrics of one log window, and the console line."""

  def __init__(self, job: Job, start: int):
    self._job = job
    self._history: list[Metrics] = []
    self._tick = time.perf_counter()
    self._start = start

  def add(self, metrics: Metrics) -> None:
    self._history.append(metrics)

  def write(self, step: int, data: Any, writer: Writer) -> dict[str, float]:
    """Writes the window's means to TensorBoard and one line to the log."""
    job = self._job
    scalars = reporting.window_means(self._history)  # Waits for the step.
    seconds = time.perf_counter() - self._tick
    per_step = seconds / len(self._history)
    scalars["images_per_sec"] = job.batch_size / per_step
    if job.steps_per_epoch:
      scalars["epoch"] = step / job.steps_per_epoch
    if hasattr(data, "num_corrupt"):
      scalars["data/skipped_images"] = float(data.num_corrupt)
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      logging.info("%s", self._line(step, scalars, per_step))
      if job.on_window is not None:
        job.on_window(step, scalars)
    self._history, self._tick = [], time.perf_counter()
    return scalars

  def _line(self, step: int, scalars: dict[str, float],
            per_step: float) -> str:
    """e.g. 'pretraining step 40/1248 loss 38.1200 res5/gg_acc 0.410 | ...'."""
    job = self._job
    parts = [f"{job.name} step {step}/{job.total_steps}",
             f"loss {scalars['loss']:.4f}"]
    parts += [f"{k} {scalars[k]:.3f}" for k in job.console if k in scalars]
    eta = datetime.timedelta(seconds=round((job.total_steps - step)
                                           * per_step))
    return (" ".join(parts) +
            f" | {scalars['images_per_sec']:.1f} img/s, ETA {eta}")


def _profile(job: Job, step: int) -> None:
  """Starts/stops the JAX profiler at `job.profile_steps` = (begin, end)."""
  if not job.profile_steps or jax.process_index() != 0:
    return
  begin, end = job.profile_steps
  if step == begin:
    jax.profiler.start_trace(os.path.join(job.workdir, "profile"))
  elif step == end:
    jax.profiler.stop_trace()
