"""What the classic pretext tasks share: a classifier on the ResNet, and its step.

Rotation, jigsaw permutation and relative patch location all turn an image
into a few inputs (whole views or tiles) and a label, and train the ResNet
with a classifier that reads the pooled res5 features of every input. A
task module (`rotation`, `jigsaw_perm`, `rel_patch`) says only what differs:
its host views, its class count, its input shapes and its loss. This module
turns a `Task` into a `base.Method`: the same backbone, sources,
device-side photometric augmentation, sharding, checkpoints, loop and logs
as DetCo.

Batches from the host are `{"inputs": uint8 [B, m, n, s, s, 3], "label":
int32 [B, m]}`: m examples per image (4 for rotation by all four angles,
else 1), each of n inputs of side s (1 view, 9 tiles or 2 patches).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from detco_jax import config_lib
from detco_jax import sharding
from detco_jax import visualize
from detco_jax.data import augment as augment_lib
from detco_jax.data import pipeline
from detco_jax.methods import base
from detco_jax.models import resnet

Config = ml_collections.ConfigDict
Batch = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, base.Metrics]]

# The accuracy every task logs: on the batch it trained on, in [0, 1].
ACCURACY = "pretext_acc"


def cross_entropy(logits: jax.Array,
                  labels: jax.Array) -> tuple[jax.Array, base.Metrics]:
  """Mean softmax cross-entropy, and the accuracy of the arg-max.

  Args:
    logits: float32 [E, K].
    labels: int32 [E] in [0, K).

  Returns:
    (loss, {"pretext_acc": accuracy}).
  """
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
  return loss.mean(), {ACCURACY: accuracy}


@dataclasses.dataclass(frozen=True)
class Task:
  """One classification pretext task.

  Attributes:
    name: its `config.method` value.
    num_classes: `num_classes(config)`: classes of the label.
    input_shape: `input_shape(config) -> (m, n, s)`, see the module doc.
    example_views: `example_views(config) -> (image, seed) -> {"inputs":
      uint8 [m, n, s, s, 3], "label": int32 [m]}` (tf graph code); or a
      `pipeline.LabelledViews` of `{"inputs"}` alone, m = 1, for a task
      whose label is the dataset's (`supervised`).
    blur_side: `blur_side(config)`: the side, in pixels, of the image the
      inputs were cut from; blur is scaled to it, as for DetCo's patches.
    default_hidden: `default_hidden(config) -> (tile_hidden, hidden)`, the
      head's widths when `pretext.tile_hidden` / `pretext.hidden` are unset.
    validate: `validate(config)`, the task's own checks (ValueError).
    loss: `loss(logits, labels) -> (loss, metrics)`.
  """
  name: str
  num_classes: Callable[[Config], int]
  input_shape: Callable[[Config], tuple[int, int, int]]
  example_views: Callable[[Config], pipeline.ExampleViews
                           | pipeline.LabelledViews]
  blur_side: Callable[[Config], int]
  default_hidden: Callable[[Config], tuple[int, int]]
  validate: Callable[[Config], None] = lambda config: None
  loss: LossFn = cross_entropy


def res5_width(config: Config) -> int:
  """The width of the config's res5 global head (2048 at ResNet-50 scale):
  the scale the pretext heads' default widths follow."""
  return int(config.model.global_hidden["res5"])


# ----------------------------------------------------------------------------
# Model.


class ClassifierHead(nn.Module):
  """Shared per-input layer, concatenation, hidden layer, logits.

  Noroozi & Favaro's and Doersch et al.'s heads: each input's features go
  through one shared layer (`tile_hidden`; 0: none), the results of an
  example are concatenated, then a hidden layer (`hidden`; 0: none) and a
  linear classifier. With one input and no tile layer this is an MLP (or a
  linear head) on the pooled features.

  Attributes:
    tile_hidden: width of the shared per-input layer; 0 leaves it out.
    hidden: width of the hidden layer; 0 leaves it out.
    num_classes: logits.
    dtype: compute dtype.
  """
  tile_hidden: int
  hidden: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """Logits of examples from their inputs' features.

    Args:
      features: [E, n, C] pooled features of each example's n inputs.

    Returns:
      float32 [E, num_classes].
    """
    x = features
    if self.tile_hidden:
      x = nn.relu(nn.Dense(self.tile_hidden, dtype=self.dtype,
                           name="tile")(x))
    x = x.reshape((x.shape[0], -1))
    if self.hidden:
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    name="logits")(x).astype(jnp.float32)


