"""The large-batch recipe that launch/README.md recommends is what it says.

The v4-32 walkthrough's command is read from the guide itself and its
config loaded as the command line loads it (`--config=FILE:ARG` and any
`--config.KEY=VALUE`); its optimiser, schedule and BN groups are then
checked against the guide's claims: SGD peaking at 0.03 x batch/256 after a
5-epoch linear warm-up, then cosine decay to 0, and shuffle-BN groups of 32
images. Nothing trains: building the optimiser and the model is enough.
"""

import os
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import detco
from detco_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = os.path.join(REPO, "launch", "README.md")


def walkthrough_command() -> list[str]:
  """The words of the command in step 3 ("Run") of the v4-32 walkthrough."""
  with open(GUIDE, encoding="utf-8") as f:
    text = f.read()
  step = text[text.index("**3. Run.**"):]
  block = re.search(r"```bash\n(.*?)```", step, re.S).group(1)
  return shlex.split(block.replace("\\\n", " "))


def load(words: list[str]):
  """The config that a command's `--config` flags make, parsed by absl."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values)
  values(["prog"] + [w for w in words if w.startswith("--config")])
  return values.config


@pytest.fixture(name="config")
def documented_config(monkeypatch):
  monkeypatch.chdir(REPO)  # The guide's paths are relative to the root.
  words = walkthrough_command()
  assert words[:2] == ["launch/tpu_vm.sh", "run"], words
  return load(words)


def test_the_guide_runs_batch_1024_with_sgd(config):
  assert config.batch_size == 1024
  assert config.optimizer == "sgd"
  # It starts on a v4-32: 16 devices in 4 processes.
  config_lib.validate(config, num_devices=16, process_count=4)


def test_schedule_warms_up_for_5_epochs_then_decays_to_0(config):
  _, schedule = config_lib.build_optimizer(config)
  peak = 0.03 * config.batch_size / 256
  warmup = 5 * config_lib.steps_per_epoch(config)  # 5 x 1251 steps.
  total = config_lib.total_steps(config)
  lr = lambda step: float(schedule(step))
  assert peak == pytest.approx(0.12)
  assert lr(0) == 0
  assert lr(warmup // 2) == pytest.approx(peak * (warmup // 2) / warmup,
                                          rel=1e-5)
  assert lr(warmup) == pytest.approx(peak, rel=1e-5)
  assert lr(warmup + (total - warmup) // 2) == pytest.approx(peak / 2,
                                                             rel=1e-4)
  assert lr(total) == pytest.approx(0, abs=1e-8)
  assert max(lr(s) for s in range(0, total, 97)) <= peak * (1 + 1e-6)


def test_optimizer_is_sgd_at_the_peak_rate(config):
  """After the warm-up, one step is PyTorch's SGD: -lr (g + wd p).

  LARS would leave biases undecayed and scale each kernel's step by its
  trust ratio instead.
  """
  tx, _ = config_lib.build_optimizer(config)
  peak = 0.03 * config.batch_size / 256
  warmup = 5 * config_lib.steps_per_epoch(config)
  params = {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  state = optax.tree_utils.tree_set(tx.init(params),
                                    count=jnp.asarray(warmup, jnp.int32))
  updates, _ = tx.update(grads, state, params)
  expected = -peak * (0.5 + config.weight_decay * 2.0)
  for name in params:
    np.testing.assert_allclose(updates[name], expected, rtol=1e-5)


def test_bn_groups_hold_32_images(config):
  groups = config_lib.bn_groups(config)
  assert (groups, config.batch_size // groups) == (32, 32)
  assert config_lib.build_model(config).bn_groups == groups


def test_the_models_bn_groups_are_32_images_at_the_tiny_scale():
  """`tiny,batch=64`: two BN groups of 32, in the model that trains.

  In training mode an image's features depend on the images of its own
  group only: a change to image 40 reaches image 63 (same 32) and not
  image 31, which only groups of exactly 32 allow among 64's divisors.
  """
  config = detco.get_config("tiny,batch=64")
  assert config_lib.bn_groups(config) == 2
  model = config_lib.build_model(config)
  size = config.views.global_size
  views = jnp.asarray(np.random.default_rng(0).normal(
      size=(64, size, size, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), views, None, train=False)

  @jax.jit
  def res5(x):
    maps, _ = model.apply(variables, x, None, train=True,
                          method=model.stage_maps,
                          mutable=["batch_stats"])[0]
    return maps["res5"]

  before, after = res5(views), res5(views.at[40].multiply(3.0))
  changed = np.abs(np.asarray(after - before)).max(axis=(1, 2, 3)) > 1e-6
  assert not changed[:32].any()
  assert changed[63]


def test_a_batch_that_is_no_multiple_of_the_group_size_is_one_line():
  config = detco.get_config("batch=1000")
  with pytest.raises(ValueError, match=r"^Bad config: batch_size=1000 must "
                     r"be a multiple of bn_group_size=32; e\.g\. "
                     r"--config\.batch_size=992\.$"):
    config_lib.validate(config, num_devices=8)


def test_without_bn_group_size_the_groups_are_unchanged():
  """Existing configs keep `bn_groups`; 256 images are 8 groups of 32."""
  assert config_lib.bn_groups(detco.get_config()) == 8
  assert config_lib.bn_groups(detco.get_config("demo")) == 2
  assert config_lib.bn_groups(detco.get_config("batch=256")) == 8
  assert detco.get_config("batch=256").warmup_epochs == 0
