"""Checks every job must pass: SIGTERM or a NaN mid-run, then resume, equals
an uninterrupted run (tests of the loop and of each job use them)."""

import dataclasses
import os
import signal
from typing import Any, Callable

import jax
import numpy as np
import pytest

from detco_jax import checkpoint as checkpoint_lib
from detco_jax import loop
from detco_jax import methods
from detco_jax import sharding


def sigterm_at(data: Callable[[int], Any], k: int) -> Callable[[int], Any]:
  """`data` whose iterator sends this process SIGTERM before batch k."""

  def wrapped(start):
    inner = data(start)

    class Iterator:
      num_corrupt = property(lambda self: getattr(inner, "num_corrupt", 0))
      n = 0

      def __iter__(self):
        return self

      def __next__(self):
        if self.n == k:
          os.kill(os.getpid(), signal.SIGTERM)
        self.n += 1
        return next(inner)

    return Iterator()
  return wrapped


def nan_at(step: Callable[..., Any], k: int) -> Callable[..., Any]:
  """`step` whose loss is NaN at step k (1-based) of the job."""

  def wrapped(state, batch):
    number = int(state.step) + 1
    state, metrics = step(state, batch)
    if number == k:
      metrics = dict(metrics, loss=metrics["loss"] * float("nan"))
    return state, metrics
  return wrapped


def saved_steps(workdir: str) -> list[int]:
  ckpt = checkpoint_lib.Checkpointer(workdir)
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def restore_train_state(config: Any, workdir: str,
                        step: int | None = None) -> Any:
  """The whole train state of a pretraining checkpoint, of any method.

  Args:
    config: the pretraining run's config (it fixes the state's shapes).
    workdir: the run's directory.
    step: which checkpoint; None for the latest.

  Returns:
    The state, on this process's mesh.
  """
  target, _ = methods.get(config).build(config, sharding.make_mesh(),
                                        jax.random.key(0))
  ckpt = checkpoint_lib.Checkpointer(workdir)
  try:
    return ckpt.restore(target, step)
  finally:
    ckpt.close()


def check_probes_read_the_run(config: Any, workdir: str, data_dir: str,
                              probe_workdir: str) -> dict[str, Any]:
  """A finished pretraining's backbone, as the probes load it, is its train
  state's; and the tiny linear probe runs on it.

  Args:
    config: the pretraining run's config.
    workdir: the finished run's directory.
    data_dir: the built-in dataset's TFDS data dir.
    probe_workdir: where the linear probe runs.

  Returns:
    The linear probe's results.
  """
  from configs import linear_probe  # pylint: disable=g-import-not-at-top
  from detco_jax import pretrained  # pylint: disable=g-import-not-at-top
  from detco_jax.eval import linear  # pylint: disable=g-import-not-at-top
  state = restore_train_state(config, workdir)
  backbone = pretrained.load(workdir)
  assert backbone.step == config.total_steps
  for got, want in zip(jax.tree.leaves(backbone.variables["params"]),
                       jax.tree.leaves(state.params["backbone"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  probe_config = linear_probe.get_config("tiny")
  probe_config.pretrained = workdir
  probe_config.data.data_dir = data_dir
  results = linear.run(probe_config, probe_workdir)
  assert results["pretrained_step"] == config.total_steps
  assert all(0 <= r["top1"] <= 1 for r in results["stages"].values())
  return results


def assert_same_state(a: Any, b: Any) -> None:
  """Bit for bit: a resumed run replays the same programs on the same data."""
  a, b = jax.device_get(a), jax.device_get(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def check_stop_and_nan_resume(make_job: Callable[[str], loop.Job],
                              tmp_path: Any, stop_k: int,
                              nan_k: int) -> loop.Result:
  """SIGTERM before batch stop_k, and a NaN at step nan_k, each resumed.

  Args:
    make_job: `make_job(workdir) -> job`, a fresh job for a workdir.
    tmp_path: a temporary directory.
    stop_k: SIGTERM arrives while batch stop_k + 1 is read (the job saves
      after that step); below the job's last step - 1.
    nan_k: the step whose loss is NaN; at most the job's last step.

  Returns:
    The uninterrupted run's result.
  """
  straight = loop.run(make_job(str(tmp_path / "straight")))
  assert not straight.stopped

  workdir = str(tmp_path / "sigterm")
  job = make_job(workdir)
  stopped = loop.run(dataclasses.replace(job,
                                         data=sigterm_at(job.data, stop_k)))
  # Saved at the step boundary after the signal, and nothing finished.
  assert stopped.stopped and stopped.results == {}
  assert saved_steps(workdir)[-1] == stop_k + 1
  resumed = loop.run(make_job(workdir))
  assert not resumed.stopped
  assert_same_state(resumed.state, straight.state)
  assert resumed.last["loss"] == straight.last["loss"]

  workdir = str(tmp_path / "nan")
  job = make_job(workdir)
  with pytest.raises(FloatingPointError, match=rf"at step {nan_k};"):
    loop.run(dataclasses.replace(job, step=nan_at(job.step, nan_k)))
  # Nothing from the NaN's step on was saved.
  assert all(s < nan_k for s in saved_steps(workdir))
  resumed = loop.run(make_job(workdir))
  assert_same_state(resumed.state, straight.state)
  return straight
