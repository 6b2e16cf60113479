"""InfoNCE against a negative queue, and DetCo's multi-level loss.

Every DetCo term is MoCo's InfoNCE:

  L(q, k+, Q) = -log( e^{q.k+/t} / (e^{q.k+/t} + sum_{n in Q} e^{q.n/t}) )

on unit vectors. For each weighted stage i the loss adds
  gg: q_g(I_q) vs k_g(I_k), negatives from the global queue of stage i;
  ll: q_l(P_q) vs k_l(P_k), negatives from the local queue of stage i;
  gl: q_l(P_q) vs k_g(I_k), negatives from the global queue of stage i;
and, only if asked for (not in the paper), the mirror term
  lg: q_g(I_q) vs k_l(P_k), negatives from the local queue of stage i.
MoCo v2 is weights={"res5": 1} with terms=("gg",).
"""

from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

# term -> (query kind, key kind); the negatives come from the key's kind.
TERMS: Mapping[str, tuple[str, str]] = {
    "gg": ("global", "global"),
    "ll": ("local", "local"),
    "gl": ("local", "global"),
    "lg": ("global", "local"),
}


def _logits(q, k_pos, queue, temperature):
  """Positive logits [B] and negative logits [B, K], float32, over t."""
  q = q.astype(jnp.float32)
  pos = jnp.einsum("bd,bd->b", q, k_pos.astype(jnp.float32))
  neg = jnp.einsum("bd,kd->bk", q, queue.astype(jnp.float32))
  return pos / temperature, neg / temperature


class InfoNCEStats(NamedTuple):
  """One InfoNCE term per example, with what the collapse monitor reads.

  Attributes:
    loss: [B] the loss with the positive logit first.
    correct: [B] float32, 1 where the positive out-scores every negative.
    margin: [B] the positive's cosine minus the hardest negative's.
    mean_margin: [B] the positive's cosine minus the mean negative's.
  """
  loss: jax.Array
  correct: jax.Array
  margin: jax.Array
  mean_margin: jax.Array


def info_nce_stats(q: jax.Array, k_pos: jax.Array, queue: jax.Array,
                   temperature: float) -> InfoNCEStats:
  """InfoNCE per example, its top-1 hit and its cosine margins.

  Args:
    q: queries [B, D].
    k_pos: positive keys [B, D] (treated as constants by the caller).
    queue: negatives [K, D].
    temperature: softmax temperature t.

  Returns:
    The per-example loss, hit and margins (`InfoNCEStats`).
  """
  pos, neg = _logits(q, k_pos, queue, temperature)
  # log(e^pos + sum e^neg) without materialising the [B, K+1] concatenation.
  lse = jnp.logaddexp(pos, jax.nn.logsumexp(neg, axis=1))
  hardest = neg.max(axis=1)
  # Margins in cosine units: logits are cosines over t.
  return InfoNCEStats(
      loss=lse - pos, correct=(pos >= hardest).astype(jnp.float32),
      margin=(pos - hardest) * temperature,
      mean_margin=(pos - neg.mean(axis=1)) * temperature)


def info_nce_and_accuracy(
    q: jax.Array, k_pos: jax.Array, queue: jax.Array,
    temperature: float) -> tuple[jax.Array, jax.Array]:
  """`info_nce_stats`'s loss [B] and top-1 hit [B] alone (same arguments)."""
  stats = info_nce_stats(q, k_pos, queue, temperature)
  return stats.loss, stats.correct


def info_nce(q: jax.Array, k_pos: jax.Array, queue: jax.Array,
             temperature: float) -> jax.Array:
  """InfoNCE of each query against its positive key and a queue.

  Args:
    q: queries [B, D].
    k_pos: positive keys [B, D].
    queue: negatives [K, D].
    temperature: softmax temperature t.

  Returns:
    The loss of each example, [B] float32.
  """
  return info_nce_and_accuracy(q, k_pos, queue, temperature)[0]


def detco_loss(
    q_global: Mapping[str, jax.Array],
    q_local: Mapping[str, jax.Array],
    k_global: Mapping[str, jax.Array],
    k_local: Mapping[str, jax.Array],
    global_queues: Mapping[str, jax.Array],
    local_queues: Mapping[str, jax.Array],
    *,
    temperature: float,
    weights: Mapping[str, float],
    terms: Sequence[str] = ("gg", "ll", "gl"),
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DetCo's loss: sum over stages of w_i * (sum of the chosen terms).

  Args:
    q_global, q_local: query embeddings per stage, [B, D] each.
    k_global, k_local: key embeddings per stage, [B, D] each.
    global_queues, local_queues: negative queues per stage, [K, D] each.
    temperature: softmax temperature.
    weights: stage -> weight; only stages present here contribute.
    terms: any of "gg", "ll", "gl", "lg" (see the module docstring).

  Returns:
    (total, metrics): the scalar loss and, per stage s and term t, the mean
    term under "s/t", its top-1 accuracy under "s/t_acc" and its mean
    cosine margins to the hardest and to the mean negative under
    "s/t_margin" and "s/t_mean_margin" (`detco_jax.collapse`).
  """
  unknown = set(terms) - set(TERMS)
  if unknown:
    raise ValueError(f"Unknown loss terms {sorted(unknown)}; choose from "
                     f"{sorted(TERMS)}.")
  queries = {"global": q_global, "local": q_local}
  keys = {"global": k_global, "local": k_local}
  queues = {"global": global_queues, "local": local_queues}
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for stage, weight in weights.items():
    for term in terms:
      q_kind, k_kind = TERMS[term]
      stats = info_nce_stats(queries[q_kind][stage], keys[k_kind][stage],
                             queues[k_kind][stage], temperature)
      metrics[f"{stage}/{term}"] = stats.loss.mean()
      metrics[f"{stage}/{term}_acc"] = stats.correct.mean()
      metrics[f"{stage}/{term}_margin"] = stats.margin.mean()
      metrics[f"{stage}/{term}_mean_margin"] = stats.mean_margin.mean()
      total = total + weight * stats.loss.mean()
  return total, metrics
