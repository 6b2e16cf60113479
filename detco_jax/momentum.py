"""The momentum (key) encoder as EMA tree arithmetic, and the negative queues.

Parameters and batch statistics of the key encoder are plain pytrees updated
as `k = m * k + (1 - m) * q`. The queues are a dict of [K, D] arrays, one per
(kind, stage), that share one write pointer; the train step keeps them sharded
along K.
"""

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from detco_jax.models import heads

Queues = dict[str, Any]  # {"global": {stage: [K, D]}, "local": {...}, "ptr"}
KINDS = ("global", "local")


def ema_update(ema: Any, online: Any, momentum: jax.Array | float) -> Any:
  """One EMA step of a pytree: `m * ema + (1 - m) * online`.

  Args:
    ema: the momentum (key) tree.
    online: the query tree, same structure.
    momentum: m in [0, 1]; 1 keeps `ema` unchanged.

  Returns:
    The updated tree, in `ema`'s dtypes.
  """
  return jax.tree.map(
      lambda e, o: (momentum * e + (1.0 - momentum) * o).astype(e.dtype),
      ema, online)


def momentum_at(step: jax.Array | int, total_steps: int, base: float,
                cosine: bool) -> jax.Array:
  """The EMA momentum at `step`.

  Args:
    step: the current step.
    total_steps: length of the run.
    base: MoCo's m (0.999).
    cosine: if True, BYOL's schedule: `1 - (1 - base) * (cos(pi t / T) + 1)/2`,
      rising from `base` to 1; else constant `base`.

  Returns:
    The momentum, a float32 scalar.
  """
  if not cosine:
    return jnp.asarray(base, jnp.float32)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 1.)
  return 1.0 - (1.0 - base) * (jnp.cos(math.pi * frac) + 1.0) / 2.0


def init_queues(rng: jax.Array, stages: Sequence[str], kinds: Sequence[str],
                size: int, dim: int) -> Queues:
  """Random unit-vector queues for each (kind, stage), pointer at 0.

  Args:
    rng: PRNG key.
    stages: stages with heads, e.g. ("res2", ..., "res5").
    kinds: "global" and/or "local".
    size: K, entries per queue.
    dim: embedding size D.

  Returns:
    `{"global": {stage: [K, D]}, "local": {...}, "ptr": int32 scalar}`.
  """
  queues: Queues = {"ptr": jnp.zeros((), jnp.int32)}
  for i, kind in enumerate(KINDS):
    queues[kind] = {}
    if kind not in kinds:
      continue
    for j, stage in enumerate(stages):
      key = jax.random.fold_in(rng, i * 100 + j)
      queues[kind][stage] = heads.l2_normalize(
          jax.random.normal(key, (size, dim), jnp.float32))
  return queues


def enqueue(queues: Queues, keys: Mapping[str, Mapping[str, jax.Array]]
            ) -> Queues:
  """Writes this step's keys over the oldest entries and moves the pointer.

  Args:
    queues: as made by `init_queues`.
    keys: `{"global": {stage: [B, D]}, "local": {...}}`; every queue present
      in `queues` must have its keys here. B divides K (`config_checks.check_queue_size`).

  Returns:
    The new queues; the entries [ptr, ptr + B) hold the keys in batch order.
  """
  ptr = queues["ptr"]
  new: Queues = {}
  for kind in KINDS:
    new[kind] = {
        stage: jax.lax.dynamic_update_slice_in_dim(
            queue, keys[kind][stage].astype(queue.dtype), ptr, axis=0)
        for stage, queue in queues[kind].items()}
  size, batch = next((q.shape[0], keys[kind][s].shape[0])
                     for kind in KINDS for s, q in queues[kind].items())
  new["ptr"] = (ptr + batch) % size
  return new
