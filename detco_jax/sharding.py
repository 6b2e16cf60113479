"""Mesh and sharding helpers: one data-parallel axis named `data`.

Parameters and optimiser state are replicated; batches are split along their
first axis; the negative queues are split along K. This module is the only
place where host data becomes device data.
"""

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with the axis `data`.

  The axis is Auto, not Explicit (the default of `jax.make_mesh`): the
  query-queue contraction mixes a batch-sharded and a K-sharded operand,
  which only Auto sharding propagation accepts.

  Args:
    devices: the devices, in mesh order.

  Returns:
    The mesh.
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Split along the leading (batch or K) axis over `data`."""
  return NamedSharding(mesh, P(DATA))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for a train state: queues split along K, the rest replicated.

  Args:
    abstract_state: the state's shapes (from `jax.eval_shape`), a pytree
      whose queue arrays sit under a field or key named `queues`.
    mesh: the mesh.

  Returns:
    A pytree of `NamedSharding`s with the state's structure.
  """
  def pick(path, leaf):
    in_queues = any(getattr(k, "name", getattr(k, "key", None)) == "queues"
                    for k in path)
    if in_queues and leaf.ndim == 2:
      return batch_sharded(mesh)
    return replicated(mesh)
  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def jit_train_step(fn: Callable, mesh: Mesh, state_shardings: Any
                   ) -> Callable:
  """`fn(state, batch, rng) -> (state, metrics)`, jitted for training.

  The state keeps its shardings and is donated; the batch is split over
  `data`; the rng and the metrics are replicated.

  Args:
    fn: the un-jitted step.
    mesh: the mesh.
    state_shardings: the state's pytree of shardings.

  Returns:
    The jitted step.
  """
  return jax.jit(
      fn, in_shardings=(state_shardings, batch_sharded(mesh),
                        replicated(mesh)),
      out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Makes one global array per leaf from each process's slice of the batch.

  Args:
    batch: this process's numpy arrays; their leading axes together form
      the global batch, in process order.
    mesh: the mesh.

  Returns:
    The global arrays, split along the batch axis over `data`.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
