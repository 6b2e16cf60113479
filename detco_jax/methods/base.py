"""What a pretraining method hands the pretraining job (`detco_jax.train`).

A method is a table of functions: how to check a config, how one example
becomes host views, how the sharded state and the jitted step are built,
and what the console and the first-batch picture show. The job calls only
these, so it never branches on the method's name.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from detco_jax.data import pipeline

Config = ml_collections.ConfigDict
Metrics = dict[str, jax.Array]
# `step(state, global_batch, rng) -> (state, metrics)`, jitted, state donated.
StepFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[Any, Metrics]]


@dataclasses.dataclass(frozen=True)
class Method:
  """A pretraining method.

  Attributes:
    name: the `config.method` value that selects it.
    validate: `validate(config, num_devices, process_count)`; raises a
      ValueError that names the key and the fix.
    example_views: `example_views(config) -> (image, seed) -> dict`, the
      host views of one example (`pipeline.ExampleViews`), or a
      `pipeline.LabelledViews` for a method that trains on the label.
    build: `build(config, mesh, init_rng) -> (state, step)`: the state,
      already sharded, and the jitted step. Every method's state has the
      fields `step`, `params` and `batch_stats`, with the ResNet under
      `params["backbone"]`, so probes, kNN and the export read any run.
    views_panel: `views_panel(config, host_batch) -> float32 [H, W, 3]`,
      the first example's augmented views for TensorBoard.
    console: metric names shown on the console line besides the loss.
    watch: `watch(config) -> on_window(step, window_means)`, a check of
      each log window (the contrastive methods' collapse monitor), or None.
  """
  name: str
  validate: Callable[[Config, int, int], None]
  example_views: Callable[[Config], pipeline.ExampleViews
                           | pipeline.LabelledViews]
  build: Callable[[Config, Mesh, jax.Array], tuple[Any, StepFn]]
  views_panel: Callable[[Config, dict[str, np.ndarray]], np.ndarray]
  console: Sequence[str] = ()
  watch: Callable[[Config], Callable[[int, dict[str, float]], Any]] | None = (
      None)