class PretextNet(nn.Module):
  """The ResNet (as `backbone`, for the probes) and a classifier head.

  Attributes:
    depth, width, stem, bn_groups, dtype, remat: the ResNet's.
    head: the classifier.
  """
  depth: int
  width: int
  stem: str
  bn_groups: int
  head: ClassifierHead
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.backbone = resnet.ResNet(self.depth, self.width, self.stem,
                                  self.bn_groups, self.dtype, self.remat)

  def __call__(self, inputs: jax.Array, train: bool) -> jax.Array:
    """Logits of examples of n inputs each.

    Args:
      inputs: [E, n, s, s, 3] normalised inputs.
      train: batch statistics in BN (and running-average updates).

    Returns:
      float32 [E, num_classes].
    """
    e, n = inputs.shape[:2]
    maps = self.backbone(inputs.reshape((e * n,) + inputs.shape[2:]), train)
    pooled = jnp.mean(maps["res5"].astype(jnp.float32), axis=(1, 2))
    return self.head(pooled.reshape((e, n, -1)))


def build_model(config: Config, task: Task) -> PretextNet:
  """The network of `task` that `config.model` and `config.pretext` give."""
  m, p = config.model, config.pretext
  tile_default, hidden_default = task.default_hidden(config)
  tile_hidden = tile_default if p.get("tile_hidden") is None else p.tile_hidden
  hidden = hidden_default if p.get("hidden") is None else p.hidden
  head = ClassifierHead(int(tile_hidden), int(hidden),
                        task.num_classes(config), config_lib.DTYPES[m.dtype])
  return PretextNet(depth=m.depth, width=m.width, stem=m.stem,
                    bn_groups=config_lib.bn_groups(config), head=head,
                    dtype=config_lib.DTYPES[m.dtype], remat=m.remat)


# ----------------------------------------------------------------------------
# State and step.


