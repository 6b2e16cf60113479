"""Supervised training on the dataset's label: the reference row of a table.

Not a pretext task: the one method here that reads the label. It trains the
same ResNet, on the same host views (one RandomResizedCrop + flip with
DetCo's global-view geometry, `views.global_*`), photometric augmentation,
optimiser, schedule and budget as the self-supervised methods, with a
linear classifier on the pooled res5 features (`pretext.hidden=N` adds a
hidden layer). Probing its backbone like any other run gives the ceiling
that a self-supervised backbone of the same budget is measured against
(experiments/ablation.py's "supervised" row).
"""

from detco_jax.data import pipeline
from detco_jax.data import sources
from detco_jax.data import views as views_lib
from detco_jax.methods import pretext


def example_views(config: pretext.Config) -> pipeline.LabelledViews:
  """`(image, seed) -> {"inputs": uint8 [1, 1, G, G, 3]}`, and the label.

  Args:
    config: the experiment config (`views`).

  Returns:
    One global view of each example; the pipeline adds its label.
  """
  spec = views_lib.ViewSpec.from_config(config.views)

  def make(image, seed):
    view = views_lib.global_views(image, seed, spec, num=1)[0]
    return {"inputs": view[None, None]}

  return pipeline.LabelledViews(make)


def num_classes(config: pretext.Config) -> int:
  """The dataset's class count."""
  return sources.num_classes(config.data)


def validate(config: pretext.Config) -> None:
  """The dataset has labels."""
  classes = num_classes(config)
  if classes < 2:
    raise ValueError(
        f"Bad config: method='supervised' needs a labelled dataset; "
        f"data.dataset={config.data.dataset!r} has {classes} classes.")


TASK = pretext.Task(
    name="supervised",
    num_classes=num_classes,
    input_shape=lambda config: (1, 1, config.views.global_size),
    example_views=example_views,
    blur_side=lambda config: config.views.global_size,
    default_hidden=lambda config: (0, 0),
    validate=validate)

METHOD = pretext.method(TASK)
