r"""A small-scale reproduction of DetCo's ablation on the built-in dataset.

  python experiments/ablation.py [--workdir=workdirs/ablation] [--seeds=0,1]
      [--scale=ablation] [--detection_steps=300] [--methods=all]

Pretrains the methods with equal budgets (`--scale` names the variant of
configs/detco.py that sets the budget: `ablation` is ResNet-18 of width 16,
32 px views, 3 epochs of `detco_shapes`; `demo` is the README's demo run),
each with every seed: DetCo's ablation

  MoCo v2          Res5 only, global<->global        (`mocov2`)
  + multi-level    all four stages, global<->global  (`global_only`)
  + global-local   Res5 only, gg + ll + gl           (`single_level`)
  DetCo            all four stages, gg + ll + gl     (`detco`, the default)

and the classic pretext tasks (detco_jax/methods/)

  rotation         0/90/180/270 degrees              (`rotation`)
  jigsaw perm.     100 permutations of 3 x 3 tiles   (`jigsaw_perm`)
  rel. patch       8 neighbour positions             (`rel_patch`)

(`--methods` picks some by their keys, e.g. `--methods=detco,rotation`)

then probes every backbone with the linear probe (top-1 per stage), the
dense probe (mIoU per stage) and detection transfer (RetinaNet fine-tuned
for `--detection_steps` steps on the built-in boxes: COCO AP and AP50; 0
leaves it out), and an untrained backbone once as the floor. A pretext
task's row also gives its own accuracy, over the last log window of its
training (chance: 25%, 1% and 12.5%).
It prints a Markdown table of mean +- half-range over the seeds and writes
it, with every run's figures and the wall time, to `<workdir>/ablation.md`
and `ablation.json`. Runs already finished in the workdir are reused, so an
interrupted script resumes where it stopped.
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

from configs import dense_probe  # pylint: disable=g-import-not-at-top
from configs import detco  # pylint: disable=g-import-not-at-top
from configs import linear_probe  # pylint: disable=g-import-not-at-top
from detco_jax import pretrained as detco_pretrained  # pylint: disable=g-import-not-at-top
from detco_jax import train  # pylint: disable=g-import-not-at-top
from detco_jax.eval import dense  # pylint: disable=g-import-not-at-top
from detco_jax.eval import detection  # pylint: disable=g-import-not-at-top
from detco_jax.eval import linear  # pylint: disable=g-import-not-at-top
from experiments import detection_transfer  # pylint: disable=g-import-not-at-top
from experiments import tables  # pylint: disable=g-import-not-at-top

STAGES = ("res2", "res3", "res4", "res5")
# (row label, config variant added to the scale): DetCo's ablation.
METHODS = (
    ("MoCo v2", "mocov2"),
    ("+ multi-level", "global_only"),
    ("+ global-local", "single_level"),
    ("DetCo", ""),
)
# The classic pretext tasks, as methods of the same budget.
PRETEXT_METHODS = (
    ("rotation", "rotation"),
    ("jigsaw perm.", "jigsaw_perm"),
    ("rel. patch", "rel_patch"),
)
ALL_METHODS = METHODS + PRETEXT_METHODS
FLOOR = "random init"
# The last log window's scalars of each pretraining, kept beside it: a
# finished run that is reused trains no step and so logs nothing.
LAST_WINDOW = "pretrain_last.json"
DETECTION_METRICS = ("AP", "AP50")


def pretrain_config(scale: str, variant: str, seed: int):
  """The equal-budget pretraining config of one method."""
  config = detco.get_config(",".join(filter(None, (scale, variant))))
  config.seed = seed
  return config


def _eval_sizes(pretrained: str) -> tuple[int, int]:
  """The pretraining run's evaluation crop and resize sizes."""
  views = detco_pretrained.load_config(pretrained).eval_views
  return views.crop_size, views.resize_size


