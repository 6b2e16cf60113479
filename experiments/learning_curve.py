r"""Learning curves: res5 kNN top-1 against epochs, from pretraining logs.

  python experiments/learning_curve.py --out=DIR \
      --run=DetCo=workdirs/demo --run="MoCo v2=workdirs/demo_mocov2" \
      --floor=workdirs/demo_floor [--margin]

Each `--run=LABEL=DIR[,DIR...]` is one method; several DIRs are seeds of it,
averaged (mean, and half the range in the table). Each DIR is the
`--workdir` of a pretraining run that ran the kNN monitor: the demo runs it
after every epoch (`configs/detco.py:demo`; elsewhere
`--config.knn.every_steps` or the `knn_epochs=N` argument), which logs
`knn/top1` in the run's TensorBoard events; steps become epochs with the
run's own config.json.

`--floor` is the untrained network's kNN top-1: a number, or the
`knn_results.json` (or the folder holding it) of

  python -m detco_jax.eval.knn --config=configs/linear_probe.py:demo \
      --config.pretrained=workdirs/demo --config.random_init=True \
      --config.knn.train_examples=5000 --workdir=workdirs/demo_floor

(the monitor's kNN settings: `knn.train_examples` as the pretraining
config's, 5,000 in the demo). A floor measured with other kNN settings than
a run's (stage, k, temperature, more examples) is refused.

Writes `<out>/learning_curve.png` (the curves, the floor dashed; with
`--margin` the margin over the floor instead), `learning_curve.md` (one row
per epoch: each method's top-1 and margin) and `learning_curve.json`.

The runs: the README's demo and its MoCo v2 twin, one after the other
(`python -m detco_jax.main --config=configs/detco.py:demo
--workdir=workdirs/demo`, and `:demo,mocov2` with
`--workdir=workdirs/demo_mocov2`); longer curves add `epochs=N`, e.g.
`--config=configs/detco.py:demo,epochs=24` (hours on a 2-core CPU).
"""

import argparse
import json
import os
import sys
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

from detco_jax import config_lib  # pylint: disable=g-import-not-at-top
from detco_jax import pretrained  # pylint: disable=g-import-not-at-top
from detco_jax import visualize  # pylint: disable=g-import-not-at-top
from detco_jax.eval import knn  # pylint: disable=g-import-not-at-top
from experiments import tables  # pylint: disable=g-import-not-at-top

TAG = "knn/top1"
NAME = "learning_curve"
Curve = dict[float, list[float]]  # epoch -> one top-1 per seed.


def read_scalar(workdir: str, tag: str = TAG) -> list[tuple[int, float]]:
  """(step, value) of every record of `tag` in a run's events, by step.

  Args:
    workdir: the run's directory (its TensorBoard events).
    tag: the scalar's name.

  Returns:
    The records in step order; a step logged twice (a resumed run) keeps
    its last value.

  Raises:
    ValueError: the events hold no `tag`.
  """
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.SCALARS: 0,
                              event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()
  if tag in tags["tensors"]:
    records = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
               for e in events.Tensors(tag)]
  elif tag in tags["scalars"]:
    records = [(e.step, float(e.value)) for e in events.Scalars(tag)]
  else:
    raise ValueError(
        f"No {tag!r} in the events of {workdir}: run the pretraining with "
        "the kNN monitor on (--config.knn.every_steps=N, or knn_epochs=N "
        "in configs/detco.py's config string).")
  return sorted(dict(records).items())


def run_curve(workdir: str) -> tuple[dict[float, float], Any]:
  """One run's kNN top-1 by epoch, and its config.

  Args:
    workdir: a pretraining run's directory.

  Returns:
    ({epoch: top-1}, the run's config); epoch = step / steps per epoch.
  """
  config = pretrained.load_config(workdir)
  per_epoch = config_lib.steps_per_epoch(config)
  return ({round(step / per_epoch, 3): value
           for step, value in read_scalar(workdir)}, config)


