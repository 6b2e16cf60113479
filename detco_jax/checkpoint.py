"""Checkpoints of the train state with orbax's CheckpointManager.

Saves are asynchronous and keep the last N. Orbax writes each step into a
temporary directory and renames it only once complete, so a checkpoint cut
short by a crash or a preemption is never listed, never restored.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores one pytree, the train state, under `workdir`.

  Attributes:
    directory: `<workdir>/checkpoints`, absolute.
  """

  def __init__(self, workdir: str, *, keep: int = 3,
               asynchronous: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      workdir: the run's directory (local path or gs://).
      keep: how many of the latest checkpoints to keep.
      asynchronous: write in a background thread after the device copy.
    """
    if "://" not in workdir:
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` as `step` (returns once it is on the host)."""
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
        force=True)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """Restores a checkpoint into the shapes and shardings of `target`.

    Args:
      target: a state (or its `jax.eval_shape`) whose leaves' shardings say
        where each restored array goes.
      step: which checkpoint; None for the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: when there is no complete checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No complete checkpoint{'' if step is None else f' {step}'} in "
          f"{self.directory}; available: {self.all_steps()}.")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored["state"]

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes agree a preemption notice arrived (TPU pods)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()
