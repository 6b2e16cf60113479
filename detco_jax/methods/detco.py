"""DetCo (and its MoCo v2 baseline) as a pretraining method.

The contrastive step itself lives in `detco_jax.step`; this module only
hands it, with DetCo's host views, to the pretraining job.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from detco_jax import collapse
from detco_jax import config_lib
from detco_jax import step as step_lib
from detco_jax import visualize
from detco_jax.data import augment
from detco_jax.data import pipeline
from detco_jax.methods import base

# The console line's accuracies: res5's three terms (MoCo v2 has gg only).
CONSOLE = ("res5/gg_acc", "res5/ll_acc", "res5/gl_acc")


def build(config: base.Config, mesh: Mesh, rng: jax.Array
          ) -> tuple[step_lib.TrainState, base.StepFn]:
  """The sharded DetCo state and its jitted step.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    rng: the initialisation key.

  Returns:
    (state, step).
  """
  model = config_lib.build_model(config)
  tx, schedule = config_lib.build_optimizer(config)
  state, shardings = step_lib.create_train_state(config, model, tx, mesh, rng)
  return state, step_lib.make_train_step(config, model, tx, schedule, mesh,
                                         shardings)


def views_panel(config: base.Config, batch: dict[str, Any]) -> np.ndarray:
  """The first sample's I_q, I_k, P_q and P_k, augmented, side by side."""
  first = {k: np.asarray(v[:1]) for k, v in batch.items()}
  views = jax.jit(lambda b: augment.augment_views(
      b, jax.random.key(config.seed), config.aug, config.views))(first)
  return visualize.views_panel(
      views["global"][0], views["local"][0] if "local" in views else None,
      config.aug.mean, config.aug.std)


def watch(config: base.Config) -> collapse.Watch:
  """The collapse monitor of a run: its heads' width, queue and batch."""
  return collapse.Watch(config.model.embed_dim, config.queue_size,
                        config.batch_size)


METHOD = base.Method(
    name="detco", validate=config_lib.validate,
    example_views=pipeline.detco_example_views, build=build,
    views_panel=views_panel, console=CONSOLE,
    watch=lambda config: watch(config).check)
