"""The collapse monitor on constructed embeddings, against NumPy."""

import math

import jax.numpy as jnp
import numpy as np

from detco_jax import collapse
from detco_jax import losses

TAU = 0.2


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_std(z):
  """lightly's std_of_l2_normalized with ddof 0, in float64."""
  return np.std(unit(np.asarray(z, np.float64)), axis=0).mean()


def test_embedding_std_matches_numpy_and_reads_health():
  rng = np.random.default_rng(0)
  spread = rng.normal(size=(512, 128))
  got = float(collapse.embedding_std(jnp.asarray(spread, jnp.float32)))
  np.testing.assert_allclose(got, np_std(spread), rtol=1e-5)
  # Random directions in d = 128: about 1/sqrt(d).
  assert abs(got * math.sqrt(128) - 1) < 0.05
  # Not normalised on input: the monitor normalises first.
  np.testing.assert_allclose(
      float(collapse.embedding_std(jnp.asarray(7 * spread, jnp.float32))),
      got, rtol=1e-5)
  collapsed = np.ones((512, 128)) + 1e-3 * rng.normal(size=(512, 128))
  low = float(collapse.embedding_std(jnp.asarray(collapsed, jnp.float32)))
  np.testing.assert_allclose(low, np_std(collapsed), rtol=1e-3)
  assert low < 1e-3 / math.sqrt(128) * 1.1


def test_head_stds_names_every_weighted_head():
  rng = np.random.default_rng(1)
  emb = lambda: {s: jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
                 for s in ("res2", "res3", "res4", "res5")}
  queries = {"global": emb(), "local": emb()}
  stds = collapse.head_stds(queries, {"res4": 0.7, "res5": 1.0})
  assert set(stds) == {"res4/global_std", "res4/local_std",
                       "res5/global_std", "res5/local_std"}
  np.testing.assert_allclose(float(stds["res4/local_std"]),
                             np_std(queries["local"]["res4"]), rtol=1e-5)
  # MoCo v2: no jigsaw heads, so no local std.
  assert set(collapse.head_stds({"global": emb(), "local": {}},
                                {"res5": 1.0})) == {"res5/global_std"}


def drifting_collapse(rng, b=64, k=1024, d=128, steps=40):
  """A collapsed head that drifts: every image gets the step's one vector.

  Returns (queries, fresh keys, queue) at the last step: the queue holds
  the keys of the previous k / b steps, oldest first, so the fresh key is
  a hair closer to the query than the newest queue entries.
  """
  direction, drift = unit(rng.normal(size=d)), unit(rng.normal(size=d))
  def at(step, n):
    centre = direction + 0.004 * step * drift
    return unit(centre + 1e-4 * rng.normal(size=(n, d)))
  queue = np.concatenate([at(s, b) for s in range(steps - k // b, steps)])
  return at(steps, b), at(steps, b), queue


def window(q, k, queue, term="res5/ll"):
  """A log window's means for one term and its head, as the step logs them."""
  stats = losses.info_nce_stats(jnp.asarray(q, jnp.float32),
                                jnp.asarray(k, jnp.float32),
                                jnp.asarray(queue, jnp.float32), TAU)
  stage = term.split("/")[0]
  return {"loss": 1.0, term: float(stats.loss.mean()),
          f"{term}_acc": float(stats.correct.mean()),
          f"{term}_margin": float(stats.margin.mean()),
          f"{term}_mean_margin": float(stats.mean_margin.mean()),
          f"{stage}/local_std": float(collapse.embedding_std(
              jnp.asarray(q, jnp.float32)))}


def test_a_drifting_collapsed_head_reads_accurate_but_warns_once():
  rng = np.random.default_rng(2)
  q, k, queue = drifting_collapse(rng)
  means = window(q, k, queue)
  # What the accuracy alone would say: every positive wins...
  assert means["res5/ll_acc"] == 1.0
  # ... by a hair, at a loss near chance, with no spread across the batch.
  assert 0 < means["res5/ll_margin"] < 0.01
  assert means["res5/ll"] > 0.85 * math.log(1025)
  assert means["res5/local_std"] < 0.01 / math.sqrt(128)
  watch = collapse.Watch(embed_dim=128, queue_size=1024, batch_size=64)
  lines = watch.check(200, means)
  assert len(lines) == 2
  std_line, = [l for l in lines if "res5/local embeddings" in l]
  term_line, = [l for l in lines if "res5/ll accuracy 1.000" in l]
  assert "std 0.0001" in std_line and "0.088" in std_line
  assert "ln(K+1) = 6.93" in term_line
  assert watch.check(220, means) == []  # Once per head and term.


def test_a_healthy_head_does_not_warn():
  rng = np.random.default_rng(3)
  q = unit(rng.normal(size=(64, 128)))
  k = unit(q + 0.03 * rng.normal(size=q.shape))
  queue = unit(rng.normal(size=(1024, 128)))
  means = window(q, k, queue)
  assert means["res5/ll_acc"] == 1.0 and means["res5/ll_margin"] > 0.3
  watch = collapse.Watch(embed_dim=128, queue_size=1024, batch_size=64)
  assert watch.check(200, means) == []


def test_term_check_waits_for_the_queue_to_hold_real_keys():
  rng = np.random.default_rng(4)
  means = window(*drifting_collapse(rng))
  del means["res5/local_std"]
  watch = collapse.Watch(embed_dim=128, queue_size=1024, batch_size=64)
  # 1024 keys at 64 a step: random initial entries until step 16.
  assert watch.check(15, means) == []
  assert len(watch.check(16, means)) == 1


def test_contrastive_methods_watch_their_own_heads_and_queue():
  from configs import detco as detco_config  # pylint: disable=g-import-not-at-top
  from detco_jax import methods  # pylint: disable=g-import-not-at-top
  for variant in ("demo", "demo,mocov2"):
    config = detco_config.get_config(variant)
    check = methods.get(config).watch(config)
    rng = np.random.default_rng(5)
    lines = check(200, window(*drifting_collapse(rng)))
    # The demo's d = 128, K = 1024: the same thresholds as above.
    assert len(lines) == 2, variant
  assert methods.get(detco_config.get_config("demo,rotation")).watch is None
