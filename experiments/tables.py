"""What the experiment scripts share: seed statistics and their output files."""

import json
import os
from typing import Any, Sequence

import numpy as np


def mean_half_range(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half the range of fractions, in percent."""
  values = 100 * np.asarray(values, np.float64)
  return float(values.mean()), float((values.max() - values.min()) / 2)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1) of fractions, in percent;
  the deviation of one value is 0."""
  values = 100 * np.asarray(values, np.float64)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return float(values.mean()), float(std)


SPREADS = {"half_range": mean_half_range, "std": mean_std}


def cell(values: Sequence[float], spread: str = "half_range") -> str:
  """A table cell: "mean ± spread" in percent, or the one value.

  Args:
    values: the seeds' figures, as fractions.
    spread: "half_range" or "std" (the sample standard deviation).

  Returns:
    The cell's text, one decimal.
  """
  mean, deviation = SPREADS[spread](values)
  return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {deviation:.1f}"


def write_summary(workdir: str, name: str, summary: str,
                  results: dict[str, Any]) -> None:
  """Prints `summary` and writes it to `<workdir>/<name>.md`, and `results`
  to `<workdir>/<name>.json`."""
  print(summary)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"{name}.md"), "w") as f:
    f.write(summary)
  with open(os.path.join(workdir, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
