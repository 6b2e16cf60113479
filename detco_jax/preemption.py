"""SIGTERM and preemption: stop every process of a job at the same step.

Preemptible TPU VMs and SLURM send SIGTERM before they take a machine
away. Every job's loop (pretraining, probes) holds a `StopRequest`, saves a
checkpoint at the step where all processes agree to stop, and returns.
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class StopRequest:
  """Set by SIGTERM; the loop saves and returns at a step boundary.

  With one process that is the next step; with several, the next log step,
  where they agree (see `agreed`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self) -> None:
    """Handles SIGTERM from now on (main thread only)."""
    # Signal handlers can only be set from the main thread.
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
      True when the run should save and stop after this step.
    """
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
