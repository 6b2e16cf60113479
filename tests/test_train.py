"""The real pretraining loop on the built-in dataset with a tiny model."""

import json
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import detco as detco_config
from detco_jax import checkpoint as checkpoint_lib
from detco_jax import loop
from detco_jax import train
from tests import jobcheck


@pytest.fixture
def config(builtin_data_dir):
  c = detco_config.get_config("tiny")
  c.data.data_dir = builtin_data_dir
  return c


def restore_params(config, workdir):
  """The query params of the latest checkpoint in `workdir`."""
  state = jobcheck.restore_train_state(config, workdir)
  return int(state.step), jax.device_get(state.params)


def test_tiny_run_writes_checkpoints_events_and_config(config, tmp_path):
  workdir = str(tmp_path / "run")
  last = train.run(config, workdir)
  assert np.isfinite(last["loss"]) and last["images_per_sec"] > 0
  assert last["data/skipped_images"] == 0
  ckpt = checkpoint_lib.Checkpointer(workdir)
  assert ckpt.all_steps() == [3, 6]
  ckpt.close()
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["depth"] == 10
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.SCALARS: 0,
                              event_accumulator.IMAGES: 0,
                              event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()
  names = set(tags["scalars"]) | set(tags["tensors"])
  # The collapse monitor: every head's std and every term's margins.
  for name in ("loss", "res2/gl_acc", "res5/gg", "lr", "images_per_sec",
               "epoch", "res2/global_std", "res5/local_std",
               "res3/ll_margin", "res5/gl_mean_margin"):
    assert name in names, name
  steps = [e.step for e in (events.Scalars("loss") if "loss" in tags["scalars"]
                            else events.Tensors("loss"))]
  assert steps == [2, 4, 6]
  assert any("views" in t for t in tags["images"] + tags["tensors"])


@pytest.mark.long
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(config,
                                                                tmp_path):
  """Stopped before step 5 (saved at 4), or NaN at step 5 (resumed from 3)."""
  config.write_views_image = False
  jobcheck.check_stop_and_nan_resume(
      lambda workdir: train.job(config, workdir), tmp_path, stop_k=3,
      nan_k=5)


@pytest.mark.long
def test_lars_first_step_moves_each_kernel_by_its_trust_ratio(config,
                                                             tmp_path):
  """LARS (launch/README.md's large-batch optimiser) is what trains.

  Its first step, from a zero momentum, moves every weight matrix by
  lr x 0.001 (the trust coefficient) x its own norm, whatever the gradient's
  scale: a property of LARS alone, checked on the real job's step.
  """
  config.optimizer = "lars"
  config.warmup_epochs = 0.0  # The first step at the peak rate.
  config.total_steps = 1
  config.write_views_image = False
  before = jax.device_get(
      train.job(config, str(tmp_path / "init")).init_state(False).params)
  after = jax.device_get(loop.run(train.job(config, str(tmp_path / "run")))
                         .state.params)
  lr = config.base_lr * config.batch_size / config.lr_base_batch
  kernels = 0
  for w0, w1 in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    assert np.all(np.isfinite(w1))
    if w0.ndim > 1:
      kernels += 1
      moved = np.linalg.norm(w1 - w0) / np.linalg.norm(w0)
      np.testing.assert_allclose(moved, lr * 1e-3, rtol=0.02)
  assert kernels > 10


@pytest.mark.long
def test_lars_run_resumes_exactly(config, tmp_path):
  """LARS's state (its momentum) is saved and restored like SGD's."""
  config.optimizer = "lars"
  config.write_views_image = False
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: train.job(config, workdir), tmp_path, stop_k=3,
      nan_k=5)
  assert np.isfinite(straight.last["loss"])


@pytest.mark.long
def test_half_written_checkpoint_is_never_picked_up(config, tmp_path):
  workdir = str(tmp_path / "run")
  config.total_steps = 3
  train.run(config, workdir)
  directory = os.path.join(workdir, "checkpoints")
  # What an interrupted orbax save leaves: a temporary step directory.
  partial = os.path.join(directory, "5.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  open(os.path.join(partial, "state", "junk"), "w").write("half")
  ckpt = checkpoint_lib.Checkpointer(workdir)
  assert ckpt.latest_step() == 3
  ckpt.close()
  config.total_steps = 6
  last = train.run(config, workdir)
  assert np.isfinite(last["loss"])
  assert restore_params(config, workdir)[0] == 6


@pytest.mark.long
def test_diverging_run_stops_with_the_step_and_saves_nothing_after(
    config, tmp_path):
  config.base_lr = 1e30
  config.checkpoint_every = 1
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"at step \d+"):
    train.run(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  saved = ckpt.all_steps()
  ckpt.close()
  if saved:  # Whatever was saved before the NaN is a usable checkpoint.
    _, params = restore_params(config, workdir)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 12, "multiple of the 8 devices"),
    ("bn_groups", 3, "multiple of bn_groups=3"),
    ("queue_size", 100, "queue_size=100 must be a positive multiple"),
    ("views.patch_size", 20, "views.patch_size=20 exceeds its grid cell"),
    ("bn", "ghost", "bn='ghost'"),
])
def test_bad_config_values_stop_the_run_with_the_key(config, tmp_path, key,
                                                     value, message):
  node = config
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path / "bad"))


def test_unknown_dataset_says_how_to_fix(config, tmp_path):
  config.data.dataset = "no_such_dataset_xyz"
  with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
    train.run(config, str(tmp_path / "bad"))
