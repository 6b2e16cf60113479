r"""A small-scale reproduction of DetCo's ablation on the built-in dataset.

  python experiments/ablation.py [--workdir=workdirs/ablation] [--seeds=0,1,2]
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

and, as the ceiling, the same network trained on the label

  supervised       one global view, linear classifier (`supervised`)

(`--methods` picks some by their keys, e.g. `--methods=detco,rotation`)

then probes every backbone with the linear probe (top-1 per stage), the
dense probe (mIoU per stage, 11 classes) and its foreground/background
variant, the attention job's object/background ratio per stage, and
detection transfer (RetinaNet fine-tuned for
`--detection_steps` steps on the built-in boxes: COCO AP and AP50; 0 leaves
it out), and the untrained architecture as the floor, initialised with each
seed. A pretext task's row also gives its own accuracy, over the last log
window of its training (chance: 25%, 1% and 12.5%; the supervised row's is
its training accuracy on the label).
It prints a Markdown table of mean ± sample standard deviation over the
seeds, and each method's difference from MoCo v2 on linear res5, fg/bg mIoU
and detection AP with its standard error, and writes them, with every
run's figures and the wall time, to `<workdir>/ablation.md` and
`ablation.json`. Seeds run one after another, every method of a seed
before the next seed; runs already finished in the workdir are reused, so
an interrupted script resumes where it stopped.
"""

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

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
from detco_jax.eval import attention  # pylint: disable=g-import-not-at-top
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
# The ceiling: the same network and budget trained on the label.
SUPERVISED = (("supervised", "supervised"),)
ALL_METHODS = METHODS + PRETEXT_METHODS + SUPERVISED
FLOOR = "random init"
# The last log window's scalars of each pretraining, kept beside it: a
# finished run that is reused trains no step and so logs nothing.
LAST_WINDOW = "pretrain_last.json"
DETECTION_METRICS = ("AP", "AP50")
# The table's column groups: (figures key, header format, sub-keys, in %;
# the attention ratios are shown as they are).
COLUMNS = (
    ("linear_top1", "linear {}", STAGES, True),
    ("dense_miou", "mIoU {}", STAGES, True),
    ("dense_fgbg_miou", "fg/bg {}", STAGES, True),
    ("detection", "det {}", DETECTION_METRICS, True),
    ("attention", "attn {}", STAGES, False),
)
# The measures each method is compared on with the baseline (`contrasts`):
# the paper's two protocols, linear classification on the last stage and
# detection, and the fg/bg dense probe averaged over the stages that
# multi-level supervision trains.
CONTRASTS = (
    ("linear_top1/res5", "linear res5"),
    ("dense_fgbg_miou/mean", "fg/bg mIoU, mean of res2..res5"),
    ("detection/AP", "det AP"),
)


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


def dense_config(pretrained: str, seed: int, random_init: bool = False,
                 fgbg: bool = False):
  """The demo's dense probe at the pretraining's eval sizes, 1 epoch; with
  `fgbg`, its two-class (foreground/background) variant."""
  config = dense_probe.get_config("demo,fgbg" if fgbg else "demo")
  config.views.crop_size, config.views.resize_size = _eval_sizes(pretrained)
  config.num_epochs = 1
  config.pretrained, config.seed, config.random_init = (pretrained, seed,
                                                        random_init)
  return config


# The demo's detection transfer, `steps` steps long: the same run as the
# detection-transfer table's.
detection_transfer_config = detection_transfer.transfer_config