def linear_config(pretrained: str, seed: int, random_init: bool = False):
  """The demo's linear probe at the pretraining's eval sizes, 3 epochs."""
  config = linear_probe.get_config("demo")
  (config.eval_views.crop_size,
   config.eval_views.resize_size) = _eval_sizes(pretrained)
  config.num_epochs, config.lr_decay_epochs = 3, (2,)
  config.pretrained, config.seed, config.random_init = (pretrained, seed,
                                                        random_init)
  return config


def dense_config(pretrained: str, seed: int, random_init: bool = False):
  """The demo's dense probe at the pretraining's eval sizes, 1 epoch."""
  config = dense_probe.get_config("demo")
  config.views.crop_size, config.views.resize_size = _eval_sizes(pretrained)
  config.num_epochs = 1
  config.pretrained, config.seed, config.random_init = (pretrained, seed,
                                                        random_init)
  return config


# The demo's detection transfer, `steps` steps long: the same run as the
# detection-transfer table's.
detection_transfer_config = detection_transfer.transfer_config


def probe(pretrained: str, workdir: str, seed: int, random_init: bool = False,
          detection_steps: int = 0) -> dict[str, dict[str, float]]:
  """Linear top-1 and dense mIoU per stage (and detection AP) of a backbone.

  Args:
    pretrained: the pretraining workdir.
    workdir: where the probes' workdirs go.
    seed: the probes' seed.
    random_init: probe the untrained architecture instead.
    detection_steps: steps of detection fine-tuning; 0: none.

  Returns:
    {"linear_top1": {stage: value}, "dense_miou": {stage: value}}, and
    "detection": {"AP": value, "AP50": value} with detection.
  """
  lin = linear.run(linear_config(pretrained, seed, random_init),
                   os.path.join(workdir, "linear"))
  den = dense.run(dense_config(pretrained, seed, random_init),
                  os.path.join(workdir, "dense"))
  figures = {"linear_top1": {s: lin["stages"][s]["top1"] for s in STAGES},
             "dense_miou": {s: den["stages"][s]["miou"] for s in STAGES}}
  if detection_steps > 0:
    det = detection.run(
        detection_transfer_config(pretrained, seed, detection_steps,
                                  random_init),
        os.path.join(workdir, f"detection_{detection_steps}"))
    figures["detection"] = {k: det[k] for k in DETECTION_METRICS}
  return figures


def select_methods(keys: str) -> tuple[tuple[str, str], ...]:
  """The (label, variant) rows that `--methods` names, in table order.

  Args:
    keys: "all", or comma-separated variant keys ("detco" for DetCo).

  Returns:
    The rows.

  Raises:
    ValueError: an unknown key; the message lists the choices.
  """
  if keys == "all":
    return ALL_METHODS
  known = {variant or "detco": (label, variant)
           for label, variant in ALL_METHODS}
  wanted = keys.split(",")
  unknown = [k for k in wanted if k not in known]
  if unknown:
    raise ValueError(f"--methods: unknown {unknown}; choose from "
                     f"{sorted(known)} or 'all'.")
  return tuple(row for row in ALL_METHODS if (row[1] or "detco") in wanted)


def pretrain(config: Any, run_dir: str) -> dict[str, float]:
  """Runs (or reuses) one pretraining; its last log window's scalars."""
  pretrain_dir = os.path.join(run_dir, "pretrain")
  last = train.run(config, pretrain_dir)
  path = os.path.join(run_dir, LAST_WINDOW)
  if last:
    with open(path, "w") as f:
      json.dump({k: float(v) for k, v in last.items()}, f)
  elif os.path.exists(path):
    with open(path) as f:
      last = json.load(f)
  return last