@flax.struct.dataclass
class PretextState:
  """A pretext run's whole state; one pytree, donated to the step."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def create_state(config: Config, task: Task, model: PretextNet,
                 tx: optax.GradientTransformation, mesh: Mesh,
                 rng: jax.Array) -> tuple[PretextState, Any]:
  """A fresh state, created already sharded (all replicated).

  Args:
    config: the experiment config.
    task: the pretext task.
    model: its network.
    tx: the optimiser.
    mesh: the device mesh.
    rng: PRNG key (the same on every process).

  Returns:
    (state, shardings).
  """
  _, n, s = task.input_shape(config)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, n, s, s, 3), jnp.float32),
                           train=False)
    params = variables["params"]
    return PretextState(step=jnp.zeros((), jnp.int32), params=params,
                        batch_stats=variables["batch_stats"],
                        opt_state=tx.init(params))

  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng), shardings


def augment_inputs(inputs: jax.Array, rng: jax.Array, aug: Config,
                   blur_side: int) -> jax.Array:
  """Photometric augmentation and normalisation, one draw per input.

  Each input (view, tile or patch) is jittered on its own: tiles that share
  colour statistics would let the classifier match them by colour rather
  than by content, the low-level cue Noroozi & Favaro and Doersch et al.
  guard against.

  Args:
    inputs: uint8 [B, m, n, s, s, 3].
    rng: the augmentation key.
    aug: the `aug` config section (RandAugment is not applied).
    blur_side: side of the image the inputs were cut from (blur scale).

  Returns:
    float32 [B * m, n, s, s, 3], normalised.
  """
  b, m, n, s = inputs.shape[:4]
  x = augment_lib.augment_group_batch(
      inputs.reshape((b * m * n, 1) + inputs.shape[3:]), rng, aug,
      blur_sigma=augment_lib.blur_sigma_for(aug.blur_sigma, blur_side),
      blur_kernel_size=min(
          augment_lib.blur_kernel_size_for(blur_side, aug.blur_kernel_frac),
          _largest_odd(s)))
  return x.reshape((b * m, n) + inputs.shape[3:])


def _largest_odd(n: int) -> int:
  """The largest odd number <= n: a blur kernel no wider than the input."""
  return n if n % 2 else n - 1


def train_step(state: PretextState, batch: Batch, rng: jax.Array, *,
               config: Config, task: Task, model: PretextNet,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[PretextState, base.Metrics]:
  """One update of a pretext task (un-jitted; see `make_train_step`).

  Args:
    state: the current state.
    batch: `{"inputs": uint8 [B, m, n, s, s, 3], "label": int32 [B, m]}`.
    rng: the run's PRNG key; this step uses `fold_in(rng, step)`.
    config: the experiment config.
    task: the pretext task.
    model: its network.
    tx: the optimiser.
    schedule: the learning-rate schedule, for the metrics.

  Returns:
    (new state, metrics): "loss", "pretext_acc", "lr" and "grad_norm".
  """
  inputs = augment_inputs(batch["inputs"], jax.random.fold_in(rng, state.step),
                          config.aug, task.blur_side(config))
  labels = batch["label"].reshape(-1)

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, inputs,
        train=True, mutable=["batch_stats"])
    loss, metrics = task.loss(logits, labels)
    return loss, (metrics, updates["batch_stats"])

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1,
                            params=optax.apply_updates(state.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)
  metrics.update(loss=loss, lr=schedule(state.step),
                 grad_norm=optax.tree.norm(grads))
  return new_state, metrics


def make_train_step(config: Config, task: Task, model: PretextNet,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: Any) -> base.StepFn:
  """The jitted step: state donated, batch split over `data`.

  Args:
    config, task, model, tx, schedule: as for `train_step`.
    mesh: the device mesh.
    state_shardings: from `create_state`.

  Returns:
    `step(state, batch, rng) -> (state, metrics)`.
  """
  fn = functools.partial(train_step, config=config, task=task, model=model,
                         tx=tx, schedule=schedule)
  return sharding.jit_train_step(fn, mesh, state_shardings)


# ----------------------------------------------------------------------------
# The method.


def validate(config: Config, task: Task, num_devices: int,
             process_count: int = 1) -> None:
  """The shared checks, then the task's.

  Raises:
    ValueError: naming the key and the fix.
  """
  config_lib.validate_backbone(config, num_devices, process_count)
  if "pretext" not in config:
    raise ValueError(
        f"Bad config: method={config.method!r} needs its `pretext` block; "
        f"add the variant to the config string, e.g. "
        f"--config=configs/detco.py:demo,{task.name}.")
  if config.aug.randaugment:
    raise ValueError(
        "Bad config: aug.randaugment applies to DetCo's global views only; "
        f"set --config.aug.randaugment=False for method={task.name!r}.")
  task.validate(config)


def build(config: Config, mesh: Mesh, rng: jax.Array, *,
          task: Task) -> tuple[PretextState, base.StepFn]:
  """The sharded state of `task` and its jitted step."""
  model = build_model(config, task)
  tx, schedule = config_lib.build_optimizer(config)
  state, shardings = create_state(config, task, model, tx, mesh, rng)
  return state, make_train_step(config, task, model, tx, schedule, mesh,
                                shardings)


def views_panel(config: Config, batch: dict[str, np.ndarray], *,
                task: Task) -> np.ndarray:
  """The first image's augmented inputs in a row, for TensorBoard."""
  first = np.asarray(batch["inputs"][:1])
  inputs = jax.jit(lambda x: augment_inputs(
      x, jax.random.key(config.seed), config.aug, task.blur_side(config)))(
          first)
  tiles = np.asarray(inputs).reshape((-1,) + first.shape[3:])
  return visualize.views_panel(tiles, None, config.aug.mean, config.aug.std)


def method(task: Task) -> base.Method:
  """`task` as a pretraining method."""
  return base.Method(
      name=task.name,
      validate=lambda config, n, p: validate(config, task, n, p),
      example_views=task.example_views,
      build=functools.partial(build, task=task),
      views_panel=functools.partial(views_panel, task=task),
      console=(ACCURACY,))
