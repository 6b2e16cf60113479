"""The train state and the jitted DetCo update, in named phases.

One step, all on the device, is the composition of five functions (which
the benchmark times one by one):

  1. `augment`: photometric augmentation of the uint8 views -> I_q, I_k,
     P_q, P_k;
  2. `encode_keys`: the key encoder (EMA parameters, shuffle BN) on I_k and
     P_k;
  3. `loss_and_grads`: the query encoder on I_q and P_q, the InfoNCE terms
     against the queues as they were before this step, the gradient;
  4. `apply_gradients`: the SGD update;
  5. `ema_and_enqueue`: the EMA update and the enqueue of this step's keys.
"""

import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from detco_jax import collapse
from detco_jax import config_lib
from detco_jax import losses
from detco_jax import momentum
from detco_jax import sharding
from detco_jax.data import augment as augment_lib
from detco_jax.models import detco as detco_lib
from detco_jax.models import heads

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; one pytree, donated to the step."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  queues: momentum.Queues


def init_state(config: ml_collections.ConfigDict,
               model: detco_lib.DetCoEncoder,
               tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """A fresh state: query and key encoders equal, queues random.

  Args:
    config: the experiment config.
    model: the encoder.
    tx: the optimiser.
    rng: PRNG key.

  Returns:
    The state (unsharded; see `create_train_state`).
  """
  params_rng, queue_rng = jax.random.split(rng)
  size, patch = config.views.global_size, config.views.patch_size
  views = jnp.zeros((1, size, size, 3), jnp.float32)
  patches = (jnp.zeros((1, heads.NUM_PATCHES, patch, patch, 3), jnp.float32)
             if model.use_local else None)
  variables = model.init(params_rng, views, patches, train=False)
  params, stats = variables["params"], variables["batch_stats"]
  queues = momentum.init_queues(queue_rng, model.stages,
                                config_lib.queue_kinds(config),
                                config.queue_size, model.embed_dim)
  # The key encoder starts as a copy of the query encoder (MoCo).
  copy = lambda t: jax.tree.map(jnp.copy, t)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=stats, opt_state=tx.init(params),
                    ema_params=copy(params), ema_batch_stats=copy(stats),
                    queues=queues)


