"""Jigsaw permutation (Noroozi & Favaro, ECCV 2016) as a pretraining method.

Host views: the 3 x 3 tiles of DetCo's jigsaw geometry (a crop of at least
`views.local_min_area`, resized to `views.local_size`, a random
`views.patch_size` crop inside each cell, so tiles never touch), put in the
order of one of `pretext.num_permutations` permutations drawn uniformly;
the permutation's index is the label. The set is the paper's greedy
maximal-Hamming-distance selection (`permutations.table`, stored as data
for the default 100 and seed 0). Head: a shared layer per tile
(`pretext.tile_hidden`), the 9 results concatenated, a hidden layer
(`pretext.hidden`) and an N-way classifier. Loss: cross-entropy.
"""

import tensorflow as tf

from detco_jax.data import pipeline
from detco_jax.data import views as views_lib
from detco_jax.methods import permutations
from detco_jax.methods import pretext

GRID = 3
# Sub-seed tag of the permutation's index, apart from the views' own tags.
_LABEL_SEED = 10


def table(config: pretext.Config):
  """The permutation set, int32 [N, 9]: tile k shows cell `table[i, k]`."""
  return permutations.table(config.pretext.num_permutations,
                            config.pretext.permutation_seed)


def example_views(config: pretext.Config) -> pipeline.ExampleViews:
  """`(image, seed) -> {"inputs": uint8 [1, 9, p, p, 3], "label": [1]}`.

  Args:
    config: the experiment config (`views`, `pretext.num_permutations`,
      `pretext.permutation_seed`).

  Returns:
    The host views of one example.
  """
  spec = views_lib.ViewSpec.from_config(config.views)
  perms = table(config)
  num = len(perms)

  def make(image, seed):
    label = tf.random.stateless_uniform(
        [1], tf.random.experimental.stateless_fold_in(seed, _LABEL_SEED),
        minval=0, maxval=num, dtype=tf.int32)
    perm = tf.gather(tf.constant(perms, tf.int32), label)
    tiles = views_lib.jigsaw_views(image, seed, spec, num_sets=1, perm=perm)
    return {"inputs": tiles, "label": label}

  return make


def validate(config: pretext.Config) -> None:
  """A 3 x 3 grid, views the shared `ViewSpec` accepts, N permutations."""
  v, p = config.views, config.pretext
  if v.grid != GRID:
    raise ValueError(f"Bad config: method='jigsaw_perm' uses a {GRID} x "
                     f"{GRID} grid; set --config.views.grid={GRID}.")
  # The tile-fits-its-cell check and the others of DetCo's jigsaw views.
  views_lib.ViewSpec.from_config(v)
  if not 2 <= p.num_permutations <= 1000:
    raise ValueError(
        f"Bad config: pretext.num_permutations={p.num_permutations} must be "
        "in [2, 1000] (the paper uses 100 to 1000).")


TASK = pretext.Task(
    name="jigsaw_perm",
    num_classes=lambda config: config.pretext.num_permutations,
    input_shape=lambda config: (1, GRID * GRID, config.views.patch_size),
    example_views=example_views,
    blur_side=lambda config: config.views.local_size,
    default_hidden=lambda config: (pretext.res5_width(config) // 4,
                                   2 * pretext.res5_width(config)),
    validate=validate)

METHOD = pretext.method(TASK)
