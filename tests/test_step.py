"""The sharded train state and the jitted DetCo step on 8 fake devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import detco as detco_config
from detco_jax import config_lib
from detco_jax import sharding
from detco_jax import step as step_lib
from detco_jax.models import resnet


def tiny_config(**overrides):
  config = detco_config.get_config("tiny")
  config.views.global_size = 16
  config.views.local_size = 24
  config.views.patch_size = 8
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, s, p = config.batch_size, config.views.global_size, config.views.patch_size
  return {"global": rng.integers(0, 256, (b, 2, s, s, 3), dtype=np.uint8),
          "local": rng.integers(0, 256, (b, 2, 9, p, p, 3), dtype=np.uint8)}


def setup(config, devices=None):
  mesh = sharding.make_mesh(devices)
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  state, shardings = step_lib.create_train_state(config, model, tx, mesh,
                                                 jax.random.key(0))
  step = step_lib.make_train_step(config, model, tx, schedule, mesh,
                                  shardings)
  return mesh, model, state, step


def test_state_is_sharded_queues_over_k_params_replicated():
  config = tiny_config()
  _, _, state, _ = setup(config)
  k, d = config.queue_size, config.model.embed_dim
  assert set(state.queues["global"]) == set(state.queues["local"]) == {
      "res2", "res3", "res4", "res5"}
  for kind in ("global", "local"):
    for queue in state.queues[kind].values():
      assert queue.sharding.spec == P("data")
      shards = queue.addressable_shards
      assert len(shards) == 8
      assert {s.data.shape for s in shards} == {(k // 8, d)}
  kernel = state.params["backbone"]["conv1"]["kernel"]
  assert kernel.sharding.is_fully_replicated
  np.testing.assert_array_equal(state.ema_params["backbone"]["conv1"]["kernel"],
                                kernel)


def run_steps(config, devices, n=2):
  mesh, _, state, step = setup(config, devices)
  metrics = []
  for i in range(n):
    batch = sharding.host_to_global(random_batch(config, seed=i), mesh)
    state, m = step(state, batch, jax.random.key(1))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


@pytest.mark.long
def test_eight_devices_match_one_device_with_sync_bn():
  config = tiny_config(bn="sync")
  state8, m8 = run_steps(config, jax.devices())
  state1, m1 = run_steps(config, jax.devices()[:1])
  for a, b in zip(m8, m1):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
    np.testing.assert_allclose(a["res3/gl_acc"], b["res3/gl_acc"])
  flat8 = jax.tree.leaves(state8.params)
  flat1 = jax.tree.leaves(state1.params)
  for a, b in zip(flat8, flat1):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(state8.queues["local"]["res2"],
                             state1.queues["local"]["res2"], atol=1e-4)


@pytest.mark.long
def test_step_metrics_queues_and_ema():
  config = tiny_config(ema_momentum=0.5)
  mesh, _, state, step = setup(config)
  old_queue = np.asarray(state.queues["global"]["res5"])
  old_ema = np.asarray(state.ema_params["backbone"]["conv1"]["kernel"])
  batch = sharding.host_to_global(random_batch(config), mesh)
  state, metrics = step(state, batch, jax.random.key(0))
  metrics = jax.device_get(metrics)
  for s in ("res2", "res3", "res4", "res5"):
    for t in ("gg", "ll", "gl"):
      assert np.isfinite(metrics[f"{s}/{t}"])
      assert 0 <= metrics[f"{s}/{t}_acc"] <= 1
  for name in ("loss", "lr", "grad_norm", "ema_momentum"):
    assert np.isfinite(metrics[name]), name
  weights = {"res2": 0.1, "res3": 0.4, "res4": 0.7, "res5": 1.0}
  np.testing.assert_allclose(
      metrics["loss"], sum(w * (metrics[f"{s}/gg"] + metrics[f"{s}/ll"]
                                + metrics[f"{s}/gl"])
                           for s, w in weights.items()), rtol=1e-5)
  b = config.batch_size
  assert int(state.step) == 1 and int(state.queues["ptr"]) == b
  new_queue = np.asarray(state.queues["global"]["res5"])
  assert not np.allclose(new_queue[:b], old_queue[:b])
  np.testing.assert_array_equal(new_queue[b:], old_queue[b:])
  np.testing.assert_allclose(np.linalg.norm(new_queue[:b], axis=1), 1,
                             rtol=1e-5)
  # EMA with m = 0.5: halfway between the old key and the new query params.
  new_q = np.asarray(state.params["backbone"]["conv1"]["kernel"])
  np.testing.assert_allclose(state.ema_params["backbone"]["conv1"]["kernel"],
                             0.5 * old_ema + 0.5 * new_q, rtol=1e-5, atol=1e-7)


@pytest.mark.long
def test_bn_stats_setting_changes_running_averages_not_training():
  """Training normalises with batch statistics either way, so the loss and
  the parameters are identical; only the running averages (and their EMA)
  differ, by whether the patches were folded in."""
  states = {}
  for setting in ("views", "views_and_patches"):
    config = tiny_config(bn_stats=setting, ema_momentum=0.5)
    mesh, _, state, step = setup(config)
    batch = sharding.host_to_global(random_batch(config), mesh)
    for i in range(2):
      state, metrics = step(state, batch, jax.random.key(i))
    states[setting] = (jax.device_get(state), jax.device_get(metrics))
  (views, m_views), (both, m_both) = states.values()
  assert m_views["loss"] == m_both["loss"]
  jax.tree.map(np.testing.assert_array_equal, views.params, both.params)
  jax.tree.map(np.testing.assert_array_equal, views.queues, both.queues)
  for stats in ("batch_stats", "ema_batch_stats"):
    a = getattr(views, stats)["backbone"]["bn1"]["mean"]
    b = getattr(both, stats)["backbone"]["bn1"]["mean"]
    assert not np.allclose(a, b), stats


@pytest.mark.long
def test_mocov2_switches_drop_local_branch():
  config = tiny_config()
  config.loss.multi_level = False
  config.loss.global_local = False
  mesh, model, state, step = setup(config)
  assert not model.use_local and model.stages == ("res5",)
  assert state.queues["local"] == {} and list(state.queues["global"]) == ["res5"]
  assert not any(k.startswith("local_heads") for k in state.params)
  batch = random_batch(config)
  del batch["local"]
  _, metrics = step(state, sharding.host_to_global(batch, mesh),
                    jax.random.key(0))
  assert set(k for k in metrics if "/" in k) == {
      "res5/gg", "res5/gg_acc", "res5/gg_margin", "res5/gg_mean_margin",
      "res5/global_std"}


def test_shuffle_bn_keys_equal_explicit_per_group_computation():
  config = tiny_config(bn_groups=2)
  model = config_lib.build_model(config)
  explicit = model.clone(bn_groups=1)
  rng = np.random.default_rng(0)
  views = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
  patches = jnp.asarray(rng.normal(size=(4, 9, 8, 8, 3)), jnp.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), views, patches,
                                         train=False))()
  perm_rng = jax.random.key(3)
  got = jax.jit(lambda v: step_lib._shuffled_keys(
      model, v, views, patches, perm_rng, shuffle=True))(variables)
  perm = np.asarray(jax.random.permutation(perm_rng, 4))
  apply = jax.jit(lambda v, x, p: explicit.apply(
      v, x, p, train=True, mutable=["batch_stats"])[0])
  expected = {"global": {}, "local": {}}
  for g in range(2):  # Each sub-batch of the permuted batch on its own.
    idx = perm[2 * g:2 * g + 2]
    out = apply(variables, views[idx], patches[idx])
    for kind in expected:
      for s, v in out[kind].items():
        expected[kind].setdefault(s, np.zeros((4, v.shape[1]), np.float32))
        expected[kind][s][idx] = v
  for kind in expected:
    for s in expected[kind]:
      np.testing.assert_allclose(got[kind][s], expected[kind][s], atol=1e-5)
  # Without the shuffle, the same module gives different keys.
  plain = jax.jit(lambda v: step_lib._shuffled_keys(
      model, v, views, patches, perm_rng, shuffle=False))(variables)
  assert not np.allclose(plain["global"]["res5"], got["global"]["res5"])


@pytest.mark.long
def test_named_phases_compose_to_the_step_bit_for_bit():
  """The phases, each jitted alone as the benchmark times them, are the step.

  Nothing of the step lives outside them: chaining their outputs by hand
  gives the jitted `train_step`'s new state and metrics exactly.
  """
  config = tiny_config()
  mesh, model, state, step = setup(config)
  tx, _ = config_lib.build_optimizer(config)
  split = sharding.batch_sharded(mesh)
  batch = sharding.host_to_global(random_batch(config), mesh)
  rng = jax.random.key(1)

  aug_rng, shuffle_rng = jax.jit(step_lib.step_rngs)(rng, state.step)
  views = jax.jit(lambda b, r: step_lib.augment(b, r, config))(batch, aug_rng)
  keys = jax.jit(lambda s, v, r: step_lib.encode_keys(
      s, v, r, config=config, model=model, batch_sharding=split))(
          state, views, shuffle_rng)
  loss, metrics, stats, grads = jax.jit(lambda s, v, k: step_lib.loss_and_grads(
      s, v, k, config=config, model=model))(state, views, keys)
  updated = jax.jit(lambda s, g, b: step_lib.apply_gradients(s, g, b, tx=tx))(
      state, grads, stats)
  composed, m = jax.jit(lambda s, k: step_lib.ema_and_enqueue(
      s, k, config=config))(updated, keys)
  composed, loss, metrics, m = jax.device_get((composed, loss, metrics, m))

  new_state, step_metrics = jax.device_get(step(state, batch, rng))
  assert step_metrics["loss"] == loss and step_metrics["ema_momentum"] == m
  for name, value in metrics.items():
    assert step_metrics[name] == value, name
  jax.tree.map(np.testing.assert_array_equal, composed, new_state)


def test_check_finite_names_the_step():
  step_lib.check_finite(1.5, 3)
  with pytest.raises(FloatingPointError, match="step 41"):
    step_lib.check_finite(float("nan"), 41)


def jigsaw(images, rng, cell, patch):
  """Host-free stand-in for the jigsaw views: 9 shuffled cell crops."""
  b = images.shape[0]
  out = np.empty((b, 9, patch, patch, 3), np.uint8)
  for i in range(b):
    for j, c in enumerate(rng.permutation(9)):
      y, x = divmod(c, 3)
      oy, ox = rng.integers(0, cell - patch + 1, 2)
      out[i, j] = images[i, y * cell + oy:y * cell + oy + patch,
                         x * cell + ox:x * cell + ox + patch]
  return out


def random_views(pool, rng, batch, size=16):
  """Two views per image: independent small shifts plus pixel noise.

  Each image gets its own shifts: a shift shared by the batch would make
  the grid phase, not the image, the easiest thing to match.
  """
  images = pool[rng.choice(len(pool), batch, replace=False)]
  def view():
    oy, ox = rng.integers(0, pool.shape[1] - size + 1, (2, batch))
    crops = np.stack([im[y:y + size, x:x + size]
                      for im, y, x in zip(images, oy, ox)])
    noise = rng.normal(0, 20, crops.shape)
    return np.clip(crops + noise, 0, 255).astype(np.uint8)
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
  return {"global": np.stack([view(), view()], 1),
          "local": np.stack([jigsaw(padded, rng, 8, 8),
                             jigsaw(padded, rng, 8, 8)], 1)}


@pytest.mark.long
def test_contrastive_accuracy_rises_on_random_tensors():
  """Instance discrimination of random images learns well above chance.

  Photometric augmentation is off: on random colour grids colour is the
  instance's identity, which a 300-step tiny model cannot learn to ignore.
  """
  config = tiny_config(queue_size=128, total_steps=240, base_lr=0.1,
                       ema_momentum=0.99, warmup_epochs=0.0)
  config.aug.jitter_prob = config.aug.gray_prob = config.aug.blur_prob = 0.
  mesh, _, state, step = setup(config)
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (2048, 3, 3, 3), dtype=np.uint8)
  pool = np.kron(coarse, np.ones((1, 6, 6, 1), np.uint8))  # 18 px images.
  history = []
  for _ in range(config.total_steps):
    batch = sharding.host_to_global(random_views(pool, rng,
                                                 config.batch_size), mesh)
    state, metrics = step(state, batch, jax.random.key(0))
    history.append(metrics)
  history = jax.device_get(history)
  mean = lambda ms, k: float(np.mean([m[k] for m in ms]))
  chance = 1 / (config.queue_size + 1)
  first, last = history[10:30], history[-30:]
  # Global instance discrimination: far above chance (1/129).
  assert mean(last, "res5/gg_acc") > 0.3 > 30 * chance
  assert mean(last, "res5/gg") < mean(first, "res5/gg")
  assert mean(last, "loss") < mean(first, "loss")
  # The jigsaw terms must first become invariant to the patch order (PIRL),
  # which 240 steps of this model do not reliably reach: their arithmetic
  # is checked against NumPy in test_losses.py, their learning by the demo.


@pytest.mark.long
def test_bfloat16_with_remat_tracks_float32_and_keeps_float32_state():
  losses = {}
  for dtype, remat in (("float32", False), ("bfloat16", True)):
    config = tiny_config()
    config.model.dtype, config.model.remat = dtype, remat
    mesh, _, state, step = setup(config)
    losses[dtype] = []
    for i in range(3):
      batch = sharding.host_to_global(random_batch(config, seed=i), mesh)
      state, metrics = step(state, batch, jax.random.key(1))
      losses[dtype].append(float(metrics["loss"]))
  # Parameters, optimiser state, BN statistics and queues stay float32.
  for tree in (state.params, state.opt_state, state.batch_stats,
               state.ema_params, state.ema_batch_stats, state.queues):
    for leaf in jax.tree.leaves(tree):
      assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.01)


@pytest.mark.long
def test_small_map_convolutions_keep_keys_loss_and_gradients(monkeypatch):
  """The dense layer that replaces convolutions on small maps
  (`resnet.conv_general_dilated`) changes only the order of the sums.

  The step's keys, loss, gradients and BN statistics equal those of XLA's
  convolution everywhere (the computation before it), within float32
  rounding, on patch maps of 10, 5, 3 and 2 px as in the demo.
  """
  config = tiny_config(**{"views.local_size": 36, "views.patch_size": 10})
  _, model, state, _ = setup(config, jax.devices()[:1])
  batch = random_batch(config)
  rng = jax.random.key(1)

  def phases(state, batch, rng):
    aug_rng, shuffle_rng = step_lib.step_rngs(rng, state.step)
    views = step_lib.augment(batch, aug_rng, config)
    keys = step_lib.encode_keys(state, views, shuffle_rng, config=config,
                                model=model)
    return keys, step_lib.loss_and_grads(state, views, keys, config=config,
                                         model=model)

  def count_convs():
    # A new function each time: traced afresh, not served from a cache.
    text = str(jax.make_jaxpr(lambda *a: phases(*a))(state, batch, rng))
    return text.count("conv_general_dilated[")

  ours = jax.device_get(jax.jit(phases)(state, batch, rng))
  ours_convs = count_convs()
  # The reference: every convolution XLA's own, as the model had them.
  monkeypatch.setattr(resnet, "conv_general_dilated",
                      jax.lax.conv_general_dilated)
  reference = jax.device_get(jax.jit(lambda *a: phases(*a))(state, batch,
                                                            rng))
  assert count_convs() > ours_convs  # The two paths differ.

  (keys, (loss, metrics, stats, grads)) = ours
  (ref_keys, (ref_loss, ref_metrics, ref_stats, ref_grads)) = reference
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  jax.tree.map(close, keys, ref_keys)
  close(loss, ref_loss, rtol=1e-6)
  jax.tree.map(close, metrics, ref_metrics)
  jax.tree.map(close, stats, ref_stats)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