def create_train_state(config: ml_collections.ConfigDict,
                       model: detco_lib.DetCoEncoder,
                       tx: optax.GradientTransformation, mesh: Mesh,
                       rng: jax.Array) -> tuple[TrainState, Any]:
  """Creates the state already sharded: params replicated, queues over K.

  Args:
    config: the experiment config.
    model: the encoder.
    tx: the optimiser.
    mesh: the device mesh.
    rng: PRNG key (the same on every process).

  Returns:
    (state, shardings): the state and its pytree of shardings.
  """
  init = functools.partial(init_state, config, model, tx)
  shardings = sharding.state_shardings(jax.eval_shape(init, rng), mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


class Views(NamedTuple):
  """A step's float views: I_q, I_k and, with jigsaw terms, P_q, P_k."""
  q_views: jax.Array  # [B, H, W, 3]
  k_views: jax.Array
  q_patches: jax.Array | None  # [B, 9, h, w, 3]; None without patches.
  k_patches: jax.Array | None


def step_rngs(rng: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(augmentation key, shuffle-BN key) of one step.

  Args:
    rng: the run's PRNG key.
    step: the step's number.

  Returns:
    Two keys, from `fold_in(rng, step)`.
  """
  aug_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, step))
  return aug_rng, shuffle_rng


def augment(batch: Batch, rng: jax.Array,
            config: ml_collections.ConfigDict) -> Views:
  """Phase 1: photometric augmentation and normalisation of the uint8 views.

  Args:
    batch: as for `train_step`.
    rng: the augmentation key (`step_rngs`).
    config: the experiment config (`aug`, `views`).

  Returns:
    The float views; the patch sets are None without "local".
  """
  return split_views(augment_lib.augment_views(batch, rng, config.aug,
                                               config.views))


def split_views(views: Batch) -> Views:
  """(I_q, I_k, P_q, P_k) of a batch: view 0 is the query's, 1 the key's.

  Args:
    views: `{"global": [B, 2, H, W, 3], "local": [B, 2, 9, h, w, 3]}`
      ("local" may be absent).

  Returns:
    The views; the patch sets are None without "local".
  """
  g = views["global"]
  if "local" not in views:
    return Views(g[:, 0], g[:, 1], None, None)
  p = views["local"]
  return Views(g[:, 0], g[:, 1], p[:, 0], p[:, 1])


def bn_shuffle(rng: jax.Array, views: jax.Array, patches: jax.Array | None,
               batch_sharding: Any = None
               ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """A random permutation of the batch, applied to the key views and patches.

  `batch_sharding`, when given, splits the permuted batch over the devices
  again: without it XLA keeps the gather's result replicated and runs the
  whole key encoder on every device.

  Args:
    rng: the shuffle key.
    views: [B, ...] key views.
    patches: [B, ...] key patch sets, or None.
    batch_sharding: how batch-sized arrays are split; None outside a mesh.

  Returns:
    (perm, views[perm], patches[perm]).
  """
  perm = jax.random.permutation(rng, views.shape[0])
  views = views[perm]
  patches = None if patches is None else patches[perm]
  if batch_sharding is not None:
    views = jax.lax.with_sharding_constraint(views, batch_sharding)
    if patches is not None:
      patches = jax.lax.with_sharding_constraint(patches, batch_sharding)
  return perm, views, patches


def _shuffled_keys(model, variables, views, patches, rng, shuffle,
                   batch_sharding=None):
  """Key embeddings; with shuffle BN, computed on a permuted batch.

  Permuting the batch before the key encoder puts each key in a different
  BN sub-batch than its query, so the pair cannot match through shared
  batch statistics (MoCo's shuffle BN). The permutation is undone on the
  small [B, D] embeddings.
  """
  if shuffle:
    perm, views, patches = bn_shuffle(rng, views, patches, batch_sharding)
  out, _ = model.apply(variables, views, patches, train=True,
                       mutable=["batch_stats"])
  if shuffle:
    inverse = jnp.argsort(perm)
    out = jax.tree.map(lambda x: x[inverse], out)
  return jax.lax.stop_gradient(out)


def encode_keys(state: TrainState, views: Views, rng: jax.Array, *,
                config: ml_collections.ConfigDict,
                model: detco_lib.DetCoEncoder,
                batch_sharding: Any = None) -> detco_lib.Embeddings:
  """Phase 2: the key encoder (EMA parameters) on I_k and P_k, no gradient.

  Args:
    state: the current state (its EMA params and BN statistics are used;
      the key encoder's BN statistics are not kept, as in MoCo).
    views: from `augment`.
    rng: the shuffle key (`step_rngs`).
    config: the experiment config (`bn == "shuffle"`: shuffle BN).
    model: the encoder.
    batch_sharding: as for `bn_shuffle`.

  Returns:
    The keys, `{"global": {stage: [B, D]}, "local": {stage: [B, D]}}`.
  """
  return _shuffled_keys(
      model, {"params": state.ema_params, "batch_stats": state.ema_batch_stats},
      views.k_views, views.k_patches, rng, shuffle=config.bn == "shuffle",
      batch_sharding=batch_sharding)


def contrastive_loss(queries: detco_lib.Embeddings,
                     keys: detco_lib.Embeddings, queues: momentum.Queues,
                     config: ml_collections.ConfigDict
                     ) -> tuple[jax.Array, Metrics]:
  """The config's DetCo loss terms of embedded queries against keys.

  Args:
    queries: the query encoder's embeddings.
    keys: the key encoder's (`encode_keys`).
    queues: the queues as they were before this step.
    config: the experiment config (`loss`).

  Returns:
    (total, metrics): the weighted sum, each term with its accuracy and
    margins, and the collapse monitor's std of each head's queries.
  """
  weights = config_lib.loss_weights(config)
  total, metrics = losses.detco_loss(
      queries["global"], queries["local"], keys["global"], keys["local"],
      queues["global"], queues["local"],
      temperature=config.loss.temperature, weights=weights,
      terms=config_lib.loss_terms(config))
  metrics.update(collapse.head_stds(queries, weights))
  return total, metrics


def loss_and_grads(state: TrainState, views: Views,
                   keys: detco_lib.Embeddings, *,
                   config: ml_collections.ConfigDict,
                   model: detco_lib.DetCoEncoder
                   ) -> tuple[jax.Array, Metrics, Any, Any]:
  """Phase 3: the query encoder on I_q and P_q, the loss and its gradient.

  Args:
    state: the current state.
    views: from `augment`.
    keys: from `encode_keys`.
    config: the experiment config.
    model: the encoder.

  Returns:
    (loss, metrics, batch_stats, grads): the total loss, its terms, the
    query encoder's updated BN statistics and d loss / d params.
  """
  def loss_fn(params):
    out, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        views.q_views, views.q_patches, train=True, mutable=["batch_stats"])
    total, metrics = contrastive_loss(out, keys, state.queues, config)
    return total, (metrics, updates["batch_stats"])

  (total, (metrics, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  return total, metrics, batch_stats, grads


def apply_gradients(state: TrainState, grads: Any, batch_stats: Any, *,
                    tx: optax.GradientTransformation) -> TrainState:
  """Phase 4: the optimiser update of the query encoder.

  Args:
    state: the current state.
    grads: from `loss_and_grads`.
    batch_stats: the query encoder's new BN statistics, from the same.
    tx: the optimiser.

  Returns:
    The state with new params, opt_state and batch_stats (step unchanged).
  """
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=opt_state)


def ema_and_enqueue(state: TrainState, keys: detco_lib.Embeddings, *,
                    config: ml_collections.ConfigDict
                    ) -> tuple[TrainState, jax.Array]:
  """Phase 5, the last: EMA of the key encoder, enqueue, next step.

  Args:
    state: the state after `apply_gradients` (the EMA moves towards its
      new params and BN statistics).
    keys: from `encode_keys`, written over the oldest queue entries.
    config: the experiment config (`ema_momentum`, `ema_cosine`).

  Returns:
    (state, momentum): the state with `step` advanced, and the EMA
    momentum used.
  """
  m = momentum.momentum_at(state.step, config_lib.total_steps(config),
                           config.ema_momentum, config.ema_cosine)
  return state.replace(
      step=state.step + 1,
      ema_params=momentum.ema_update(state.ema_params, state.params, m),
      ema_batch_stats=momentum.ema_update(state.ema_batch_stats,
                                          state.batch_stats, m),
      queues=momentum.enqueue(state.queues, keys)), m


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               config: ml_collections.ConfigDict,
               model: detco_lib.DetCoEncoder,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule,
               batch_sharding: Any = None) -> tuple[TrainState, Metrics]:
  """One DetCo update (un-jitted; see `make_train_step`): the five phases.

  Args:
    state: the current state.
    batch: uint8 `{"global": [B, 2, H, W, 3], "local": [B, 2, 9, h, w, 3]}`
      ("local" absent when no term uses patches).
    rng: the run's PRNG key; this step uses `fold_in(rng, step)`.
    config: the experiment config.
    model: the encoder.
    tx: the optimiser.
    schedule: the learning-rate schedule, for the metrics.
    batch_sharding: how batch-sized arrays are split over devices (keeps the
      shuffled key batch split); None outside a mesh.

  Returns:
    (new state, metrics): scalar metrics "loss", "stage/term",
    "stage/term_acc", "stage/term_margin", "stage/term_mean_margin",
    "stage/kind_std", "lr", "grad_norm" and "ema_momentum".
  """
  aug_rng, shuffle_rng = step_rngs(rng, state.step)
  views = augment(batch, aug_rng, config)
  keys = encode_keys(state, views, shuffle_rng, config=config, model=model,
                     batch_sharding=batch_sharding)
  total, metrics, batch_stats, grads = loss_and_grads(
      state, views, keys, config=config, model=model)
  new_state, m = ema_and_enqueue(
      apply_gradients(state, grads, batch_stats, tx=tx), keys, config=config)
  metrics.update(loss=total, lr=schedule(state.step),
                 grad_norm=optax.tree.norm(grads), ema_momentum=m)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict,
                    model: detco_lib.DetCoEncoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: Any
                    ) -> Callable[[TrainState, Batch, jax.Array],
                                  tuple[TrainState, Metrics]]:
  """The jitted step: state donated, batch split over `data`.

  Args:
    config, model, tx, schedule: as for `train_step`.
    mesh: the device mesh.
    state_shardings: from `create_train_state`.

  Returns:
    `step(state, batch, rng) -> (state, metrics)`.
  """
  fn = functools.partial(train_step, config=config, model=model, tx=tx,
                         schedule=schedule,
                         batch_sharding=sharding.batch_sharded(mesh))
  return sharding.jit_train_step(fn, mesh, state_shardings)


def check_finite(loss: float, step: int) -> None:
  """Refuses to go on from a non-finite loss.

  Args:
    loss: the loss of `step`, fetched to the host.
    step: the step that produced it.

  Raises:
    FloatingPointError: naming the step, when the loss is NaN or infinite.
  """
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Loss is {loss} at step {step}; stopping before the state is saved. "
        "The last checkpoint is intact: resume from it with a lower base_lr "
        "(or warmup_epochs > 0), and check the input data.")
