"""Checkpoints of the train state with orbax's CheckpointManager.

Saves are asynchronous and keep the last N. Orbax writes each step into a
temporary directory and renames it only once complete, so a checkpoint cut
short by a crash or a preemption is never listed, never restored.

`restore_subtrees` reads only some subtrees of a saved state (an orbax
partial restore): a probe or the export takes the query backbone out of a
pretraining checkpoint without building, reading or holding the rest of the
train state (optimiser state, EMA encoder, queues).
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

# The one item of each checkpoint step: the saved pytree.
_ITEM = "state"


class MissingSubtreesError(ValueError):
  """A checkpoint lacks subtrees that a partial restore asked for.

  Attributes:
    missing: the missing paths, e.g. ["params/backbone"].
  """

  def __init__(self, message: str, missing: list[str]):
    super().__init__(message)
    self.missing = missing


def _key_name(key: Any) -> Any:
  """The name of one pytree path entry (dict key, dataclass field, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _abstract(target: Any) -> Any:
  """`target` as shapes, dtypes and shardings only (arrays are not read)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      target)


def _missing_paths(target: Any, saved: Any) -> list[str]:
  """The subtrees of `target` absent from the saved tree, in tree order.

  Args:
    target: the (partial) tree of nested mappings to restore.
    saved: the checkpoint's metadata tree (nested dicts and lists).

  Returns:
    One "a/b" path per missing subtree, down to its first missing key.
  """
  missing = []
  for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]:
    node = saved
    for depth, key in enumerate(path):
      name = _key_name(key)
      try:
        node = node[name]
      except (KeyError, IndexError, TypeError):
        where = "/".join(str(_key_name(k)) for k in path[:depth + 1])
        if where not in missing:
          missing.append(where)
        break
  return missing


class Checkpointer:
  """Saves and restores one pytree, the train state, under `workdir`.

  Attributes:
    directory: `<workdir>/checkpoints`, absolute.
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3,
               asynchronous: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      workdir: the run's directory (local path or gs://).
      keep: how many of the latest checkpoints to keep.
      asynchronous: write in a background thread after the device copy.
    """
    workdir = os.fspath(workdir)
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
        step, args=ocp.args.Composite(**{_ITEM: ocp.args.StandardSave(state)}),
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
    step = self._complete_step(step)
    abstract = _abstract(target)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{_ITEM: ocp.args.StandardRestore(abstract)}))
    return restored[_ITEM]

  def restore_subtrees(self, target: Mapping[str, Any],
                       step: int | None = None) -> dict[str, Any]:
    """Reads only the subtrees of a saved state that `target` names.

    Nothing outside `target` is read from storage or allocated: orbax's
    partial restore drops the other leaves before any array is opened.

    Args:
      target: nested mappings, keyed like the saved state's fields and
        dicts (e.g. `{"step": ..., "params": {"backbone": ...}}`), whose
        leaves are `jax.ShapeDtypeStruct`s (or arrays) with shardings: the
        shape, dtype and placement of each restored array.
      step: which checkpoint; None for the latest.

    Returns:
      Nested dicts with `target`'s structure, holding the restored arrays.

    Raises:
      FileNotFoundError: when there is no such complete checkpoint.
      MissingSubtreesError: when the checkpoint lacks a path of `target`.
    """
    step = self._complete_step(step)
    abstract = _abstract(target)
    # A manager of its own: the main one may have bound the item to the
    # StandardCheckpointHandler (by a save or restore), which has no partial
    # restore, and one manager allows only one handler per item. It never
    # saves or deletes (no max_to_keep); read_only=True would say so too, but
    # logs a warning on every load.
    reader = ocp.CheckpointManager(
        self.directory,
        item_handlers={_ITEM: ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            create=False, save_root_metadata=False,
            enable_async_checkpointing=False))
    try:
      saved = reader.item_metadata(step)[_ITEM].tree
      # Orbax's partial restore returns a target leaf absent from the
      # checkpoint unchanged (an abstract array): check before reading.
      missing = _missing_paths(abstract, saved)
      if missing:
        raise MissingSubtreesError(
            f"Checkpoint {step} in {self.directory} has no "
            f"{', '.join(missing)}; its state holds {sorted(saved)}.",
            missing)
      restored = reader.restore(step, args=ocp.args.Composite(**{
          _ITEM: ocp.args.PyTreeRestore(
              item=abstract,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract),
              partial_restore=True)}))
    finally:
      reader.close()
    return restored[_ITEM]

  def _complete_step(self, step: int | None) -> int:
    """`step` (None: the latest) if it is a complete checkpoint.

    Raises:
      FileNotFoundError: when it is not.
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(
          f"No complete checkpoint{'' if step is None else f' {step}'} in "
          f"{self.directory}; available: {self.all_steps()}.")
    return step

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes stop at `step` for a preemption notice.

    JAX's preemption sync manager answers (multi-process runs with the
    coordination service; SIGTERM on any process is a notice); it must be
    asked at every step. False without it.
    """
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()
