"""The supervised reference method: its labels, its step, resume, probes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import detco as detco_config
from detco_jax import methods
from detco_jax import sharding
from detco_jax import train
from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.methods import pretext
from detco_jax.methods import supervised
from tests import jobcheck


def tiny(data_dir):
  config = detco_config.get_config("tiny,supervised")
  config.write_views_image = False
  config.data.data_dir = data_dir
  return config


def test_the_variant_picks_a_linear_head_over_the_dataset_classes(
    builtin_data_dir):
  config = tiny(builtin_data_dir)
  assert methods.get(config) is supervised.METHOD
  net = pretext.build_model(config, supervised.TASK)
  assert (net.head.tile_hidden, net.head.hidden, net.head.num_classes) == (
      0, 0, 10)
  assert supervised.TASK.input_shape(config) == (1, 1, 32)


@pytest.mark.long
def test_batches_carry_each_example_own_label(builtin_data_dir):
  """Each batch's label is the label of the image its view was cut from,
  looked up from the TFDS split itself by the image's bytes."""
  config = tiny(builtin_data_dir)
  labels_by_image = {
      example["image"].tobytes(): int(example["label"])
      for example in tfds.as_numpy(sources.tfds_builder(
          config.data).as_dataset(split=config.data.train_split))}
  # Whole images as the "views", so each can be looked up.
  whole = pipeline.LabelledViews(
      lambda image, seed: {"inputs": image[None, None]})
  batches = pipeline.make_pretrain_iterator(config, process_index=0,
                                            process_count=1,
                                            example_views=whole)
  seen = []
  for _ in range(20):  # 320 of 256 images: more than an epoch.
    batch = next(batches)
    assert batch["label"].shape == (config.batch_size, 1)
    assert batch["label"].dtype == np.int32
    for image, label in zip(batch["inputs"][:, 0, 0], batch["label"][:, 0]):
      assert labels_by_image[image.tobytes()] == label
      seen.append(label)
  assert len(set(seen)) == 10  # Not one class repeated.
  # The method's own views: one global view of each image, with its label.
  views = next(pipeline.make_pretrain_iterator(
      config, process_index=0, process_count=1,
      example_views=supervised.METHOD.example_views(config)))
  assert views["inputs"].shape == (config.batch_size, 1, 1, 32, 32, 3)
  np.testing.assert_array_equal(
      views["label"], next(pipeline.make_pretrain_iterator(
          config, process_index=0, process_count=1,
          example_views=whole))["label"])


def test_a_self_supervised_method_never_sees_the_label(builtin_data_dir):
  config = detco_config.get_config("tiny")
  config.data.data_dir = builtin_data_dir
  batch = next(pipeline.make_pretrain_iterator(config, process_index=0,
                                               process_count=1))
  assert "label" not in batch and set(batch) == {"global", "local"}


def brightness_batch(config, rng):
  """Flat images whose label (0 or 1) is their grey level, dark or bright:
  readable through the photometric augmentation, so a few steps learn it."""
  b, s = config.batch_size, config.views.global_size
  labels = rng.integers(0, 2, b).astype(np.int32)
  levels = np.where(labels == 1, 220, 30)
  images = np.broadcast_to(levels[:, None, None, None, None, None],
                           (b, 1, 1, s, s, 3)).astype(np.uint8)
  return {"inputs": images, "label": labels[:, None]}


@pytest.mark.long
def test_the_step_learns_a_readable_label(builtin_data_dir):
  config = tiny(builtin_data_dir)
  config.base_lr, config.total_steps, config.warmup_epochs = 1.0, 30, 0.0
  mesh = sharding.make_mesh()
  state, step = supervised.METHOD.build(config, mesh, jax.random.key(0))
  rng = np.random.default_rng(0)
  for _ in range(config.total_steps):
    state, metrics = step(state, sharding.host_to_global(
        brightness_batch(config, rng), mesh), jax.random.key(1))
  model = pretext.build_model(config, supervised.TASK)
  hits = []
  for i in range(4):
    batch = brightness_batch(config, rng)
    inputs = pretext.augment_inputs(jnp.asarray(batch["inputs"]),
                                    jax.random.key(10 + i), config.aug,
                                    supervised.TASK.blur_side(config))
    logits, _ = model.apply({"params": state.params,
                             "batch_stats": state.batch_stats}, inputs,
                            train=True, mutable=["batch_stats"])
    hits.append(np.argmax(logits, -1) == batch["label"][:, 0])
  accuracy = np.concatenate(hits).mean()
  assert accuracy > 0.5 + 0.25, accuracy
  assert float(metrics["pretext_acc"]) > 0.75


@pytest.mark.long
def test_sigterm_or_nan_then_resume_equal_an_uninterrupted_run(
    builtin_data_dir, tmp_path):
  config = tiny(builtin_data_dir)
  straight = jobcheck.check_stop_and_nan_resume(
      lambda workdir: train.job(config, workdir), tmp_path, stop_k=3, nan_k=5)
  assert 0 <= straight.last["pretext_acc"] <= 1


@pytest.mark.long
def test_probes_read_a_supervised_run(builtin_data_dir, tmp_path):
  config = tiny(builtin_data_dir)
  workdir = str(tmp_path / "pretrain")
  train.run(config, workdir)
  jobcheck.check_probes_read_the_run(config, workdir, builtin_data_dir,
                                     str(tmp_path / "linear"))


def test_an_unlabelled_dataset_is_refused_with_the_reason(builtin_data_dir,
                                                          monkeypatch):
  config = tiny(builtin_data_dir)
  monkeypatch.setattr(supervised.sources, "num_classes", lambda data: 0)
  with pytest.raises(ValueError, match="needs a labelled dataset"):
    supervised.METHOD.validate(config, 8, 1)
