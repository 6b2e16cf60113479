"""What the experiment scripts share: seed statistics and their output files."""

import json
import os
from typing import Any, Sequence

import numpy as np


def mean_half_range(values: Sequence[float]) -> tuple[float, float]:
  """Mean and half the range of fractions, in percent."""
  values = 100 * np.asarray(values, np.float64)
  return float(values.mean()), float((values.max() - values.min()) / 2)


def cell(values: Sequence[float]) -> str:
  """A table cell: "mean ± half-range" in percent, or the one value."""
  mean, half = mean_half_range(values)
  return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {half:.1f}"


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
