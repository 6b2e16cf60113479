"""The detection transfer's schedules (configs/detection.py `SCHEDULES`)."""

import numpy as np
import pytest

from configs import detection as detection_config
from detco_jax.eval import detection

# name -> (iterations, drops) at batch 16, as DetCo's paper gives them.
PAPER = {"12k": (12_000, (9_000, 11_000)), "1x": (90_000, (60_000, 80_000)),
         "2x": (180_000, (120_000, 160_000))}


def lr_at(config, steps):
  """The schedule's learning rate at each of `steps`."""
  _, schedule = detection.build_optimizer(config)
  return np.array([float(schedule(s)) for s in steps])


def expect_schedule(config, total, drops, warmup, peak):
  """Checks lr at 0, in the warm-up, around each drop and at the end."""
  assert detection.total_steps(config) == total
  assert detection.warmup_steps(config) == warmup
  first, second = drops
  steps = [0, warmup // 2, warmup, first - 1, first, second - 1, second,
           total - 1]
  want = [peak * 1e-3, peak * (1e-3 + (1 - 1e-3) / 2), peak, peak,
          peak / 10, peak / 10, peak / 100, peak / 100]
  # float32 schedules: 1e-5 is 0.01 * 0.001 to 4e-5.
  np.testing.assert_allclose(lr_at(config, steps), want, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_schedule_at_batch_16(name):
  config = detection_config.get_config(name)
  assert config.batch_size == 16
  total, drops = PAPER[name]
  expect_schedule(config, total, drops, warmup=1000, peak=0.01)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_schedule_counts_images_at_batch_64(name):
  config = detection_config.get_config(name)
  config.batch_size = 64  # As --config.batch_size=64 sets it.
  total, drops = PAPER[name]
  expect_schedule(config, total // 4, [d // 4 for d in drops], warmup=250,
                  peak=0.04)


def test_the_default_is_1x():
  assert (detection_config.get_config().to_dict()
          == detection_config.get_config("1x").to_dict())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_steps_sets_the_length_and_keeps_the_fractions(name):
  config = detection_config.get_config(f"{name},steps=6000")
  total, drops = PAPER[name]
  ours = [round(d / total * 6000) for d in drops]
  assert config.total_steps == 6000
  expect_schedule(config, 6000, ours, warmup=1000, peak=0.01)
  # The order of the items does not matter.
  assert (detection_config.get_config(f"steps=6000,{name}").to_dict()
          == config.to_dict())


def test_a_schedule_replaces_a_scale_variants_length():
  demo = detection_config.get_config("demo")
  assert (detection.total_steps(demo), detection.warmup_steps(demo)) == (
      500, 25)
  # The demo's batch 32: 12k iterations at 16 are 6,000 steps.
  on_12k = detection_config.get_config("demo,12k")
  assert (detection.total_steps(on_12k), detection.warmup_steps(on_12k)) == (
      6000, 500)
  assert detection.total_steps(detection_config.get_config(
      "demo,12k,steps=100")) == 100