def run_probe(job: Any, config: Any, workdir: str) -> dict[str, Any]:
  """Runs a probe (`job.run(config, workdir)`), or reads the results a
  finished run of the same backbone left in `workdir`.

  A probe writes its results file (`job.RESULTS_FILE`) only once it has
  evaluated, so the file means the run is done; reading it skips the
  restore and the evaluation that re-running a finished job costs.

  Args:
    job: the probe's module (`linear`, `dense` or `detection`).
    config: its config.
    workdir: its workdir.

  Returns:
    The probe's results.
  """
  path = os.path.join(workdir, job.RESULTS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if (results.get("pretrained"), results.get("random_init")) == (
        config.pretrained, config.random_init):
      return results
  return job.run(config, workdir)


# Test images of the object/background attention ratio (the attention job's).
ATTENTION_IMAGES = 500


def attention_ratios(pretrained: str, workdir: str, seed: int,
                     random_init: bool = False) -> dict[str, float]:
  """The backbone's object/background attention ratio per stage.

  The attention job's measure (`eval.attention.stage_ratios`, over the
  first `ATTENTION_IMAGES` test images); the untrained backbone is its
  floor, `pretrained.random_init` with `seed`. Kept in
  `<workdir>/attention_ratio.json` and read back from there.

  Args:
    pretrained: the pretraining workdir (its architecture for the floor).
    workdir: where the ratios are kept.
    seed: the floor's initialisation seed.
    random_init: measure the untrained backbone.

  Returns:
    {stage: ratio}.
  """
  path = os.path.join(workdir, attention.RATIO_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)["ratios"]
  config = detco_pretrained.load_config(pretrained)
  backbone = (detco_pretrained.random_init(config, seed) if random_init
              else detco_pretrained.load(pretrained))
  images, masks = attention.load_masked_images(config, None, ATTENTION_IMAGES)
  ratios = attention.stage_ratios(backbone, images, masks)
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"images": len(images), "ratios": ratios}, f)
  return ratios


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
    {"linear_top1": {stage: value}, "dense_miou": {stage: value},
    "dense_fgbg_miou": {stage: value}, "attention": {stage: ratio}}, and
    "detection": {"AP": value, "AP50": value} with detection.
  """
  lin = run_probe(linear, linear_config(pretrained, seed, random_init),
                  os.path.join(workdir, "linear"))
  den = run_probe(dense, dense_config(pretrained, seed, random_init),
                  os.path.join(workdir, "dense"))
  fgbg = run_probe(dense, dense_config(pretrained, seed, random_init,
                                       fgbg=True),
                   os.path.join(workdir, "dense_fgbg"))
  figures = {"linear_top1": {s: lin["stages"][s]["top1"] for s in STAGES},
             "dense_miou": {s: den["stages"][s]["miou"] for s in STAGES},
             "dense_fgbg_miou": {s: fgbg["stages"][s]["miou"]
                                 for s in STAGES},
             "attention": attention_ratios(pretrained, workdir, seed,
                                           random_init)}
  if detection_steps > 0:
    det = run_probe(
        detection, detection_transfer_config(pretrained, seed,
                                             detection_steps, random_init),
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
  # Seed-major, so an interrupted table has whole seeds; each seed's floor
  # is the architecture initialised with that seed, probed the same way.
  for seed in seeds:
    for label, variant in methods:
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
    start = time.time()
    # The floor reads its architecture from the seed's last pretraining,
    # and its probes' workdirs name that run: the probes refuse a workdir
    # made from another run, which another `--methods` may have left.
    source = methods[-1][1] or "detco"
    last_run = os.path.join(workdir, f"{source}_seed{seed}", "pretrain")
    figures = probe(last_run,
                    os.path.join(workdir, f"random_init_{source}_seed{seed}"),
                    seed, random_init=True, detection_steps=detection_steps)
    runs.setdefault(FLOOR, []).append(figures)
    seconds.setdefault(FLOOR, []).append(time.time() - start)
    print(f"{FLOOR} seed {seed}: {json.dumps(figures)}", flush=True)
  return {"runs": runs, "seconds": seconds, "seeds": seeds, "scale": scale}


def table(results: dict[str, Any]) -> str:
  """The Markdown table of every method: mean ± standard deviation over
  the seeds, in % (the attention ratios as they are).

  A column group (`COLUMNS`) is shown when every run has it, so the table of
  an older workdir (no fg/bg probe, no detection) still reads; the pretext
  accuracy when any run has it ("—" for the others).

  Args:
    results: `run_all`'s.

  Returns:
    The table.
  """
  runs = results["runs"]
  every = [f for figures in runs.values() for f in figures]
  groups = [group for group in COLUMNS if all(group[0] in f for f in every)]
  with_pretext = any("pretext_acc" in f for f in every)
  heads = [head.format(sub) for _, head, subs, _ in groups for sub in subs]
  heads += ["pretext acc"] if with_pretext else []
  lines = ["| method | " + " | ".join(heads) + " |",
           "|---" * (1 + len(heads)) + "|"]
  for label, figures in runs.items():
    cells = [tables.cell([f[key][sub] for f in figures], "std", percent)
             for key, _, subs, percent in groups for sub in subs]
    if with_pretext:
      accuracies = [f["pretext_acc"] for f in figures if "pretext_acc" in f]
      cells.append(tables.cell(accuracies, "std") if accuracies else "—")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def summary_figure(figures: dict[str, Any], measure: str) -> float:
  """One run's figure for a `CONTRASTS` measure: a (group, key) cell, or
  the mean over the stages of a per-stage group ("group/mean")."""
  group, key = measure.split("/")
  if key == "mean":
    return float(np.mean([figures[group][s] for s in STAGES]))
  return float(figures[group][key])


def contrasts(results: dict[str, Any], baseline: str = "MoCo v2") -> str:
  """Each method against `baseline` on the `CONTRASTS` measures.

  A difference is "beyond the seed spread" when it exceeds twice its
  standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b), with each row's sample
  standard deviation; rows of one seed have no spread and are not judged.

  Args:
    results: `run_all`'s.
    baseline: the row the others are compared with.

  Returns:
    One line per method and measure, or "" without the baseline row.
  """
  runs = results["runs"]
  if baseline not in runs:
    return ""
  lines = []
  for measure, name in CONTRASTS:
    if not all(measure.split("/")[0] in f for figures in runs.values()
               for f in figures):
      continue
    base = [summary_figure(f, measure) for f in runs[baseline]]
    base_mean, base_std = tables.mean_std(base)
    for label, figures in runs.items():
      if label == baseline:
        continue
      other = [summary_figure(f, measure) for f in figures]
      other_mean, other_std = tables.mean_std(other)
      delta = other_mean - base_mean
      if min(len(base), len(other)) < 2:
        lines.append(f"{name}: {label} - {baseline} = {delta:+.1f} "
                     f"(one seed: not judged)")
        continue
      se = np.sqrt(base_std**2 / len(base) + other_std**2 / len(other))
      verdict = "beyond" if abs(delta) > 2 * se else "within"
      lines.append(f"{name}: {label} - {baseline} = {delta:+.1f} ± {se:.1f} "
                   f"(standard error; {verdict} the seed spread)")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/ablation")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--scale", default="ablation",
                      help="configs/detco.py variant setting the budget.")
  parser.add_argument("--detection_steps", type=int, default=300,
                      help="Detection fine-tuning steps per backbone (0: "
                      "no detection column).")
  parser.add_argument("--methods", default="all",
                      help="'all', or comma-separated keys: detco, mocov2, "
                      "global_only, single_level, rotation, jigsaw_perm, "
                      "rel_patch, supervised.")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = select_methods(args.methods)
  start = time.time()
  results = run_all(args.workdir, seeds, args.scale, args.detection_steps,
                    methods)
  results["total_seconds"] = time.time() - start
  text = table(results)
  versus = contrasts(results)
  if versus:
    text += "\n\n" + versus
  summary = (f"{text}\n\nSeeds {seeds}; mean ± standard deviation, in %. "
             f"Total "
             f"{results['total_seconds'] / 60:.0f} min.\n")
  tables.write_summary(args.workdir, "ablation", summary, results)


if __name__ == "__main__":
  main()
