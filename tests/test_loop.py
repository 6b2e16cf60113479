"""The shared job loop (detco_jax/loop.py) on a toy job.

The toy state is a running sum: each step adds its batch, so any lost,
repeated or reordered batch, or a wrong restore, shows in the final state.
"""

import dataclasses
import logging as py_logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax import loop
from detco_jax import sharding
from tests import jobcheck


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  total: jax.Array


def toy_batches(start: int):
  """Batch i is [i, i^2 / 7, ...]: a stream that can resume at any step."""
  i = start
  while True:
    yield np.array([i, i * i / 7, np.sin(i)], np.float32)
    i += 1


def toy_job(workdir: str, total_steps: int = 10, **overrides) -> loop.Job:
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)

  @jax.jit
  def step(state, batch):
    total = state.total * 0.9 + batch
    return (state.replace(step=state.step + 1, total=total),
            {"loss": jnp.sum(total), "acc": jnp.mean(batch)})

  def init_state(resuming):
    del resuming
    return jax.device_put(ToyState(jnp.zeros((), jnp.int32),
                                   jnp.zeros((3,), jnp.float32)), rep)

  settings = dict(name="toy", workdir=workdir, init_state=init_state,
                  data=toy_batches, step=step, total_steps=total_steps,
                  batch_size=4, log_every=2, checkpoint_every=4,
                  steps_per_epoch=5, console=("acc",))
  settings.update(overrides)
  return loop.Job(**settings)


def expected_total(steps: int) -> np.ndarray:
  total = np.zeros(3, np.float32)
  for batch in zip(range(steps), toy_batches(0)):
    total = total * np.float32(0.9) + batch[1]
  return total


def test_runs_to_the_end_saves_on_cadence_and_logs_windows(tmp_path):
  workdir = str(tmp_path / "toy")
  finished = []
  job = toy_job(workdir, finish=lambda state, w: finished.append(1) or {"ok": 1})
  result = loop.run(job)
  np.testing.assert_allclose(result.state.total, expected_total(10),
                             rtol=1e-6)
  assert int(result.state.step) == 10 and result.results == {"ok": 1}
  assert jobcheck.saved_steps(workdir) == [4, 8, 10]
  # The last window (steps 9 and 10) averaged: loss and images/s, epochs.
  assert result.last["epoch"] == 2.0 and result.last["images_per_sec"] > 0
  # A finished workdir does not train again but finishes again.
  again = loop.run(job)
  assert not again.stopped and again.last == {} and finished == [1, 1]
  jobcheck.assert_same_state(again.state, result.state)


def test_sigterm_and_nan_then_resume_equal_an_uninterrupted_run(tmp_path):
  straight = jobcheck.check_stop_and_nan_resume(
      toy_job, tmp_path, stop_k=2, nan_k=6)
  np.testing.assert_allclose(straight.state.total, expected_total(10),
                             rtol=1e-6)


def test_nan_at_a_checkpoint_step_is_never_saved(tmp_path):
  workdir = str(tmp_path / "nan")
  job = toy_job(workdir)
  with pytest.raises(FloatingPointError,
                     match="at step 8; .*checkpoint 4 is the last good"):
    loop.run(dataclasses.replace(job, step=jobcheck.nan_at(job.step, 8)))
  assert jobcheck.saved_steps(workdir) == [4]


def test_periodic_hooks_and_the_first_batch(tmp_path):
  seen, first = [], []
  job = toy_job(
      str(tmp_path / "hooks"), total_steps=7,
      hooks=(loop.Periodic(3, lambda s, st, w: seen.append(("end", s))),
             loop.Periodic(3, lambda s, st, w: seen.append(("mid", s)),
                           at_end=False),
             loop.Periodic(0, lambda s, st, w: seen.append(("never", s)))),
      first_batch=lambda batch, step, w: first.append((step, batch[0])))
  loop.run(job)
  assert sorted(seen) == [("end", 3), ("end", 6), ("end", 7), ("mid", 3),
                          ("mid", 6)]
  assert first == [(0, 0.0)]


def test_one_short_console_line_per_window(tmp_path, caplog):
  caplog.set_level(py_logging.INFO)
  loop.run(toy_job(str(tmp_path / "console"), total_steps=4))
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("toy step")]
  assert len(lines) == 2  # Windows end at steps 2 and 4.
  assert lines[0].startswith("toy step 2/4 loss ")
  assert " acc " in lines[0] and "img/s, ETA" in lines[0]


def test_on_window_sees_each_window_after_its_console_line(tmp_path, caplog):
  caplog.set_level(py_logging.INFO)
  seen = []
  def on_window(step, scalars):
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(f"toy step {step}/")]
    seen.append((step, scalars["acc"], len(lines)))
  loop.run(toy_job(str(tmp_path / "window"), total_steps=4,
                   on_window=on_window))
  # Windows of steps 1-2 and 3-4: batch means of [i, i^2/7, sin i].
  acc = lambda i: np.mean([i, i * i / 7, np.sin(i)])
  assert [(s, n) for s, _, n in seen] == [(2, 1), (4, 1)]
  np.testing.assert_allclose([a for _, a, _ in seen],
                             [(acc(0) + acc(1)) / 2, (acc(2) + acc(3)) / 2],
                             rtol=1e-5)
