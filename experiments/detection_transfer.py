r"""Detection transfer of pretrained backbones: COCO AP over seeds and schedules.

  python experiments/detection_transfer.py \
      --backbone=DetCo=workdirs/demo --backbone="MoCo v2=workdirs/demo_mocov2" \
      [--workdir=workdirs/detection_transfer] [--seeds=0,1] [--steps=100,500] \
      [--spread=std|half_range]

Fine-tunes the demo's RetinaNet (`configs/detection.py:demo`) from every
`--backbone=LABEL=PRETRAIN_WORKDIR`, and from the first one's architecture
untrained (`random_init`, the floor), for each schedule in `--steps` (the
paper's "few iterations" regime and a longer one) and each seed. It prints a
Markdown table of AP, AP50 and AP75 (mean ± the sample standard deviation
over the seeds, or ± half their range with `--spread=half_range`, in %),
each seed's AP and the minutes a run took, then for each schedule how far
apart the backbones are against their spreads. It writes the table
to `<workdir>/detection_transfer.md` and every run's figures and wall time
to `detection_transfer.json`. A run whose `detection_results.json` is
complete is reused, so an interrupted script resumes where it stopped; its
time is the one recorded when it ran (`transfer_seconds.json`).
"""

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Runnable from a checkout without installing: make `configs` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from configs import detection as detection_config  # pylint: disable=g-import-not-at-top
from detco_jax.eval import detection  # pylint: disable=g-import-not-at-top
from experiments import tables  # pylint: disable=g-import-not-at-top

FLOOR = "random init"
METRICS = ("AP", "AP50", "AP75")
# Beside a run's detection_results.json: how long the run took.
TIME_FILE = "transfer_seconds.json"


def transfer_config(pretrained: str, seed: int, steps: int,
                    random_init: bool = False):
  """The demo's detection transfer from `pretrained`, `steps` steps long."""
  config = detection_config.get_config(f"demo,seed={seed},steps={steps}")
  config.pretrained, config.random_init = pretrained, random_init
  return config