def run_all(workdir: str, seeds: list[int], scale: str,
            detection_steps: int = 0,
            methods: tuple[tuple[str, str], ...] = METHODS
            ) -> dict[str, Any]:
  """Pretrains and probes every method and seed, plus the floor.

  Args:
    workdir: the ablation's root directory.
    seeds: the seeds.
    scale: the configs/detco.py variant that sets the budget.
    detection_steps: steps of detection fine-tuning per backbone; 0: none.
    methods: the (label, variant) rows.

  Returns:
    {"runs": {label: [per-seed figures]}, "seconds": {label: [...]}}.
  """
  runs, seconds = {}, {}
  for label, variant in methods:
    for seed in seeds:
      start = time.time()
      run_dir = os.path.join(workdir, f"{variant or 'detco'}_seed{seed}")
      pretrain_dir = os.path.join(run_dir, "pretrain")
      last = pretrain(pretrain_config(scale, variant, seed), run_dir)
      figures = probe(pretrain_dir, run_dir, seed,
                      detection_steps=detection_steps)
      if "pretext_acc" in last:
        figures["pretext_acc"] = last["pretext_acc"]
      runs.setdefault(label, []).append(figures)
      seconds.setdefault(label, []).append(time.time() - start)
      print(f"{label} seed {seed}: {json.dumps(figures)}", flush=True)
  # The floor: the same architecture untrained (probes only).
  start = time.time()
  first = os.path.join(workdir, f"{methods[-1][1] or 'detco'}_seed{seeds[0]}",
                       "pretrain")
  runs[FLOOR] = [probe(first, os.path.join(workdir, "random_init"), seeds[0],
                       random_init=True, detection_steps=detection_steps)]
  seconds[FLOOR] = [time.time() - start]
  return {"runs": runs, "seconds": seconds, "seeds": seeds, "scale": scale}


def table(results: dict[str, Any]) -> str:
  """The Markdown table: linear top-1 and dense mIoU per stage (and the
  detection APs, when every run has them; the pretext-task accuracy, when
  a run has it), in %."""
  runs = results["runs"]
  with_detection = all("detection" in f for figures in runs.values()
                       for f in figures)
  metrics = DETECTION_METRICS if with_detection else ()
  with_pretext = any("pretext_acc" in f for figures in runs.values()
                     for f in figures)
  head = ("| method | " + " | ".join(f"linear {s}" for s in STAGES) + " | "
          + " | ".join(f"mIoU {s}" for s in STAGES)
          + "".join(f" | det {m}" for m in metrics)
          + (" | pretext acc" if with_pretext else "") + " |")
  columns = 1 + 2 * len(STAGES) + len(metrics) + with_pretext
  lines = [head, "|---" * columns + "|"]
  for label, figures in runs.items():
    cells = [tables.cell([f["linear_top1"][s] for f in figures]) for s in STAGES]
    cells += [tables.cell([f["dense_miou"][s] for f in figures]) for s in STAGES]
    cells += [tables.cell([f["detection"][m] for f in figures]) for m in metrics]
    if with_pretext:
      accuracies = [f["pretext_acc"] for f in figures if "pretext_acc" in f]
      cells.append(tables.cell(accuracies) if accuracies else "—")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/ablation")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--scale", default="ablation",
                      help="configs/detco.py variant setting the budget.")
  parser.add_argument("--detection_steps", type=int, default=300,
                      help="Detection fine-tuning steps per backbone (0: "
                      "no detection column).")
  parser.add_argument("--methods", default="all",
                      help="'all', or comma-separated keys: detco, mocov2, "
                      "global_only, single_level, rotation, jigsaw_perm, "
                      "rel_patch.")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = select_methods(args.methods)
  start = time.time()
  results = run_all(args.workdir, seeds, args.scale, args.detection_steps,
                    methods)
  results["total_seconds"] = time.time() - start
  text = table(results)
  summary = (f"{text}\n\nSeeds {seeds}; mean ± half-range, in %. Total "
             f"{results['total_seconds'] / 60:.0f} min.\n")
  tables.write_summary(args.workdir, "ablation", summary, results)


if __name__ == "__main__":
  main()
