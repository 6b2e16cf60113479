"""The classic pretext tasks as methods: heads, losses, loops, resume, probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from configs import detco as detco_config
from detco_jax import methods
from detco_jax import sharding
from detco_jax import train
from detco_jax.methods import pretext
from tests import jobcheck

TASKS = ("rotation", "jigsaw_perm", "rel_patch")


def tiny(method, data_dir=None):
  config = detco_config.get_config(f"tiny,{method}")
  config.write_views_image = False
  if data_dir is not None:
    config.data.data_dir = data_dir
  return config


def test_config_method_picks_the_method_and_unknown_names_are_refused():
  assert methods.get(detco_config.get_config("tiny")).name == "detco"
  for name in TASKS:
    assert methods.get(tiny(name)).name == name
  config = tiny("rotation")
  config.method = "colorization"
  with pytest.raises(ValueError, match="must be one of .*'jigsaw_perm'"):
    methods.get(config)


def test_cross_entropy_and_accuracy_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(12, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 12)
  loss, metrics = pretext.cross_entropy(jnp.asarray(logits),
                                        jnp.asarray(labels))
  shifted = logits - logits.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  np.testing.assert_allclose(loss, -log_p[np.arange(12), labels].mean(),
                             rtol=1e-6)
  assert metrics["pretext_acc"] == np.mean(logits.argmax(1) == labels)


def test_head_shares_its_tile_layer_then_concatenates():
  head = pretext.ClassifierHead(tile_hidden=6, hidden=5, num_classes=3)
  features = np.random.default_rng(1).normal(size=(4, 9, 7)).astype(
      np.float32)
  params = head.init(jax.random.key(0), features)["params"]
  got = head.apply({"params": params}, features)
  p = jax.tree.map(np.asarray, params)
  relu = lambda x: np.maximum(x, 0)
  tiles = relu(features @ p["tile"]["kernel"] + p["tile"]["bias"])
  hidden = relu(tiles.reshape(4, 54) @ p["hidden"]["kernel"]
                + p["hidden"]["bias"])
  want = hidden @ p["logits"]["kernel"] + p["logits"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert p["tile"]["kernel"].shape == (7, 6)  # One layer for all 9 tiles.
  # Without the optional layers: a linear head on the pooled features.
  linear_head = pretext.ClassifierHead(tile_hidden=0, hidden=0, num_classes=3)
  params = linear_head.init(jax.random.key(0), features[:, :1])["params"]
  assert set(params) == {"logits"}


def test_default_head_widths_follow_the_res5_head():
  config = tiny("jigsaw_perm")
  net = pretext.build_model(config, methods.jigsaw_perm.TASK)
  width = config.model.global_hidden["res5"]
  assert (net.head.tile_hidden, net.head.hidden, net.head.num_classes) == (
      width // 4, 2 * width, 100)
  config.pretext.hidden = 0
  assert pretext.build_model(config, methods.jigsaw_perm.TASK).head.hidden == 0
  net = pretext.build_model(tiny("rotation"), methods.rotation.TASK)
  assert (net.head.tile_hidden, net.head.hidden, net.head.num_classes) == (
      0, width, 4)


def grid_image(side):
  """A 3 x 3 grid of distinct grey levels: each cell's content says where
  it is, so every task's label is readable from the inputs."""
  cell = -(-side // 3)
  levels = np.arange(9, dtype=np.float32).reshape(3, 3) * 28 + 10
  image = np.kron(levels, np.ones((cell, cell)))[:side, :side]
  return np.repeat(image[..., None], 3, axis=2).astype(np.uint8)


def host_batches(config, task, image, seeds):
  """The task's host views of `image` under each seed, batched."""
  make = task.example_views(config)
  ds = tf.data.Dataset.from_tensor_slices(np.asarray(seeds, np.int64))
  ds = ds.map(lambda seed: make(tf.constant(image), seed))
  return ds.batch(config.batch_size, drop_remainder=True).as_numpy_iterator()


def learning_config(name):
  config = tiny(name)
  # The config's photometric augmentation stays on (each input jittered on
  # its own); a higher rate so that 40 steps suffice.
  config.base_lr, config.total_steps, config.warmup_epochs = 2.0, 40, 0.0
  config.views.flip_prob = 0.0
  config.views.local_min_area = 0.9
  if name == "jigsaw_perm":
    config.pretext.num_permutations = 4  # Chance 25%: 40 steps can tell.
  return config


@pytest.mark.long
@pytest.mark.parametrize("name", TASKS)
def test_each_task_learns_its_pretext_above_chance(name):
  config = learning_config(name)
  method, task = methods.METHODS[name], getattr(methods, name).TASK
  mesh = sharding.make_mesh()
  state, step = method.build(config, mesh, jax.random.key(0))
  image = grid_image(32 if name != "jigsaw_perm" else config.views.local_size)
  seeds = [[i, 0] for i in range(config.total_steps * config.batch_size)]
  for batch in host_batches(config, task, image, seeds):
    state, _ = step(state, sharding.host_to_global(batch, mesh),
                    jax.random.key(1))
  # Held-out draws (new crops and labels), batch statistics as in training.
  model = pretext.build_model(config, task)
  held_out = [[i, 1] for i in range(4 * config.batch_size)]
  hits = []
  for batch in host_batches(config, task, image, held_out):
    inputs = pretext.augment_inputs(jnp.asarray(batch["inputs"]),
                                    jax.random.key(2), config.aug,
                                    task.blur_side(config))
    logits, _ = model.apply({"params": state.params,
                             "batch_stats": state.batch_stats}, inputs,
                            train=True, mutable=["batch_stats"])
    hits.append(np.argmax(logits, -1) == batch["label"].reshape(-1))
  accuracy = np.concatenate(hits).mean()
  chance = 1 / task.num_classes(config)
  assert accuracy > chance + 0.25, (accuracy, chance)


def random_host_batch(config, task, seed):
  m, n, s = task.input_shape(config)
  rng = np.random.default_rng(seed)
  b = config.batch_size
  return {"inputs": rng.integers(0, 256, (b, m, n, s, s, 3), dtype=np.uint8),
          "label": rng.integers(0, task.num_classes(config), (b, m),
                                dtype=np.int32)}


@pytest.mark.long
@pytest.mark.parametrize("name", TASKS)
def test_eight_devices_equal_one_device(name):
  """One step's whole state, and two steps' losses, on 8 devices and on 1.

  Only one step's state is compared: the same sums in another order differ
  by ~1e-7, and a channel that ReLU has nearly silenced (variance ~ 0, so
  BN multiplies by ~1/sqrt(epsilon)) can blow that up in the next step.
  """
  config = tiny(name)
  task = getattr(methods, name).TASK
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = sharding.make_mesh(devices)
    state, step = methods.METHODS[name].build(config, mesh, jax.random.key(0))
    losses, first = [], None
    for i in range(2):
      batch = sharding.host_to_global(random_host_batch(config, task, i), mesh)
      state, metrics = step(state, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
      first = jax.device_get(state) if first is None else first
    results.append((first, losses))
  (state8, losses8), (state1, losses1) = results
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert int(state8.step) == 1
  for a, b in zip(jax.tree.leaves(state8), jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.long
@pytest.mark.parametrize("name", TASKS)
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(
    name, builtin_data_dir, tmp_path):
  config = tiny(name, builtin_data_dir)
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: train.job(config, workdir), tmp_path, stop_k=3, nan_k=5)
  assert 0 <= straight.last["pretext_acc"] <= 1
  assert int(straight.state.step) == config.total_steps


@pytest.mark.long
def test_probes_read_a_pretext_run(builtin_data_dir, tmp_path):
  config = tiny("rel_patch", builtin_data_dir)
  config.write_views_image = True
  workdir = str(tmp_path / "pretrain")
  train.run(config, workdir)
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.IMAGES: 0,
                              event_accumulator.TENSORS: 0})
  events.Reload()
  assert "views/rel_patch" in events.Tags()["images"] + events.Tags()[
      "tensors"]
  jobcheck.check_probes_read_the_run(config, workdir, builtin_data_dir,
                                     str(tmp_path / "linear"))


@pytest.mark.parametrize("name,key,value,match", [
    ("rotation", "pretext.angles", "sideways", "pretext.angles='sideways'"),
    ("jigsaw_perm", "views.grid", 4, "views.grid=3"),
    ("jigsaw_perm", "pretext.num_permutations", 1, "num_permutations=1"),
    ("rel_patch", "pretext.gap", -1, "pretext.gap=-1"),
    ("rotation", "aug.randaugment", True, "randaugment"),
    ("rotation", "batch_size", 12, "batch_size=12"),
])
def test_bad_pretext_configs_stop_with_the_key(name, key, value, match,
                                               tmp_path):
  config = tiny(name)
  section, field = key.split(".") if "." in key else (None, key)
  (config[section] if section else config)[field] = value
  with pytest.raises(ValueError, match=match):
    train.job(config, str(tmp_path))


def test_a_pretext_method_without_its_block_says_which_variant():
  config = detco_config.get_config("tiny")
  config.method = "rotation"
  with pytest.raises(ValueError, match="demo,rotation"):
    methods.get(config).validate(config, 8, 1)
