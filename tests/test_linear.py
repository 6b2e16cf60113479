"""The linear-probe job: restore, train, evaluate, resume, fail clearly."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import linear_probe
from detco_jax import checkpoint as checkpoint_lib
from detco_jax import config_lib
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax.data import augment
from detco_jax.data import pipeline
from detco_jax.eval import features
from detco_jax.eval import linear
from detco_jax.eval import probe
from tests import jobcheck


@pytest.fixture
def config(tiny_pretrain_workdir, builtin_data_dir):
  c = linear_probe.get_config("tiny")
  c.pretrained = tiny_pretrain_workdir
  c.data.data_dir = builtin_data_dir
  return c


@pytest.mark.long
def test_restores_exactly_the_pretrained_query_backbone(tiny_pretrain_workdir):
  """Probe features equal the pretraining model's own features."""
  backbone = pretrained.load(tiny_pretrain_workdir)
  config = pretrained.load_config(tiny_pretrain_workdir)
  model = config_lib.build_model(config)
  state = jobcheck.restore_train_state(config, tiny_pretrain_workdir)
  assert backbone.step == int(state.step) == 6
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3),
                                             np.uint8)
  x = augment.normalize(jnp.asarray(images, jnp.float32) / 255, config.aug)
  want = model.apply({"params": state.params,
                      "batch_stats": state.batch_stats}, x,
                     method=model.features)
  got = features.stage_maps(backbone, backbone.variables, images)
  # The variables are the checkpoint's, bit for bit ...
  jax.tree.map(np.testing.assert_array_equal, backbone.variables,
               {"params": state.params["backbone"],
                "batch_stats": state.batch_stats["backbone"]})
  # ... and so are the features, up to jit-versus-eager rounding.
  for s in ("res2", "res3", "res4", "res5"):
    np.testing.assert_allclose(np.asarray(got[s]), np.asarray(want[s]),
                               rtol=1e-5, atol=1e-5)
  floor = pretrained.random_init(config)
  assert not np.allclose(floor.variables["params"]["conv1"]["kernel"],
                         backbone.variables["params"]["conv1"]["kernel"])


def test_topk_counts_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 12)).astype(np.float32)
  labels = rng.integers(0, 12, 50)
  for k in (1, 5):
    want = [labels[i] in np.argsort(-logits[i])[:k] for i in range(50)]
    got = linear._topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want, float))


def test_topk_counts_ties_against_the_label():
  labels = jnp.asarray([0, 1, 2])
  # All ten logits equal: no class is predicted, so nothing is correct.
  assert float(linear._topk_correct(jnp.zeros((3, 10)), labels, 5).sum()) == 0
  # The label tied with one other for the top: correct in top-2, not top-1.
  logits = jnp.asarray([[3.0, 3.0, 1.0], [0.0, 2.0, 2.0], [5.0, 0.0, 5.0]])
  np.testing.assert_array_equal(
      np.asarray(linear._topk_correct(logits, labels, 1)), [0, 0, 0])
  np.testing.assert_array_equal(
      np.asarray(linear._topk_correct(logits, labels, 2)), [1, 1, 1])


def test_protocol_schedule_steps_down_at_the_decay_epochs():
  c = linear_probe.get_config()
  _, schedule = linear.build_optimizer(c, steps_per_epoch=10)
  lrs = [float(schedule(s)) for s in (0, 599, 600, 799, 800, 999)]
  np.testing.assert_allclose(lrs, [30, 30, 3, 3, 0.3, 0.3], rtol=1e-6)


def test_probe_runs_end_to_end_and_resumes_exactly(config, tmp_path):
  workdir = str(tmp_path / "probe")
  results = linear.run(config, workdir)  # 8 steps, checkpoints at 4 and 8.
  saved = json.load(open(os.path.join(workdir, linear.RESULTS_FILE)))
  assert saved == json.loads(json.dumps(results))
  assert saved["steps"] == 8 and saved["pretrained_step"] == 6
  assert set(saved["stages"]) == {"res2", "res3", "res4", "res5"}
  for r in saved["stages"].values():
    assert 0 <= r["top1"] <= r["top5"] <= 1

  def heads(directory):
    ckpt = checkpoint_lib.Checkpointer(directory)
    step = ckpt.latest_step()
    restored = ckpt._manager.restore(step)["state"]  # pylint: disable=protected-access
    ckpt.close()
    return step, restored["params"]

  step, final = heads(workdir)
  assert step == 8
  # Lose the last checkpoint: the rerun resumes at step 4, data included,
  # and must arrive at the same heads.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
  again = linear.run(config, workdir)
  step, resumed = heads(workdir)
  assert step == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               final, resumed)
  assert again["stages"] == results["stages"]


@pytest.mark.long
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(config,
                                                                tmp_path):
  """Stopped before step 4 (saved at 3), or NaN at step 6 (resumed from 4)."""
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: linear.job(config, workdir), tmp_path, stop_k=2,
      nan_k=6)
  assert straight.results["steps"] == 8


@pytest.mark.long
def test_random_init_floor_and_bad_inputs(config, tmp_path):
  config.random_init = True
  config.num_train_examples = 32  # One step: the floor's plumbing only.
  results = linear.run(config, str(tmp_path / "floor"))
  assert results["random_init"]
  assert results["backbone"] == "random init 0, BN statistics of 8 batches"
  config.batch_size = 12
  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    linear.run(config, str(tmp_path / "bad"))
  config.batch_size = 32
  config.pretrained = None
  with pytest.raises(ValueError, match="config.pretrained"):
    linear.run(config, str(tmp_path / "bad"))
  config.pretrained = str(tmp_path / "nothing")
  config.random_init = False
  with pytest.raises(FileNotFoundError, match="config.json"):
    linear.run(config, str(tmp_path / "bad"))


def test_standardisation_statistics_match_numpy(config):
  """Fixed feature statistics: pooled-feature mean and std over batches."""
  config.stats_batches = 2
  mesh = sharding.make_mesh()
  backbone = pretrained.for_probe(config, mesh)
  stats = linear.measure_stats(config, backbone, mesh)
  batches = pipeline.make_eval_iterator(config, "train", train=False,
                                        batch_size=config.batch_size)
  images = np.concatenate([next(batches)["image"] for _ in range(2)])
  x = augment.normalize(jnp.asarray(images, jnp.float32) / 255,
                        backbone.config.aug)
  maps = backbone.module.apply(backbone.variables, x, train=False)
  for s in config.stages:
    pooled = np.asarray(maps[s], np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(stats[s]["mean"], pooled.mean(0), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(stats[s]["inv_std"],
                               1 / np.sqrt(pooled.var(0) + 1e-5), rtol=1e-3)
  identity = probe.identity_stats(backbone.channels, config.stages)
  logits = linear.head_logits(
      {"res5": {"kernel": jnp.eye(64), "bias": jnp.zeros(64)}},
      {"res5": jnp.ones((2, 64))}, identity)
  np.testing.assert_array_equal(np.asarray(logits["res5"]), np.ones((2, 64)))
