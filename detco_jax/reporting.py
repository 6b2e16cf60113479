"""What every job's loop reports: window means of step metrics, result files.

Shared by pretraining and the probes so that they average and write alike.
"""

import json
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath


def window_means(history: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Averages a window of per-step device metrics on the host.

  Args:
    history: the metrics dicts of the window's steps (device arrays).

  Returns:
    {name: mean over the window}; fetching waits for the last step.
  """
  fetched = jax.device_get(list(history))
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def write_json(workdir: str, name: str, payload: Any) -> None:
  """Writes `payload` as `<workdir>/<name>` (process 0 only; local or gs://).

  Args:
    workdir: the job's directory (created if missing).
    name: the file name.
    payload: anything `json.dumps` takes.
  """
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / name).write_text(json.dumps(payload, indent=2, sort_keys=True))
