"""Every shipped config loads, validates, and means what its name says."""

import glob
import os
import re
import subprocess
import sys
import textwrap

from absl import flags
from ml_collections import config_flags
import pytest

from configs import common
from configs import dense_probe
from configs import detection
from configs import detco as detco_config
from configs import linear_probe
from configs import mocov2
from detco_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"detco": detco_config, "mocov2": mocov2,
           "linear_probe": linear_probe, "dense_probe": dense_probe,
           "detection": detection}


def load_config_file(name, arg=None):
  """Loads configs/<name>.py[:arg] by path through a `--config=` flag."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
  flag_values(["prog", f"--config={path}" if arg is None
               else f"--config={path}:{arg}"])
  return flag_values.config


def all_keys(config, prefix=""):
  """Every dotted key of a nested config."""
  for key, value in config.items():
    yield prefix + key
    if hasattr(value, "items"):
      yield from all_keys(value, f"{prefix}{key}.")


# ---- The parser.


def test_values_take_their_defaults_types():
  items = common.parse_arg(
      "demo,epochs=3,lr=1,name=x,flag=on,rate=2e-3", variants=["demo"],
      defaults=dict(epochs=200, lr=0.5, name="a", flag=False, rate=0.1))
  assert items == [("demo", True), ("epochs", 3), ("lr", 1.0), ("name", "x"),
                   ("flag", True), ("rate", 2e-3)]
  assert [type(v) for _, v in items] == [bool, int, float, str, bool, float]


def test_values_without_default_take_their_literals_types():
  items = dict(common.parse_arg(
      "a=3,b=0.5,c=True,d=false,e=x1,f=1_000,g=None",
      defaults=dict.fromkeys("abcdefg")))
  assert items == {"a": 3, "b": 0.5, "c": True, "d": False, "e": "x1",
                   "f": 1000, "g": "None"}
  assert type(items["a"]) is int and type(items["c"]) is bool


@pytest.mark.parametrize("text,value", [
    ("true", True), ("True", True), ("YES", True), ("on", True), ("1", True),
    ("false", False), ("False", False), ("no", False), ("OFF", False),
    ("0", False)])
def test_bool_spellings(text, value):
  assert common.parse_arg(f"flag={text}", defaults={"flag": True}) == [
      ("flag", value)]


@pytest.mark.parametrize("arg,message", [
    ("flag=maybe", r"'flag' takes a bool \(true/yes/on/1 or false/no/off/0\), "
                   r"got 'maybe'"),
    ("epochs=2.5", r"'epochs' takes int values, got '2.5'"),
    ("epochs=", r"'epochs' takes int values, got ''"),
    ("lr=fast", r"'lr' takes float values, got 'fast'"),
])
def test_values_of_the_wrong_type_are_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, defaults=dict(flag=False, epochs=1, lr=0.1))


def test_unknown_names_are_errors_listing_the_choices():
  spec = dict(variants=["demo", "tiny"], defaults=dict(seed=0, epochs=1))
  with pytest.raises(ValueError, match=re.escape(
      "unknown config variant 'nope' (variants: demo, tiny; arguments, as "
      "name=value: seed, epochs)")):
    common.parse_arg("demo,nope", **spec)
  with pytest.raises(ValueError, match=re.escape(
      "unknown config variant 'dmeo'; did you mean 'demo'? (variants:")):
    common.parse_arg("dmeo", **spec)
  with pytest.raises(ValueError, match=re.escape(
      "unknown config argument 'lr' (arguments: seed, epochs)")):
    common.parse_arg("lr=3", **spec)
  with pytest.raises(ValueError, match=re.escape(
      "unknown config argument 'sed'; did you mean 'seed'?")):
    common.parse_arg("sed=3", **spec)
  with pytest.raises(ValueError, match="'seed' needs a value: seed=VALUE"):
    common.parse_arg("seed", **spec)
  with pytest.raises(ValueError, match="variant 'demo' takes no value"):
    common.parse_arg("demo=1", **spec)


def test_blanks_and_empty_items_are_ignored():
  assert common.parse_arg(None) == common.parse_arg("") == []
  assert common.parse_arg(" demo , seed = 2 ,", variants=["demo"],
                          defaults={"seed": 0}) == [("demo", True), ("seed", 2)]


def test_the_order_of_items_does_not_matter():
  assert detco_config.get_config("demo,epochs=3").num_epochs == 3
  assert detco_config.get_config("epochs=3,demo").num_epochs == 3
  # Variants apply in their declared order, scale variants first.
  assert (detco_config.get_config("rotation,demo").to_dict()
          == detco_config.get_config("demo,rotation").to_dict())
  c = detco_config.get_config("seed=5,mocov2,ablation")
  assert (c.seed, c.num_epochs, c.loss.multi_level) == (5, 3, False)
  assert common.parse_arg("seed=1,b,a", variants=["a", "b"],
                          defaults={"seed": 0}) == [
                              ("a", True), ("b", True), ("seed", 1)]


def test_the_demo_runs_the_knn_monitor_once_an_epoch():
  from detco_jax import config_lib  # pylint: disable=g-import-not-at-top
  for arg in ("demo", "demo,mocov2", "demo,epochs=3"):
    c = detco_config.get_config(arg)
    assert c.knn.every_steps == config_lib.steps_per_epoch(c) == 156
  assert detco_config.get_config("demo,knn_epochs=2").knn.every_steps == 312
  assert detco_config.get_config("demo,knn_epochs=0").knn.every_steps == 0
  # The ablation's many short runs and the tests' tiny one skip it.
  assert detco_config.get_config("ablation").knn.every_steps == 0
  assert detco_config.get_config("tiny").knn.every_steps == 0


def test_an_item_given_twice_is_an_error():
  with pytest.raises(ValueError, match="'seed' is given twice"):
    detco_config.get_config("ablation,seed=4,mocov2,seed=5")
  with pytest.raises(ValueError, match="'demo' is given twice"):
    detco_config.get_config("demo,demo")


def test_a_bad_item_fails_before_any_variant_runs():
  calls = []
  get_config = common.make_get_config(
      lambda: common.ConfigDict(dict(seed=0)),
      {"v": lambda c: calls.append("v")},
      {"seed": common.Argument("seed")})
  with pytest.raises(ValueError, match="takes int values"):
    get_config("v,seed=x")
  assert not calls
  assert get_config("v,seed=3").seed == 3 and calls == ["v"]


def test_arguments_set_nested_keys_and_run_functions():
  base = lambda: common.ConfigDict(dict(knn=dict(k=200), n=1))
  get_config = common.make_get_config(base, {}, {
      "k": common.Argument("knn.k"),
      "double": common.Argument(lambda c, v: setattr(c, "n", 2 * v),
                                default=1)})
  c = get_config("k=20,double=4")
  assert (c.knn.k, c.n) == (20, 8)


def test_a_name_cannot_be_variant_and_argument():
  with pytest.raises(ValueError, match=r"\['seed'\] are both"):
    common.make_get_config(common.ConfigDict, {"seed": print},
                           {"seed": common.Argument("seed")})


# ---- The shipped configs.


@pytest.mark.parametrize("name,variant", [
    (name, variant) for name, module in MODULES.items()
    for variant in [None, ""] + list(module.VARIANTS)])
def test_every_variant_of_every_file_loads(name, variant):
  config = load_config_file(name, variant)
  assert config.to_dict() == MODULES[name].get_config(variant).to_dict()
  assert config.data.dataset


# The detection transfer counts its schedule in steps (detectron2's way).
EPOCH_SCHEDULES = sorted(set(MODULES) - {"detection"})


@pytest.mark.parametrize("name", EPOCH_SCHEDULES)
def test_every_file_takes_epochs_and_seed(name):
  config = load_config_file(name, "demo,epochs=7,seed=3")
  assert (config.num_epochs, config.seed) == (7, 3)
  assert type(config.num_epochs) is int  # pylint: disable=unidiomatic-typecheck


def test_detection_takes_steps_and_seed():
  config = load_config_file("detection", "demo,steps=40,seed=3")
  assert (config.total_steps, config.seed) == (40, 3)
  with pytest.raises(Exception, match="unknown config argument 'epochs'"):
    load_config_file("detection", "demo,epochs=2")


def test_linear_probe_epochs_keep_the_decay_fractions():
  c = linear_probe.get_config("demo,epochs=20")
  assert (c.num_epochs, tuple(c.lr_decay_epochs)) == (20, (12, 16))
  assert tuple(linear_probe.get_config("epochs=10").lr_decay_epochs) == (6, 8)


@pytest.mark.parametrize("variant", ["", "demo", "tiny", "800ep", "aa",
                                     "single_level", "global_only", "mocov2",
                                     "demo,mocov2", "ablation,seed=1"])
def test_variants_validate_on_eight_devices(variant):
  config = detco_config.get_config(variant)
  config_lib.validate(config, num_devices=8)
  model = config_lib.build_model(config)
  assert model.stages == tuple(config_lib.loss_weights(config))


def test_bn_stats_reaches_the_model_and_is_checked():
  config = detco_config.get_config("tiny")
  assert config.bn_stats == "views"
  assert not config_lib.build_model(config).patch_bn_stats
  config.bn_stats = "views_and_patches"
  assert config_lib.build_model(config).patch_bn_stats
  config.bn_stats = "patches"
  with pytest.raises(ValueError, match="bn_stats='patches' must be"):
    config_lib.validate(config, num_devices=8)


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


@pytest.mark.parametrize("arg", ["", "demo", "tiny", "ablation,seed=2",
                                 "demo,aa,epochs=2"])
def test_mocov2_is_detco_with_the_mocov2_variant(arg):
  expected = detco_config.get_config(",".join(filter(None, ["mocov2", arg])))
  assert mocov2.get_config(arg) == expected
  assert load_config_file("mocov2", arg).to_dict() == expected.to_dict()


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown config variant 'nope'"):
    detco_config.get_config("nope")
  # Through the flag, as the command line reports it.
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"unknown config argument 'x' "
                           r"\(arguments: epochs, seed\)"):
    load_config_file("dense_probe", "demo,x=1")


def test_one_name_per_learning_rate():
  """The probes' rates are both `lr`; pretraining's `base_lr` is scaled."""
  for name, module in MODULES.items():
    for variant in [""] + list(module.VARIANTS):
      assert "learning_rate" not in set(all_keys(module.get_config(variant))), (
          name, variant)
  assert dense_probe.get_config().lr == 1e-2
  assert dense_probe.get_config("demo").lr == 3e-2
  assert linear_probe.get_config().lr == 30.0
  assert "lr" not in detco_config.get_config() and detco_config.get_config(
  ).base_lr == 0.03


def test_dense_probe_optimizer_reads_lr():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from detco_jax.eval import dense  # pylint: disable=g-import-not-at-top
  c = dense_probe.get_config("tiny")
  c.lr = 0.5
  tx = dense.make_optimizer(c, total=10)
  params = {"w": jnp.zeros(())}
  updates, _ = tx.update({"w": jnp.ones(())}, tx.init(params), params)
  # Adam moves by about lr on its first step (float32 bias correction).
  assert float(updates["w"]) == pytest.approx(-0.5, rel=1e-4)


def test_probes_and_pretraining_read_the_same_builtin_builds():
  """A probe must open the dataset build its pretraining made."""
  def builtin(config):
    return {k: v for k, v in config.data.items()
            if k.startswith("builtin_") or k in ("dataset", "eval_split")}
  for variant in ("demo", "tiny"):
    pre = builtin(detco_config.get_config(variant))
    assert builtin(linear_probe.get_config(variant)) == pre
    assert builtin(dense_probe.get_config(variant)) == pre
  # And at the pretraining's resolution.
  demo = detco_config.get_config("demo")
  assert (linear_probe.get_config("demo").eval_views.to_dict()
          == demo.eval_views.to_dict())
  dense_views = dense_probe.get_config("demo").views
  assert (dense_views.crop_size, dense_views.resize_size) == (
      demo.eval_views.crop_size, demo.eval_views.resize_size)


# ---- Config strings written in the docs and scripts.


def documented_config_strings():
  """Every `configs/FILE.py[:ARG]` in the docs, scripts and docstrings."""
  item = r"[a-z0-9_]+(?:=[A-Za-z0-9_.+-]*[A-Za-z0-9_])?"
  pattern = re.compile(rf"configs/(\w+)\.py(?::({item}(?:,{item})*))?")
  files = [os.path.join(ROOT, "README.md")]
  for folder in ("launch", "benchmarks", "experiments", "configs",
                 "detco_jax"):
    files += glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True)
  found = set()
  for path in files:
    if not os.path.isfile(path) or path.endswith((".pyc", ".json")):
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      found |= {(m.group(1), m.group(2) or "")
                for m in pattern.finditer(f.read())}
  return sorted(found - {("common", "")})


def test_the_docs_name_config_strings():
  strings = documented_config_strings()
  # The README's and launch/'s commands, at least.
  assert {("detco", "demo"), ("detco", "mocov2"), ("linear_probe", "demo"),
          ("dense_probe", "demo"), ("mocov2", "")} <= set(strings)


@pytest.mark.parametrize("name,arg", documented_config_strings())
def test_every_documented_config_string_loads(name, arg):
  assert name in MODULES, f"configs/{name}.py is not a config file"
  load_config_file(name, arg)


def test_loads_from_the_repo_root_as_the_cli_does():
  """`python -m ...` from the checkout: `from configs import common` works."""
  script = textwrap.dedent("""
      from absl import flags
      from ml_collections import config_flags
      config = config_flags.DEFINE_config_file("config")
      flags.FLAGS(["prog", "--config=configs/mocov2.py:demo,seed=2"])
      c = config.value
      print(c.seed, c.loss.multi_level, c.data.dataset)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.split() == ["2", "False", "detco_shapes"]