def method_curve(workdirs: Sequence[str]) -> tuple[Curve, list[Any]]:
  """The seeds of one method: their values at the epochs all of them reach.

  Args:
    workdirs: one run per seed.

  Returns:
    ({epoch: [top-1 per seed]} over the epochs every run logged, the
    runs' configs).

  Raises:
    ValueError: the runs share no logged epoch.
  """
  curves, configs = zip(*(run_curve(w) for w in workdirs))
  common = sorted(set.intersection(*(set(c) for c in curves)))
  if not common:
    raise ValueError(f"The runs {list(workdirs)} log kNN at no common epoch; "
                     "give seeds of the same schedule and monitor period.")
  return {e: [c[e] for c in curves] for e in common}, list(configs)


def parse_run(text: str) -> tuple[str, list[str]]:
  """`LABEL=DIR[,DIR...]` -> (label, dirs).

  Raises:
    ValueError: no "=", or no label or directory.
  """
  label, sep, dirs = text.partition("=")
  workdirs = [d for d in dirs.split(",") if d]
  if not sep or not label or not workdirs:
    raise ValueError(f"--run={text!r}: write LABEL=DIR[,DIR...], e.g. "
                     "--run=DetCo=workdirs/lc_detco.")
  return label, workdirs


def read_floor(text: str) -> tuple[float, dict[str, Any]]:
  """The untrained network's kNN top-1: a number or a kNN result file.

  Args:
    text: a fraction (e.g. "0.315"), a `knn_results.json`, or the folder
      holding one (`python -m detco_jax.eval.knn --config.random_init=True`).

  Returns:
    (top-1, the result file's contents or {} for a number).

  Raises:
    FileNotFoundError: neither a number nor an existing file or folder.
  """
  try:
    return float(text), {}
  except ValueError:
    pass
  path = (os.path.join(text, knn.RESULTS_FILE) if os.path.isdir(text)
          else text)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"--floor={text!r} is neither a number nor a kNN result: give the "
        "--workdir of `python -m detco_jax.eval.knn ... "
        "--config.random_init=True` or its knn_results.json.")
  with open(path) as f:
    results = json.load(f)
  return float(results["knn_top1"]), results


def check_floor(results: dict[str, Any], configs: Sequence[Any]) -> None:
  """Refuses a floor measured with other kNN settings than a run's monitor.

  Args:
    results: the floor's result file ({} for a plain number: not checked).
    configs: the runs' configs.

  Raises:
    ValueError: a stage, k or temperature differs, or the floor used more
      train or test examples than a run's monitor asks for.
  """
  if not results:
    return
  for config in configs:
    k = config.knn
    same = (results["stage"] == k.stage and results["k"] == k.k
            and np.isclose(results["temperature"], k.temperature)
            and results["num_train"] <= k.train_examples
            and results["num_test"] <= k.test_examples)
    if not same:
      raise ValueError(
          f"The floor's kNN ({results['stage']}, k={results['k']}, "
          f"t={results['temperature']}, {results['num_train']} train / "
          f"{results['num_test']} test) is not the monitor's ({k.stage}, "
          f"k={k.k}, t={k.temperature}, {k.train_examples} / "
          f"{k.test_examples}): measure it again with "
          f"--config.knn.train_examples={k.train_examples} "
          f"--config.knn.test_examples={k.test_examples}.")