def _finished(run_dir: str, steps: int) -> dict[str, Any] | None:
  """The results of a run that has already evaluated its last step."""
  path = os.path.join(run_dir, "detection_results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  return results if results.get("steps") == steps else None


def run_one(pretrained: str, run_dir: str, seed: int, steps: int,
            random_init: bool = False
            ) -> tuple[dict[str, float], float | None]:
  """Fine-tunes and evaluates one detector, or reads a finished one.

  Args:
    pretrained: the pretraining workdir.
    run_dir: the detection job's workdir.
    seed: the job's seed.
    steps: its schedule's length.
    random_init: start from the untrained architecture instead.

  Returns:
    ({metric: value} for METRICS, the seconds the run took: measured now,
    or as recorded in `TIME_FILE` by the call that ran it; None if that
    call left no record).
  """
  start = time.time()
  results = _finished(run_dir, steps)
  time_file = os.path.join(run_dir, TIME_FILE)
  if results is not None:
    seconds = None
    if os.path.exists(time_file):
      with open(time_file) as f:
        seconds = json.load(f)["seconds"]
  else:
    results = detection.run(
        transfer_config(pretrained, seed, steps, random_init), run_dir)
    seconds = time.time() - start
    os.makedirs(run_dir, exist_ok=True)
    with open(time_file, "w") as f:
      json.dump({"seconds": seconds}, f)
  return {m: results[m] for m in METRICS}, seconds


def run_all(workdir: str, backbones: list[tuple[str, str]], seeds: list[int],
            schedules: list[int]) -> dict[str, Any]:
  """Every backbone (and the floor), schedule and seed.

  Args:
    workdir: the root of the detection workdirs.
    backbones: (label, pretraining workdir) pairs.
    seeds: the seeds.
    schedules: the schedules' lengths in steps.

  Returns:
    {"runs": {label: {steps: [per-seed figures]}}, "seconds": the same
    layout of wall times, "seeds", "schedules"}.
  """
  sources = [(label, path, False) for label, path in backbones]
  sources.append((FLOOR, backbones[0][1], True))
  runs, seconds = {}, {}
  for steps in schedules:
    for label, path, random_init in sources:
      for seed in seeds:
        name = "".join(c if c.isalnum() else "_" for c in label.lower())
        run_dir = os.path.join(workdir, f"{name}_{steps}steps_seed{seed}")
        figures, took = run_one(path, run_dir, seed, steps, random_init)
        runs.setdefault(label, {}).setdefault(str(steps), []).append(figures)
        seconds.setdefault(label, {}).setdefault(str(steps), []).append(took)
        when = "reused" if took is None else f"in {took / 60:.1f} min"
        print(f"{label}, {steps} steps, seed {seed}: {json.dumps(figures)} "
              f"{when}", flush=True)
  return {"runs": runs, "seconds": seconds, "seeds": seeds,
          "schedules": schedules}


SPREAD_NAMES = {"std": "std", "half_range": "half-ranges"}


def table(results: dict[str, Any], spread: str = "std") -> str:
  """The Markdown table: one row per backbone and schedule."""
  lines = ["| backbone | steps | " + " | ".join(METRICS)
           + " | AP per seed | min per run |",
           "|---" * (len(METRICS) + 4) + "|"]
  for steps in map(str, results["schedules"]):
    for label, by_steps in results["runs"].items():
      figures = by_steps[steps]
      cells = [tables.cell([f[m] for f in figures], spread)
               for m in METRICS]
      per_seed = " / ".join(f"{100 * f['AP']:.1f}" for f in figures)
      known = [t for t in results["seconds"][label][steps] if t is not None]
      minutes = f"{np.median(known) / 60:.1f}" if known else "-"
      lines.append(f"| {label} | {steps} | " + " | ".join(cells)
                   + f" | {per_seed} | {minutes} |")
  return "\n".join(lines)


def ordering(results: dict[str, Any], spread: str = "std") -> str:
  """Per schedule, each backbone against the next: the AP gap, and whether
  it exceeds the two spreads together (for half-ranges: the seed ranges
  are disjoint)."""
  lines = []
  labels = list(results["runs"])
  measure = tables.SPREADS[spread]
  name = SPREAD_NAMES[spread]
  for steps in map(str, results["schedules"]):
    for better, worse in zip(labels, labels[1:]):
      a, ha = measure([f["AP"] for f in results["runs"][better][steps]])
      b, hb = measure([f["AP"] for f in results["runs"][worse][steps]])
      verdict = (f"beyond the two {name}" if abs(a - b) > ha + hb
                 else f"within the two {name}")
      lines.append(f"{steps} steps: {better} - {worse} = {a - b:+.1f} AP "
                   f"({name} {ha:.1f} and {hb:.1f}: {verdict})")
  return "\n".join(lines)


def _backbone(text: str) -> tuple[str, str]:
  label, sep, path = text.partition("=")
  if not sep or not label or not path:
    raise argparse.ArgumentTypeError(
        f"--backbone={text!r}: write LABEL=PRETRAIN_WORKDIR, e.g. "
        "--backbone=DetCo=workdirs/demo")
  return label, path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backbone", type=_backbone, action="append",
                      required=True, help="LABEL=PRETRAIN_WORKDIR; repeat.")
  parser.add_argument("--workdir", default="workdirs/detection_transfer")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--steps", default="100,500",
                      help="Schedules, in fine-tuning steps.")
  parser.add_argument("--spread", default="std", choices=sorted(SPREAD_NAMES),
                      help="± the sample standard deviation over the seeds "
                      "(n - 1), or half their range.")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  schedules = [int(s) for s in args.steps.split(",")]
  start = time.time()
  results = run_all(args.workdir, args.backbone, seeds, schedules)
  results["total_seconds"] = time.time() - start
  spread = ("sample standard deviation (n - 1)" if args.spread == "std"
            else "half the range")
  summary = (f"{table(results, args.spread)}\n\n"
             f"{ordering(results, args.spread)}\n\nSeeds {seeds}; mean ± "
             f"{spread} over the seeds, in %. Total "
             f"{results['total_seconds'] / 60:.0f} min.\n")
  tables.write_summary(args.workdir, "detection_transfer", summary, results)


if __name__ == "__main__":
  main()
