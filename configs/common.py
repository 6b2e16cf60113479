r"""What the experiment configs share: the config-string parser and blocks.

A config string is what follows the colon in `--config=FILE:ARG`. It is a
comma-separated set of items, each either

  a variant    a name (`demo`, `mocov2`): a named change of the config;
  an argument  `name=value` (`epochs=3`, `seed=1`): a typed setting.

  python -m detco_jax.main --config=configs/detco.py:demo,epochs=3,seed=1 ...

A value takes the type of its argument's default: an int argument rejects
`3.5`, a float one takes `1` or `1e-3`, a str one takes the text as it is,
and a bool one takes true/false, yes/no, on/off or 1/0 in any case. An
argument without a default takes the type its literal spells (`3` an int,
`0.5` a float, `true` a bool, anything else a str). A value cannot hold a
comma.

The order of the items does not matter: the variants apply in the order
their config file declares them (scale variants such as `demo` first), and
the arguments after all variants, so `demo,epochs=3` and `epochs=3,demo`
are the same config (the demo for 3 epochs). An item given twice is an
error. `--config.KEY=VALUE` overrides apply after the whole string.

Each config file declares the variants and arguments it accepts and makes
its `get_config` with `make_get_config`; anything else in its string is a
`ValueError` that names the closest choice.
"""

import ast
import dataclasses
import difflib
from typing import Any, Callable, Collection, Mapping

import ml_collections

ConfigDict = ml_collections.ConfigDict
Variant = Callable[[ConfigDict], None]
Setter = Callable[[ConfigDict, Any], None]

placeholder = ml_collections.config_dict.placeholder

# The backbone's stages, in order (each config's probes, heads and weights).
STAGES = ("res2", "res3", "res4", "res5")
# The offline dataset that detco_jax/data/builtin.py generates and builds.
BUILTIN_DATASET = "detco_shapes"

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


# ---------------------------------------------------------------------------
# The config-string parser.


@dataclasses.dataclass(frozen=True)
class Argument:
  """A typed `name=value` item of a config string.

  Attributes:
    target: where the value goes: a dotted config key (`"num_epochs"`,
      `"knn.k"`), or a function `(config, value) -> None` for an argument
      that moves several settings together.
    default: the setting's value without the argument; its type is the
      argument's (bool, int, float or str). None: the type of the config's
      value at `target` where that is a key and not None, else the type the
      literal spells.
  """
  target: str | Setter
  default: bool | int | float | str | None = None

  def apply(self, config: ConfigDict, value: Any) -> None:
    """Sets `value` on `config`."""
    if callable(self.target):
      self.target(config, value)
      return
    *parents, name = self.target.split(".")
    for parent in parents:
      config = config[parent]
    config[name] = value


def _parse_bool(name: str, text: str) -> bool:
  """`text` as a bool, from any of the usual spellings."""
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f"Config argument {name!r} takes a bool "
                   f"({'/'.join(_TRUE)} or {'/'.join(_FALSE)}), got {text!r}.")


