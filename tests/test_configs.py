"""Every shipped config loads, validates, and means what its name says."""

import importlib.util
import os

import pytest

from configs import detco as detco_config
from detco_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name, arg=""):
  """Loads configs/<name>.py by path, as `--config=` does."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("variant", ["", "demo", "tiny", "800ep", "aa",
                                     "single_level", "global_only", "mocov2",
                                     "demo,mocov2"])
def test_variants_validate_on_eight_devices(variant):
  config = detco_config.get_config(variant)
  config_lib.validate(config, num_devices=8)
  model = config_lib.build_model(config)
  assert model.stages == tuple(config_lib.loss_weights(config))


def test_paper_setting_figures():
  c = detco_config.get_config()
  assert (c.model.depth, c.batch_size, c.num_epochs) == (50, 256, 200)
  assert (c.loss.temperature, c.queue_size, c.ema_momentum) == (0.2, 65536,
                                                                0.999)
  assert config_lib.loss_weights(c) == {"res2": 0.1, "res3": 0.4,
                                        "res4": 0.7, "res5": 1.0}
  assert config_lib.loss_terms(c) == ("gg", "ll", "gl")
  assert config_lib.total_steps(c) == 200 * (1_281_167 // 256)
  assert detco_config.get_config("800ep").num_epochs == 800
  assert detco_config.get_config("aa").aug.randaugment


def test_ablation_switches():
  single = detco_config.get_config("single_level")
  assert config_lib.loss_weights(single) == {"res5": 1.0}
  assert config_lib.loss_terms(single) == ("gg", "ll", "gl")
  only_global = detco_config.get_config("global_only")
  assert config_lib.loss_terms(only_global) == ("gg",)
  assert not config_lib.uses_local(only_global)
  assert config_lib.queue_kinds(only_global) == ("global",)


def test_mocov2_file_is_the_baseline():
  c = load_config_file("mocov2")
  assert config_lib.loss_weights(c) == {"res5": 1.0}
  assert config_lib.loss_terms(c) == ("gg",)
  demo = load_config_file("mocov2", "demo")
  assert demo.data.dataset == "detco_shapes" and demo.model.depth == 18


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="Unknown config variant 'nope'"):
    detco_config.get_config("nope")
