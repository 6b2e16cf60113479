"""Rotation prediction (Gidaris et al., ICLR 2018) as a pretraining method.

Host views: one RandomResizedCrop (DetCo's global-view geometry,
`views.global_*`) of each image, rotated by 0, 90, 180 and 270 degrees
counter-clockwise (`pretext.angles="all"`, the paper's choice: four
examples per image, labels 0..3) or by one random angle
(`pretext.angles="random"`). Head: an MLP on the pooled res5 features
(`pretext.hidden`, default the res5 global head's width; 0: a linear
head). Loss: 4-way cross-entropy.
"""

import tensorflow as tf

from detco_jax.data import pipeline
from detco_jax.data import views as views_lib
from detco_jax.methods import pretext

NUM_ANGLES = 4
ANGLES = ("all", "random")
# Sub-seed tag of the random angle, apart from the views' own tags.
_ANGLE_SEED = 10


def rotate(view: tf.Tensor, k: tf.Tensor | int) -> tf.Tensor:
  """`view` [H, W, C] rotated by k x 90 degrees counter-clockwise."""
  return tf.image.rot90(view, k)


def example_views(config: pretext.Config) -> pipeline.ExampleViews:
  """`(image, seed) -> {"inputs": uint8 [m, 1, G, G, 3], "label": [m]}`.

  Args:
    config: the experiment config (`views`, `pretext.angles`).

  Returns:
    The host views of one example; m = 4 for "all", 1 for "random".
  """
  spec = views_lib.ViewSpec.from_config(config.views)
  every_angle = config.pretext.angles == "all"

  def make(image, seed):
    view = views_lib.global_views(image, seed, spec, num=1)[0]
    if every_angle:
      labels = tf.range(NUM_ANGLES, dtype=tf.int32)
      rotated = tf.stack([rotate(view, k) for k in range(NUM_ANGLES)])
    else:
      labels = tf.random.stateless_uniform(
          [1], tf.random.experimental.stateless_fold_in(seed, _ANGLE_SEED),
          minval=0, maxval=NUM_ANGLES, dtype=tf.int32)
      rotated = rotate(view, labels[0])[None]
    return {"inputs": rotated[:, None], "label": labels}

  return make


def input_shape(config: pretext.Config) -> tuple[int, int, int]:
  """(examples per image, inputs per example, side)."""
  per_image = NUM_ANGLES if config.pretext.angles == "all" else 1
  return per_image, 1, config.views.global_size


def validate(config: pretext.Config) -> None:
  """`pretext.angles` is "all" or "random"."""
  if config.pretext.angles not in ANGLES:
    raise ValueError(f"Bad config: pretext.angles={config.pretext.angles!r} "
                     f"must be one of {ANGLES}.")


TASK = pretext.Task(
    name="rotation",
    num_classes=lambda config: NUM_ANGLES,
    input_shape=input_shape,
    example_views=example_views,
    blur_side=lambda config: config.views.global_size,
    default_hidden=lambda config: (0, pretext.res5_width(config)),
    validate=validate)

METHOD = pretext.method(TASK)
