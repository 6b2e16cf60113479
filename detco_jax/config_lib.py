"""What a config means: derived settings, the model it builds, and checks.

Every consumer (train step, loop, benchmark, probes) reads the effective
loss weights, terms and BN grouping from here, so a switch such as
`loss.multi_level=False` means the same thing everywhere. The checks that
need no device live in `config_checks` (the command line runs them before
JAX loads); `validate` adds those that need the devices or the model code.
"""

import jax.numpy as jnp
import ml_collections
import optax

from detco_jax import config_checks
from detco_jax import optim
from detco_jax.models import detco as detco_lib
from detco_jax.models import resnet

DTYPES = {name: getattr(jnp, name) for name in config_checks.DTYPE_NAMES}


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Stage -> weight: all four stages if `loss.multi_level`, else Res5."""
  weights = dict(config.loss.stage_weights)
  if not config.loss.multi_level:
    return {"res5": weights["res5"]}
  return {s: float(w) for s, w in weights.items() if w}


def loss_terms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The InfoNCE terms: gg, ll, gl (+ lg if symmetric) or gg alone."""
  if not config.loss.global_local:
    return ("gg",)
  return ("gg", "ll", "gl") + (("lg",) if config.loss.symmetric_gl else ())


def uses_local(config: ml_collections.ConfigDict) -> bool:
  """Whether the run needs jigsaw patch sets at all."""
  return any(t != "gg" for t in loss_terms(config))


def queue_kinds(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Which queues exist: the negatives of gg/gl are global, of ll/lg local."""
  kinds = {"gg": "global", "gl": "global", "ll": "local", "lg": "local"}
  return tuple(sorted({kinds[t] for t in loss_terms(config)}))


# Defined without JAX so that the command line checks the batch against it.
bn_groups = config_checks.bn_groups


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Optimiser steps per pass over the training set."""
  return max(config.num_train_examples // config.batch_size, 1)


def total_steps(config: ml_collections.ConfigDict) -> int:
  """`total_steps` if set (> 0), else `num_epochs` epochs."""
  if config.total_steps > 0:
    return config.total_steps
  return int(config.num_epochs * steps_per_epoch(config))


def build_model(config: ml_collections.ConfigDict) -> detco_lib.DetCoEncoder:
  """The encoder (query and key alike) that `config.model` describes."""
  m = config.model
  stages = tuple(loss_weights(config))
  return detco_lib.DetCoEncoder(
      depth=m.depth, width=m.width, stem=m.stem, bn_groups=bn_groups(config),
      stages=stages, global_hidden=dict(m.global_hidden),
      local_hidden=m.local_hidden, embed_dim=m.embed_dim,
      use_local=uses_local(config), dtype=DTYPES[m.dtype], remat=m.remat,
      patch_bn_stats=config.bn_stats == "views_and_patches")


def validate(config: ml_collections.ConfigDict, num_devices: int,
             process_count: int = 1) -> None:
  """Stops a bad DetCo run at start with a message naming the key and fix.

  Args:
    config: the experiment config.
    num_devices: devices in the mesh (all processes).
    process_count: JAX processes.

  Raises:
    ValueError: on the first inconsistent value.
  """
  validate_backbone(config, num_devices, process_count)
  config_checks.check_detco(config)
  config_checks.raise_first([
      (set(config.loss.stage_weights) <= set(resnet.STAGES),
       f"loss.stage_weights keys must be among {resnet.STAGES}."),
  ])


def validate_backbone(config: ml_collections.ConfigDict, num_devices: int,
                      process_count: int = 1) -> None:
  """The checks every pretraining method shares: batch, BN groups, ResNet.

  Args:
    config: the experiment config.
    num_devices: devices in the mesh (all processes).
    process_count: JAX processes.

  Raises:
    ValueError: on the first inconsistent value.
  """
  b = config.batch_size
  config_checks.raise_first([
      (b > 0 and b % num_devices == 0,
       f"batch_size={b} must be a positive multiple of the {num_devices} "
       f"devices; e.g. --config.batch_size={_round_up(b, num_devices)}."),
      (b % process_count == 0,
       f"batch_size={b} must divide over the {process_count} processes."),
  ])
  config_checks.check_backbone(config)
  config_checks.raise_first([
      (config.model.depth in resnet.ARCHS,
       f"model.depth={config.model.depth} must be one of "
       f"{sorted(resnet.ARCHS)}."),
  ])


def _round_up(x: int, multiple: int) -> int:
  return max(multiple, -(-x // multiple) * multiple)


def build_optimizer(config: ml_collections.ConfigDict
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its schedule: `base_lr` scaled by batch, cosine to 0.

  Args:
    config: the experiment config.

  Returns:
    (tx, schedule).
  """
  peak = optim.scaled_lr(config.base_lr, config.batch_size,
                         config.lr_base_batch)
  warmup = int(round(config.warmup_epochs * steps_per_epoch(config)))
  schedule = optim.cosine_schedule(peak, total_steps(config), warmup)
  tx = optim.make_optimizer(config.optimizer, schedule, config.momentum,
                            config.weight_decay)
  return tx, schedule
