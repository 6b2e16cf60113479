"""What the experiment scripts share: seed statistics and their output files."""

import json
import os
from typing import Any, Sequence

import numpy as np


def mean_half_range(values: Sequence[float],
                    scale: float = 100.0) -> tuple[float, float]:
  """Mean and half the range of `values` x `scale` (fractions in percent)."""
  values = scale * np.asarray(values, np.float64)
  return float(values.mean()), float((values.max() - values.min()) / 2)


def mean_std(values: Sequence[float],
             scale: float = 100.0) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1) of `values` x `scale`
  (fractions in percent); the deviation of one value is 0."""
  values = scale * np.asarray(values, np.float64)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return float(values.mean()), float(std)


SPREADS = {"half_range": mean_half_range, "std": mean_std}


def cell(values: Sequence[float], spread: str = "half_range",
         percent: bool = True) -> str:
  """A table cell: "mean ± spread", or the one value.

  Args:
    values: the seeds' figures.
    spread: "half_range" or "std" (the sample standard deviation).
    percent: fractions shown in percent with one decimal; False: the
      values as they are (ratios), two decimals.

  Returns:
    The cell's text.
  """
  mean, deviation = SPREADS[spread](values, 100.0 if percent else 1.0)
  digits = 1 if percent else 2
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {deviation:.{digits}f}"


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
