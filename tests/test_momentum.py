"""EMA arithmetic, momentum schedule and the queues' ring-buffer order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detco_jax import config_checks
from detco_jax import momentum


def test_ema_update_is_m_ema_plus_one_minus_m_online():
  rng = np.random.default_rng(0)
  ema = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(5,))}}
  online = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(5,))}}
  m = 0.999
  got = momentum.ema_update(jax.tree.map(jnp.float32, ema),
                            jax.tree.map(jnp.float32, online), m)
  np.testing.assert_allclose(got["a"], m * ema["a"] + (1 - m) * online["a"],
                             rtol=1e-6)
  np.testing.assert_allclose(got["b"]["c"],
                             m * ema["b"]["c"] + (1 - m) * online["b"]["c"],
                             rtol=1e-6)
  same = momentum.ema_update(jax.tree.map(jnp.float32, ema),
                             jax.tree.map(jnp.float32, online), 1.0)
  np.testing.assert_allclose(same["a"], ema["a"], rtol=1e-6)


def test_momentum_schedule():
  assert float(momentum.momentum_at(50, 100, 0.99, cosine=False)) == \
      pytest.approx(0.99)
  assert float(momentum.momentum_at(0, 100, 0.99, cosine=True)) == \
      pytest.approx(0.99)
  assert float(momentum.momentum_at(50, 100, 0.99, cosine=True)) == \
      pytest.approx(0.995)
  assert float(momentum.momentum_at(100, 100, 0.99, cosine=True)) == \
      pytest.approx(1.0)


def test_init_queues_unit_vectors_and_kinds():
  q = momentum.init_queues(jax.random.key(0), ("res4", "res5"), ("global",),
                           16, 8)
  assert set(q["global"]) == {"res4", "res5"} and q["local"] == {}
  assert q["global"]["res5"].shape == (16, 8)
  np.testing.assert_allclose(np.linalg.norm(q["global"]["res5"], axis=1), 1.0,
                             rtol=1e-5)
  assert not np.allclose(q["global"]["res4"], q["global"]["res5"])
  assert int(q["ptr"]) == 0


def test_enqueue_order_and_wrap_around():
  size, batch, dim = 8, 2, 3
  queues = momentum.init_queues(jax.random.key(0), ("res5",),
                                ("global", "local"), size, dim)
  ref = {k: np.array(queues[k]["res5"]) for k in ("global", "local")}
  ptr = 0
  enqueue = jax.jit(momentum.enqueue)
  for step in range(7):  # 14 keys into 8 slots: wraps around once.
    keys = {k: {"res5": jnp.full((batch, dim), 10 * step + i + (k == "local"),
                                 jnp.float32) + jnp.arange(batch)[:, None]}
            for i, k in enumerate(("global", "local"))}
    queues = enqueue(queues, keys)
    for k in ("global", "local"):
      ref[k][ptr:ptr + batch] = np.asarray(keys[k]["res5"])
    ptr = (ptr + batch) % size
    assert int(queues["ptr"]) == ptr
    for k in ("global", "local"):
      np.testing.assert_array_equal(np.asarray(queues[k]["res5"]), ref[k])
  # After 7 steps the oldest surviving entries are step 3's, at slots 6..7.
  assert queues["global"]["res5"][6, 0] == 30


def test_queue_size_must_be_multiple_of_batch():
  config_checks.check_queue_size(65536, 256)
  with pytest.raises(ValueError, match="multiple of the global batch_size=96"):
    config_checks.check_queue_size(1000, 96)
