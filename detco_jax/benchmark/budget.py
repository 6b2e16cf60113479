"""The suite's time boxes, and decisions every process takes alike.

Each part of the suite gets a share of the budget. Its deadline is counted
from the suite's start (the cumulative share), so time a part leaves unused
goes to the next. Before an item, the part asks `Budget.allows(predicted)`;
predictions are padded by `SAFETY`, since running past the budget costs
more than leaving time unused.

With several processes (a pod slice), every decision that changes which
programs run (an item fits or not, a batch size, a number of epochs) is
process 0's (`agree`), so that processes whose clocks differ never run
different collectives.
"""

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

# Predictions are multiplied by this before they are compared with the time
# left.
SAFETY = 1.3


def agree(value: Any) -> Any:
  """Process 0's `value` (a bool, int or float) on every process."""
  if jax.process_count() == 1:
    return value
  return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


class Budget:
  """The time boxes of the parts that run.

  Attributes:
    total_s: the budget.
    force: every item runs whatever its prediction (smoke mode).
  """

  def __init__(self, total_s: float, shares: Mapping[str, float],
               parts: Sequence[str], force: bool = False,
               clock: Callable[[], float] = time.monotonic):
    """Starts the clock.

    Args:
      total_s: seconds for all of `parts`.
      shares: part -> its share (of the parts that run, renormalised).
      parts: the parts that run, in order.
      force: run every item (smoke mode).
      clock: seconds, monotonic (a parameter for tests).
    """
    self.total_s = total_s
    self.force = force
    self._clock = clock
    self._start = clock()
    scale = sum(shares[p] for p in parts)
    self._ends, cumulative = {}, 0.0
    for part in parts:
      cumulative += shares[part] / scale
      self._ends[part] = cumulative * total_s
    self._part = parts[0]

  def start(self, part: str) -> float:
    """Enters `part`; returns the seconds of its box from now."""
    self._part = part
    return self.left()

  def elapsed(self) -> float:
    """Seconds since the suite started."""
    return self._clock() - self._start

  def left(self) -> float:
    """Seconds until the current part's deadline (negative: past it)."""
    return self._ends[self._part] - self.elapsed()

  def allows(self, predicted_s: float) -> bool:
    """Whether an item predicted to take `predicted_s` fits (all agree)."""
    return agree(bool(self.force or SAFETY * predicted_s <= self.left()))