def table(curves: dict[str, Curve], floor: float) -> str:
  """Markdown: one row per epoch, per method its top-1 and its margin.

  Args:
    curves: label -> {epoch: [top-1 per seed]}.
    floor: the untrained network's top-1.

  Returns:
    The table, values in percent (mean ± half the range over seeds).
  """
  epochs = sorted(set().union(*curves.values()))
  head = "| epoch | " + " | ".join(
      f"{label} top-1 | {label} margin" for label in curves) + " |"
  lines = [head, "|---" * (1 + 2 * len(curves)) + "|"]
  for epoch in epochs:
    cells = []
    for curve in curves.values():
      values = curve.get(epoch)
      cells += ([tables.cell(values),
                 tables.cell([v - floor for v in values])]
                if values else ["", ""])
    lines.append(f"| {epoch:g} | " + " | ".join(cells) + " |")
  lines.append(f"| untrained (floor) | {100 * floor:.1f} |"
               + " |" * (2 * len(curves) - 1))
  return "\n".join(lines) + "\n"


def figure(curves: dict[str, Curve], floor: float, seeds: dict[str, int],
           margin: bool) -> np.ndarray:
  """The picture: each method's mean kNN top-1 (or margin) against epochs.

  Args:
    curves: label -> {epoch: [top-1 per seed]}.
    floor: the untrained network's top-1.
    seeds: label -> number of seeds, for the legend.
    margin: draw top-1 minus the floor (the floor is then the zero line).

  Returns:
    uint8 RGB image.
  """
  shift = floor if margin else 0.0
  series = {
      f"{label} ({seeds[label]} seed{'s' if seeds[label] > 1 else ''})": (
          sorted(curve), [100 * (np.mean(curve[e]) - shift)
                          for e in sorted(curve)])
      for label, curve in curves.items()}
  what = "margin over the untrained network" if margin else "top-1"
  return visualize.line_chart(
      series, title=f"res5 kNN {what} against pretraining epochs",
      x_label="epoch", y_label="points" if margin else "kNN top-1 (%)",
      reference=(f"untrained network ({100 * floor:.1f}%)",
                 100 * (floor - shift)))


def make(runs: Sequence[tuple[str, list[str]]], floor_arg: str, out: str,
         margin: bool = False) -> dict[str, Any]:
  """Reads the runs and the floor; writes the PNG, the table, the JSON.

  Args:
    runs: (label, workdirs per seed) per method, in legend order.
    floor_arg: `--floor` (see `read_floor`).
    out: the output folder.
    margin: plot the margin over the floor instead of top-1.

  Returns:
    What the JSON holds: the floor, and per method its seeds' workdirs and
    {epoch: [top-1 per seed]}.
  """
  floor, floor_results = read_floor(floor_arg)
  curves, seeds, results = {}, {}, {"floor": floor, "methods": {}}
  for label, workdirs in runs:
    curves[label], configs = method_curve(workdirs)
    check_floor(floor_results, configs)
    seeds[label] = len(workdirs)
    results["methods"][label] = {"workdirs": list(workdirs), "top1": {
        f"{e:g}": v for e, v in curves[label].items()}}
  os.makedirs(out, exist_ok=True)
  Image.fromarray(figure(curves, floor, seeds, margin)).save(
      os.path.join(out, f"{NAME}.png"))
  seed_note = ", ".join(f"{label}: {n} seed{'s' if n > 1 else ''}"
                        for label, n in seeds.items())
  summary = (f"res5 kNN top-1 (%) by epoch; margin = top-1 minus the "
             f"untrained network's ({seed_note}; mean ± half the range "
             f"over seeds).\n\n" + table(curves, floor))
  tables.write_summary(out, NAME, summary, results)
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", action="append", required=True,
                      help="LABEL=DIR[,DIR...]: one method, its seeds' "
                      "pretraining workdirs; repeat per method.")
  parser.add_argument("--floor", required=True,
                      help="The untrained network's kNN top-1: a fraction, "
                      "or a knn_results.json (or its folder).")
  parser.add_argument("--out", required=True, help="Output folder.")
  parser.add_argument("--margin", action="store_true",
                      help="Plot the margin over the floor, not top-1.")
  args = parser.parse_args()
  try:
    make([parse_run(r) for r in args.run], args.floor, args.out, args.margin)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"Error: {type(e).__name__}: {e}")


if __name__ == "__main__":
  main()