def _from_literal(text: str) -> bool | int | float | str:
  """The value `text` spells: a bool, an int, a float, or else the text."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  # A number or a quoted string; `None` or `(1)` and the like stay text.
  if isinstance(value, (int, float, str)) and not isinstance(value, bool):
    return value
  return text


def convert(name: str, text: str, default: Any = None) -> Any:
  """One argument's value, typed by its default or else by its literal.

  Args:
    name: the argument's name (for the error message).
    text: the value as written in the config string.
    default: a bool, int, float or str whose type the value takes; None to
      infer it from the literal.

  Returns:
    The typed value.

  Raises:
    ValueError: `text` is not a value of the default's type.
  """
  if default is None:
    return _from_literal(text)
  if isinstance(default, bool):
    return _parse_bool(name, text)
  kind = type(default)
  if kind not in (int, float, str):
    raise TypeError(f"Config argument {name!r} has a default of type "
                    f"{kind.__name__}; only bool, int, float and str parse.")
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"Config argument {name!r} takes {kind.__name__} "
                     f"values, got {text!r}.") from None


def suggest(name: str, choices: Collection[str]) -> str:
  """`; did you mean 'x'?` for the choice closest to `name`, or "".

  Args:
    name: what the user wrote.
    choices: the accepted names.

  Returns:
    The hint, to append to an error message.
  """
  close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def parse_arg(arg: str | None, *, variants: Collection[str] = (),
              defaults: Mapping[str, Any] | None = None
              ) -> list[tuple[str, Any]]:
  """Splits a config string into its variants and typed arguments.

  E.g. `parse_arg("epochs=3,demo", variants=["demo"], defaults={"epochs":
  200})` is `[("demo", True), ("epochs", 3)]`.

  Args:
    arg: the config string (`--config=FILE:ARG`'s ARG); None or "" for none.
    variants: the accepted variant names, in the order they apply.
    defaults: the accepted argument names, each with the default that types
      it (None: typed by its literal; see `convert`).

  Returns:
    `(name, value)` per item, in the order they apply whatever the string's
    order: the variants in the order of `variants` (True for each), then
    the arguments with their typed values.

  Raises:
    ValueError: an unknown name, a name given twice, a variant given a
      value, an argument without one, or a value not of its argument's
      type.
  """
  defaults = defaults or {}
  given, values = set(), {}
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    name, has_value, text = (part.strip() for part in item.partition("="))
    if name in given:
      raise ValueError(f"Config item {name!r} is given twice in {arg!r}.")
    given.add(name)
    if not has_value:
      if name in defaults:
        raise ValueError(f"Config argument {name!r} needs a value: "
                         f"{name}=VALUE.")
      if name not in variants:
        raise ValueError(
            f"unknown config variant {name!r}{suggest(name, variants)} "
            f"(variants: {', '.join(variants)}; arguments, as name=value: "
            f"{', '.join(defaults)})")
    elif name in defaults:
      values[name] = convert(name, text, defaults[name])
    elif name in variants:
      raise ValueError(f"Config variant {name!r} takes no value; write it "
                       f"alone: {name}.")
    else:
      raise ValueError(
          f"unknown config argument {name!r}{suggest(name, defaults)} "
          f"(arguments: {', '.join(defaults)})")
  return ([(name, True) for name in variants if name in given]
          + [(name, values[name]) for name in defaults if name in values])


def run_arguments(**more: Argument) -> dict[str, Argument]:
  """The arguments every experiment takes, plus its own.

  `epochs=N` sets `num_epochs` and `seed=N` sets `seed`: the two settings
  a sweep or an ablation varies most, named alike in every file.

  Args:
    **more: further arguments, or replacements (an `epochs` that moves a
      schedule's milestones along).

  Returns:
    name -> `Argument`, for `make_get_config`.
  """
  return {"epochs": Argument("num_epochs"), "seed": Argument("seed"), **more}


def _key_value(config: ConfigDict, key: str) -> Any:
  """The value at dotted `key` of `config`."""
  for part in key.split("."):
    config = config[part]
  return config


def make_get_config(base_config: Callable[[], ConfigDict],
                    variants: Mapping[str, Variant],
                    arguments: Mapping[str, Argument] | None = None
                    ) -> Callable[[str | None], ConfigDict]:
  """The `get_config(arg)` that `--config=FILE:ARG` calls.

  Args:
    base_config: makes the config without any variant.
    variants: name -> function that changes the config in place.
    arguments: name -> `Argument`; a typed argument's default that is None
      and whose target is a key is read from `base_config()` at that key.

  Returns:
    `get_config(arg)`: `base_config()` with the items of config string
    `arg` applied, variants in the order of `variants`, then the arguments
    (see `parse_arg`).

  Raises:
    ValueError: a name is both a variant and an argument.
  """
  arguments = dict(arguments or {})
  both = sorted(set(variants) & set(arguments))
  if both:
    raise ValueError(f"Config names {both} are both variants and arguments.")

  def get_config(arg: str | None = None) -> ConfigDict:
    config = base_config()
    defaults = {}
    for name, argument in arguments.items():
      default = argument.default
      if default is None and isinstance(argument.target, str):
        default = _key_value(config, argument.target)
      defaults[name] = default
    # Everything is parsed before anything is applied: a mistake anywhere in
    # the string fails before a half-made config exists.
    for name, value in parse_arg(arg, variants=variants, defaults=defaults):
      if name in variants:
        variants[name](config)
      else:
        arguments[name].apply(config, value)
    return config

  get_config.__doc__ = (
      "Returns the config with the config string's items applied: the\n"
      "variants in their declared order, then the arguments.\n\n"
      f"Variants: {', '.join(variants) or 'none'}. Arguments (name=value): "
      f"{', '.join(arguments) or 'none'}.")
  return get_config


# ---------------------------------------------------------------------------
# Blocks that several experiments share.


def data(**overrides: Any) -> ConfigDict:
  """The `data` block (host side), ImageNet unless overridden.

  Args:
    **overrides: values that replace the defaults, or keys a job adds (the
      dense probe's masks).

  Returns:
    The block.
  """
  block = dict(
      # A TFDS name, `folder:/path` (images, in class sub-folders for
      # labels; no masks), or the built-in offline `detco_shapes`
      # (detco_jax/data/sources.py).
      dataset="imagenet2012",
      train_split="train",
      eval_split="validation",
      # TFDS data dir; unset: $TFDS_DATA_DIR or the TFDS default. A typed
      # placeholder so that `--config.data.data_dir=...` can set it.
      data_dir=placeholder(str),
      image_key="image",
      label_key="label",
      shuffle_buffer=10_000,
      prefetch=2,             # Batches prefetched per process.
      # Only used by the built-in `detco_shapes` dataset.
      builtin_image_size=64,
      builtin_num_train=10_000,
      builtin_num_test=2_000,
  )
  block.update(overrides)
  return ConfigDict(block)


def eval_views(crop_size: int = 224, resize_size: int = 256) -> ConfigDict:
  """The evaluation views: the shorter side resized, then a centre crop.

  Args:
    crop_size: the square crop's side.
    resize_size: the shorter side before cropping (256 for 224: MoCo's).

  Returns:
    The `eval_views` block.
  """
  return ConfigDict(dict(crop_size=crop_size, resize_size=resize_size))


# The demo's 32 px: pretraining's global views, and the probes' crops (a
# probe sees the backbone at the resolution it learned), cut from 37 px as
# 224 px are from 256.
DEMO_CROP_SIZE = 32
DEMO_RESIZE_SIZE = 37


def knn(**overrides: Any) -> ConfigDict:
  """The kNN block (detco_jax/eval/knn.py): weighted kNN of one stage.

  A subset of the train split is the memory, a subset of the test split is
  classified, both through the test transform (`eval_views`).

  Args:
    **overrides: values that replace the defaults, or keys a job adds
      (pretraining's `every_steps`).

  Returns:
    The block.
  """
  block = dict(stage="res5", k=200, temperature=0.07,
               train_examples=10_000, test_examples=2_000, batch_size=256)
  block.update(overrides)
  return ConfigDict(block)


def add_backbone_source(c: ConfigDict, frozen: bool = True) -> None:
  """Adds a probe's backbone settings: which run, which step, or untrained.

  Args:
    c: the probe's config, changed in place.
    frozen: the backbone is frozen (a probe), so the floor's BN statistics
      are measured on data; False for jobs that train BN (detection).
  """
  # The pretraining run's --workdir (its config.json says the architecture
  # and the input normalisation), or a checkpoint file: a torchvision /
  # MoCo / DetCo .pth(.tar) or a detectron2 .pkl (docs/checkpoints.md).
  c.pretrained = placeholder(str)
  c.pretrained_step = placeholder(int)  # None: its latest checkpoint.
  c.random_init = False                 # The untrained network (the floor).
  # A checkpoint file's settings (detco_jax/pretrained.py FILE_DEFAULTS).
  c.pretrained_file = ConfigDict(dict(
      # The architecture; unset: inferred from the tensors. Set, the file
      # must fit it.
      depth=placeholder(int),
      width=placeholder(int),
      stem=placeholder(str),             # "imagenet" or "cifar".
      # The input the network expects: images scaled to 0..pixel_range,
      # channels in this order, then (x - mean) / std. torchvision's
      # convention, which MoCo's and DetCo's releases follow.
      mean=(0.485, 0.456, 0.406),
      std=(0.229, 0.224, 0.225),
      pixel_range=1.0,
      channels="RGB",                    # Or "BGR".
  ))
  if frozen:
    # The floor's BN running statistics: averaged over this many batches of
    # the probe's training images (0: their init, mean 0 and var 1, which
    # leaves an untrained network unnormalised in evaluation mode).
    c.random_init_bn_batches = 10
    # A file's BN running statistics: 0 takes them from the file (one
    # without them is refused); N > 0 measures them on N batches.
    c.pretrained_file.bn_batches = 0


def builtin_demo(c: ConfigDict) -> None:
  """Points `c.data` at the built-in dataset as the README's demo builds it.

  Args:
    c: the config, changed in place.
  """
  c.data.dataset = BUILTIN_DATASET
  c.data.eval_split = "test"
  c.data.shuffle_buffer = 2_000


def builtin_tiny(c: ConfigDict) -> None:
  """The tests' build of the built-in dataset (tests/conftest.py makes it).

  32 px images, 256 train and 64 test; a `knn` block's subsets shrink to
  fit it.

  Args:
    c: the config (after `builtin_demo`), changed in place.
  """
  c.data.builtin_image_size = 32
  c.data.builtin_num_train = 256
  c.data.builtin_num_test = 64
  c.data.shuffle_buffer = 64
  if "knn" in c:
    c.knn.train_examples = c.data.builtin_num_train
    c.knn.test_examples = c.data.builtin_num_test
    c.knn.batch_size = 32
