"""Learning-rate schedules and optimisers (SGD as in MoCo, LARS for pods)."""

import jax
import optax


def scaled_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
  """The linear scaling rule: `base_lr * batch_size / base_batch`."""
  return base_lr * batch_size / base_batch


def cosine_schedule(peak: float, total_steps: int,
                    warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine decay to 0 at `total_steps`.

  Args:
    peak: the learning rate after warm-up.
    total_steps: the schedule's length.
    warmup_steps: linear warm-up steps (0: start at `peak`).

  Returns:
    An optax schedule (step -> learning rate).
  """
  if warmup_steps <= 0:
    return optax.cosine_decay_schedule(peak, max(total_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1))


def _decay_mask(params):
  """LARS convention: no weight decay or trust ratio on biases and BN."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1, params)


def make_optimizer(name: str, schedule: optax.Schedule, momentum: float,
                   weight_decay: float) -> optax.GradientTransformation:
  """The pretraining optimiser.

  Args:
    name: "sgd" (MoCo: PyTorch SGD semantics, decay on every parameter,
      added to the gradient before momentum) or "lars".
    schedule: the learning rate.
    momentum: heavy-ball momentum.
    weight_decay: L2 weight decay.

  Returns:
    The optax transformation.
  """
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(schedule, momentum=momentum))
  if name == "lars":
    return optax.lars(schedule, weight_decay=weight_decay,
                      weight_decay_mask=_decay_mask,
                      trust_ratio_mask=_decay_mask, momentum=momentum)
  raise ValueError(f"optimizer must be 'sgd' or 'lars', got {name!r}.")
