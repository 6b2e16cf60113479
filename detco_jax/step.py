"""The train state and the jitted DetCo update.

One step, all on the device: photometric augmentation of the uint8 views,
the key encoder (EMA parameters, shuffle BN) on I_k and P_k, the query
encoder on I_q and P_q with gradient, the InfoNCE terms against the queues
as they were before this step, the SGD update, the EMA update and the
enqueue of this step's keys.
"""

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from detco_jax import config_lib
from detco_jax import losses
from detco_jax import momentum
from detco_jax import sharding
from detco_jax.data import augment
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


def _split_views(views: Batch) -> tuple[jax.Array, ...]:
  """(I_q, I_k, P_q, P_k); the patch sets are None without local views."""
  g = views["global"]
  if "local" not in views:
    return g[:, 0], g[:, 1], None, None
  p = views["local"]
  return g[:, 0], g[:, 1], p[:, 0], p[:, 1]


def _shuffled_keys(model, variables, views, patches, rng, shuffle,
                   batch_sharding=None):
  """Key embeddings; with shuffle BN, computed on a permuted batch.

  Permuting the batch before the key encoder puts each key in a different
  BN sub-batch than its query, so the pair cannot match through shared
  batch statistics (MoCo's shuffle BN). The permutation is undone on the
  small [B, D] embeddings. `batch_sharding`, when given, splits the permuted
  batch over the devices again: without it XLA keeps the gather's result
  replicated and runs the whole key encoder on every device.
  """
  if shuffle:
    perm = jax.random.permutation(rng, views.shape[0])
    views = views[perm]
    patches = None if patches is None else patches[perm]
    if batch_sharding is not None:
      views = jax.lax.with_sharding_constraint(views, batch_sharding)
      if patches is not None:
        patches = jax.lax.with_sharding_constraint(patches, batch_sharding)
  out, _ = model.apply(variables, views, patches, train=True,
                       mutable=["batch_stats"])
  if shuffle:
    inverse = jnp.argsort(perm)
    out = jax.tree.map(lambda x: x[inverse], out)
  return jax.lax.stop_gradient(out)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               config: ml_collections.ConfigDict,
               model: detco_lib.DetCoEncoder,
               tx: optax.GradientTransformation,
               schedule: optax.Schedule,
               batch_sharding: Any = None) -> tuple[TrainState, Metrics]:
  """One DetCo update (un-jitted; see `make_train_step`).

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
    "stage/term_acc", "lr", "grad_norm" and "ema_momentum".
  """
  step_rng = jax.random.fold_in(rng, state.step)
  aug_rng, shuffle_rng = jax.random.split(step_rng)
  views = augment.augment_views(batch, aug_rng, config.aug, config.views)
  q_views, k_views, q_patches, k_patches = _split_views(views)

  keys = _shuffled_keys(
      model, {"params": state.ema_params, "batch_stats": state.ema_batch_stats},
      k_views, k_patches, shuffle_rng, shuffle=config.bn == "shuffle",
      batch_sharding=batch_sharding)

  def loss_fn(params):
    out, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        q_views, q_patches, train=True, mutable=["batch_stats"])
    total, metrics = losses.detco_loss(
        out["global"], out["local"], keys["global"], keys["local"],
        state.queues["global"], state.queues["local"],
        temperature=config.loss.temperature,
        weights=config_lib.loss_weights(config),
        terms=config_lib.loss_terms(config))
    return total, (metrics, updates["batch_stats"])

  (total, (metrics, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  m = momentum.momentum_at(state.step, config_lib.total_steps(config),
                           config.ema_momentum, config.ema_cosine)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=momentum.ema_update(state.ema_params, params, m),
      ema_batch_stats=momentum.ema_update(state.ema_batch_stats,
                                          batch_stats, m),
      queues=momentum.enqueue(state.queues, keys))
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
  return jax.jit(
      fn,
      in_shardings=(state_shardings, sharding.batch_sharded(mesh),
                    sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


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
