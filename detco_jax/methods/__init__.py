"""Pretraining methods: DetCo and the classic pretext tasks.

`config.method` picks one: "detco" (the default; with the `mocov2` variant,
MoCo v2), "rotation", "jigsaw_perm" or "rel_patch"; "supervised" trains on the
dataset's label, the reference that the others are compared with. Each is a `base.Method`
that the pretraining job (`detco_jax.train`) runs through the same loop,
data sources, augmentation, sharding and checkpoints.
"""

import ml_collections

from detco_jax.methods import base
from detco_jax.methods import detco
from detco_jax.methods import jigsaw_perm
from detco_jax.methods import rel_patch
from detco_jax.methods import rotation
from detco_jax.methods import supervised

METHODS = {m.name: m for m in (detco.METHOD, rotation.METHOD,
                                jigsaw_perm.METHOD, rel_patch.METHOD,
                                supervised.METHOD)}


def get(config: ml_collections.ConfigDict) -> base.Method:
  """The method that `config.method` names ("detco" when unset).

  Args:
    config: the experiment config.

  Returns:
    The method.

  Raises:
    ValueError: an unknown name; the message lists the choices.
  """
  name = config.get("method", "detco")
  if name not in METHODS:
    raise ValueError(f"Bad config: method={name!r} must be one of "
                     f"{sorted(METHODS)}.")
  return METHODS[name]
