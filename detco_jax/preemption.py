"""SIGTERM and preemption: stop every process of a job at the same step.

Preemptible TPU VMs and SLURM send SIGTERM before they take a machine
away. Every job's loop (pretraining, probes) holds a `StopRequest`, saves a
checkpoint at the step where all processes agree to stop, and returns.

Two ways to agree, chosen when the loop starts:

- Several processes with JAX's preemption sync manager (created by
  `jax.distributed.initialize` unless `jax_enable_preemption_service` is
  off): it catches SIGTERM itself, with a C++ handler, and passes the notice
  to every process through the coordination service; the loop asks it at
  every step (`Checkpointer.reached_preemption`), and all processes stop at
  the step it picks: the one after the furthest step any of them had
  reached when the notice came, which its listener thread sees within a
  second of the signal (it polls once a second). No Python handler is
  installed then: it would replace the sync manager's, which would never
  hear of the signal.
- Otherwise our own SIGTERM handler sets a flag. One process stops at the
  next step; several compare flags at log steps only (a collective at
  every step would make the host wait for the device).
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def sync_manager_active() -> bool:
  """Whether JAX's preemption sync manager watches for SIGTERM here.

  Returns:
    True in a multi-process run whose `jax.distributed.initialize` created
    the sync manager (the coordination service with
    `jax_enable_preemption_service` on, the default).
  """
  if jax.process_count() == 1:
    return False  # Our handler stops one process at the very next step.
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  state = distributed.global_state
  return (getattr(state, "client", None) is not None and
          getattr(state, "preemption_sync_manager", None) is not None)


class StopRequest:
  """Set by SIGTERM; the loop saves and returns at a step boundary.

  With one process that is the next step. With several, JAX's preemption
  sync manager picks the step when it runs (see the module docstring);
  otherwise the processes agree at the next log step (see `agreed`).

  Attributes:
    requested: our handler caught SIGTERM.
    uses_sync_manager: SIGTERM is left to JAX's preemption sync manager.
  """

  def __init__(self):
    self.requested = False
    self.uses_sync_manager = False
    self._previous = None

  def install(self) -> None:
    """Handles SIGTERM from now on, unless the sync manager does.

    Main thread only: signal handlers can only be set from there.
    """
    if sync_manager_active():
      self.uses_sync_manager = True
      logging.info("SIGTERM is handled by JAX's preemption sync manager: "
                   "every process saves at the step it agrees on.")
      return
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def uninstall(self) -> None:
    """Restores the previous SIGTERM handler."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, at_sync_point: bool) -> bool:
    """Whether to stop now; all processes must answer alike.

    One process acts on its own flag at once. Several processes, which may
    receive SIGTERM at different steps, compare flags at sync points (log
    steps) so that all of them enter the checkpoint save at the same step.

    Args:
      at_sync_point: whether this step is one where processes compare.

    Returns:
      True when the run should save and stop after this step; always False
      when the sync manager handles SIGTERM (the loop asks it instead).
    """
    if self.uses_sync_manager:
      return False
    if jax.process_count() == 1:
      return self.requested
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self.requested))
    return bool(np.any(flags))

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint at the next step, then "
                    "exiting.")
    self.requested = True
