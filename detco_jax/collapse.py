"""The collapse monitor: is a contrastive head still telling images apart?

A head whose embeddings have collapsed maps every input to nearly the same
unit vector. Its InfoNCE accuracy against a queue can still read about
1.000: the freshly encoded positive key edges out the staler queue entries
by a hair as the collapsed embedding drifts, so the accuracy alone hides
the collapse. Three measures do not:

- the standard deviation across the batch of the l2-normalised embeddings,
  averaged over dimensions: about 1/sqrt(d) for a healthy head of width d,
  0 when collapsed (the measure of the SimSiam paper and of lightly);
- the margin between the positive's cosine and the hardest queue
  negative's: a hair above 0 in the collapse above;
- the margin between the positive's cosine and the mean negative's.

`embedding_std` and `head_stds` run inside the jitted step (the margins
come with each InfoNCE term, `losses.info_nce_stats`); `Watch` reads a log
window's means on the host and warns once per head or term.
"""

import math
from typing import Mapping

import jax
import jax.numpy as jnp
from absl import logging

from detco_jax.models import heads

# A head warns below this fraction of a healthy std (1/sqrt(d)). The demo's
# collapsed res5 jigsaw head measured 0.02 of it, healthy heads 0.9-0.95.
STD_FRACTION = 0.25
# "Near chance": a term's loss at or above this fraction of ln(K + 1), the
# loss of a query that cannot tell its positive from K negatives.
CHANCE_FRACTION = 0.85
# ... while its accuracy is at least this: only a drift can explain both.
HIGH_ACCURACY = 0.9


def embedding_std(z: jax.Array) -> jax.Array:
  """Std across the batch of l2-normalised embeddings, mean over dimensions.

  Args:
    z: [B, D] embeddings (normalised here again; heads already normalise).

  Returns:
    A float32 scalar: about 1/sqrt(D) for spread-out unit vectors, 0 when
    every row is the same vector. Population std (ddof 0).
  """
  return jnp.mean(jnp.std(heads.l2_normalize(z), axis=0))


def head_stds(embeddings: Mapping[str, Mapping[str, jax.Array]],
              stages: Mapping[str, float]) -> dict[str, jax.Array]:
  """`embedding_std` of every head that the loss uses.

  Args:
    embeddings: `{"global": {stage: [B, D]}, "local": {stage: [B, D]}}`,
      the query encoder's output ("local" may be empty or absent).
    stages: the weighted stages (`config_lib.loss_weights`).

  Returns:
    `{"<stage>/<kind>_std": scalar}`, e.g. "res5/local_std".
  """
  out = {}
  for kind in ("global", "local"):
    for stage in stages:
      if stage in embeddings.get(kind, {}):
        out[f"{stage}/{kind}_std"] = embedding_std(embeddings[kind][stage])
  return out


class Watch:
  """Warns once per head, and once per term, when the window says collapse.

  A head warns when its std falls below `STD_FRACTION / sqrt(embed_dim)`;
  a term warns when its accuracy is at least `HIGH_ACCURACY` while its loss
  is at least `CHANCE_FRACTION * ln(queue_size + 1)`. Before the queue has
  been refilled once with real keys (its first entries are random vectors),
  the term check would compare against noise, so it waits for that step.
  """

  def __init__(self, embed_dim: int, queue_size: int, batch_size: int):
    """Args: the heads' width d, the queue's K and the global batch."""
    self.healthy_std = 1.0 / math.sqrt(embed_dim)
    self.chance = math.log(queue_size + 1)
    self.queue_full_step = -(-queue_size // batch_size)
    self.warned: set[str] = set()

  def check(self, step: int, scalars: Mapping[str, float]) -> list[str]:
    """The new warnings of one log window, each logged once.

    Args:
      step: the window's last step.
      scalars: the window's means ("res5/local_std", "res5/ll",
        "res5/ll_acc", "res5/ll_margin", ...).

    Returns:
      The warning lines issued now (already logged).
    """
    lines = []
    for name, value in scalars.items():
      if name.endswith("_std"):
        lines += self._std(step, name, value)
      elif f"{name}_acc" in scalars:
        lines += self._term(step, name, value, scalars)
    for line in lines:
      logging.warning("%s", line)
    return lines

  def _std(self, step: int, name: str, std: float) -> list[str]:
    head = name[:-len("_std")]
    if head in self.warned or std >= STD_FRACTION * self.healthy_std:
      return []
    self.warned.add(head)
    return [f"Collapse: {head} embeddings at step {step} have std {std:.4f} "
            f"across the batch (healthy about 1/sqrt(d) = "
            f"{self.healthy_std:.3f}); the head maps every image to nearly "
            "the same vector. Heads can recover: see 'Collapse monitor' in "
            "docs/training.md."]

  def _term(self, step: int, term: str, loss: float,
            scalars: Mapping[str, float]) -> list[str]:
    accuracy = scalars[f"{term}_acc"]
    if (term in self.warned or step < self.queue_full_step or
        accuracy < HIGH_ACCURACY or loss < CHANCE_FRACTION * self.chance):
      return []
    self.warned.add(term)
    margin = scalars.get(f"{term}_margin", float("nan"))
    return [f"Collapse: {term} accuracy {accuracy:.3f} at loss {loss:.2f}, "
            f"near chance ln(K+1) = {self.chance:.2f}, at step {step}: the "
            "fresh key beats stale queue entries by a hair (margin to the "
            f"hardest negative {margin:.2g}), not by telling images apart."]
