r"""Per-term curves of a DetCo run: its 12 losses, res5 accuracies, head stds.

  python experiments/term_curves.py --out=DIR --detco=workdirs/demo \
      [--mocov2=workdirs/demo_mocov2] [--bin_epochs=0.25]

Reads the pretraining runs' TensorBoard events (every log window's means)
and draws one PNG of stacked panels against epochs:

  res2 .. res5    the gg, ll and gl InfoNCE losses of each stage (MoCo v2's
                  res5 gg beside DetCo's), chance ln(K+1) dashed;
  res5 accuracy   the three res5 terms' top-1 against the queue;
  res5 margin     the positive's cosine minus the hardest negative's;
  std global /    the collapse monitor's std across the batch of each
  std local       head's l2-normalised embeddings, 1/sqrt(d) dashed.

Log windows are averaged over bins of `--bin_epochs` so that the dots stay
readable. Writes `<out>/term_curves.png`, `term_curves.md` (every series at
whole epochs) and `term_curves.json` (every series at every bin).
"""

import argparse
import math
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top

from detco_jax import config_lib  # pylint: disable=g-import-not-at-top
from detco_jax import pretrained  # pylint: disable=g-import-not-at-top
from detco_jax import visualize  # pylint: disable=g-import-not-at-top
from experiments import learning_curve  # pylint: disable=g-import-not-at-top
from experiments import tables  # pylint: disable=g-import-not-at-top

NAME = "term_curves"
STAGES = ("res2", "res3", "res4", "res5")
TERMS = ("gg", "ll", "gl")
Series = tuple[list[float], list[float]]  # (epochs, values)


def binned(workdir: str, tag: str, per_epoch: int,
           bin_epochs: float) -> Series:
  """A scalar's log windows averaged over bins of `bin_epochs` epochs.

  Args:
    workdir: a pretraining run's directory.
    tag: the scalar's name, e.g. "res5/ll".
    per_epoch: the run's steps per epoch.
    bin_epochs: the bin width in epochs; a window at step s falls in the
      bin ending at ceil(s / per_epoch / bin_epochs) * bin_epochs.

  Returns:
    (bin ends in epochs, mean value of the windows in each bin).
  """
  bins: dict[float, list[float]] = {}
  for step, value in learning_curve.read_scalar(workdir, tag):
    end = math.ceil(step / per_epoch / bin_epochs - 1e-9) * bin_epochs
    bins.setdefault(round(end, 6), []).append(value)
  ends = sorted(bins)
  return ends, [float(np.mean(bins[e])) for e in ends]


def panels(detco: str, mocov2: str | None, bin_epochs: float
           ) -> list[tuple[str, str, dict[str, Series], tuple[str, float]]]:
  """The panels' (title, y label, series, reference line).

  Args:
    detco: the DetCo run's workdir.
    mocov2: the MoCo v2 run's workdir, or None.
    bin_epochs: as for `binned`.

  Returns:
    One entry per panel, in drawing order.
  """
  config = pretrained.load_config(detco)
  per_epoch = config_lib.steps_per_epoch(config)
  read = lambda tag: binned(detco, tag, per_epoch, bin_epochs)
  if mocov2 is not None:
    moco_epoch = config_lib.steps_per_epoch(pretrained.load_config(mocov2))
    moco = lambda tag: {"MoCo v2 gg": binned(mocov2, tag, moco_epoch,
                                             bin_epochs)}
  else:
    moco = lambda tag: {}
  chance = ("chance ln(K+1)", math.log(config.queue_size + 1))
  healthy = ("1/sqrt(d)", 1 / math.sqrt(config.model.embed_dim))
  out = []
  for stage in STAGES:
    series = {f"{stage} {t}": read(f"{stage}/{t}") for t in TERMS}
    if stage == "res5":
      series.update(moco("res5/gg"))
    out.append((f"DetCo {stage} InfoNCE losses", "loss", series, chance))
  for what, label, reference in (("acc", "top-1 vs queue", None),
                                 ("margin", "cosine margin", ("0", 0.0))):
    series = {f"res5 {t}": read(f"res5/{t}_{what}") for t in TERMS}
    series.update(moco(f"res5/gg_{what}"))
    out.append((f"res5 {label}", label, series, reference))
  for kind in ("global", "local"):
    series = {f"{s} {kind}": read(f"{s}/{kind}_std") for s in STAGES}
    if kind == "global":
      series.update({"MoCo v2 res5": v for v in moco("res5/global_std")
                     .values()})
    out.append((f"std across the batch, {kind} heads", "std", series,
                healthy))
  return out


def figure(entries: Sequence[tuple[str, str, dict[str, Series],
                                   Any]]) -> np.ndarray:
  """The panels stacked into one uint8 RGB image."""
  charts = [visualize.line_chart(series, title=title, x_label="epoch",
                                 y_label=y_label, reference=reference,
                                 size=(720, 300))
            for title, y_label, series, reference in entries]
  return np.concatenate(charts, axis=0)


def table(entries: Sequence[tuple[str, str, dict[str, Series], Any]]) -> str:
  """Every series at whole epochs: one row per epoch, a column per series."""
  columns = [(f"{title.split(',')[0]}: {label}", dict(zip(*series)))
             for title, _, all_series, _ in entries
             for label, series in all_series.items()]
  epochs = sorted({e for _, values in columns for e in values
                   if float(e).is_integer()})
  lines = ["| series | " + " | ".join(f"{e:g}" for e in epochs) + " |",
           "|---|" + "---|" * len(epochs)]
  for name, values in columns:
    cells = [f"{values[e]:.3f}" if e in values else "" for e in epochs]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def make(detco: str, mocov2: str | None, out: str,
         bin_epochs: float = 0.25) -> dict[str, Any]:
  """Reads the runs; writes the PNG, the table and the JSON.

  Args:
    detco: the DetCo run's workdir.
    mocov2: the MoCo v2 run's workdir, or None.
    out: the output folder.
    bin_epochs: as for `binned`.

  Returns:
    What the JSON holds: {panel title: {series: {epoch: value}}}.
  """
  entries = panels(detco, mocov2, bin_epochs)
  os.makedirs(out, exist_ok=True)
  Image.fromarray(figure(entries)).save(os.path.join(out, f"{NAME}.png"))
  results = {title: {label: {f"{e:g}": v for e, v in zip(*series)}
                     for label, series in all_series.items()}
             for title, _, all_series, _ in entries}
  summary = (f"DetCo's per-term curves ({detco}"
             + (f"; MoCo v2: {mocov2}" if mocov2 else "")
             + f"), log windows averaged over {bin_epochs:g}-epoch bins, "
             "shown at whole epochs.\n\n" + table(entries))
  tables.write_summary(out, NAME, summary, results)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--detco", required=True,
                      help="The DetCo pretraining run's workdir.")
  parser.add_argument("--mocov2", default=None,
                      help="A MoCo v2 run's workdir, drawn beside it.")
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--bin_epochs", type=float, default=0.25,
                      help="Average log windows over bins of this width.")
  args = parser.parse_args()
  try:
    make(args.detco, args.mocov2, args.out, args.bin_epochs)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"Error: {e}")


if __name__ == "__main__":
  main()
