"""The suite's part 5: a learning curve as long as the time left allows.

The demo's network and data (`configs/detco.py:demo`: ResNet-18 of width
16, 32 px views of the built-in `detco_shapes`), DetCo and MoCo v2, each
trained with the real job (`train.run`) for the same number of epochs, with
the kNN monitor after every epoch; then the linear probe (`linear.run`,
`configs/linear_probe.py:demo,epochs=3`) of each backbone and of the
untrained network (the floor). This is the learning evidence a 2-core CPU
cannot give: the demo's 10 epochs take it 22 minutes.

How many epochs: a short calibration run (two log windows of 5 DetCo steps)
gives the steady step time and the start-up cost (compilation, data); a kNN
evaluation of a fifth of the monitor's examples, counted five times, its
cost, of which a probe's epoch is counted as 1.5 (one forward pass over
more images). The epochs are the most that fit the time left after the
three probes, the same for both methods, at most `Sizes.max_epochs`. In
smoke mode the epochs are fixed and the costs are read off the DetCo run.

The workdirs stay under `<out>/curve/` (TensorBoard events, checkpoints,
each probe's results), so every figure can be traced to its run.
"""

import os
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from detco_jax import config_lib
from detco_jax import pretrained
from detco_jax import sharding
from detco_jax import train
from detco_jax.benchmark import budget as budget_lib
from detco_jax.benchmark import report as report_lib
from detco_jax.data import sources
from detco_jax.eval import knn
from detco_jax.eval import linear

Part = report_lib.Part
STAGES = ("res2", "res3", "res4", "res5")
# (row label, workdir name, configs/detco.py variant added to the scale).
METHODS = (("DetCo", "detco", ""), ("MoCo v2", "mocov2", "mocov2"))
FLOOR = "random init (floor)"
# A probe epoch is one training pass over the train split (forward only),
# counted as this many kNN evaluations (the monitor extracts features of a
# train subset and the test split: fewer images).
_PROBE_EPOCH_PER_KNN = 1.5
# Steps per log window of the calibration run (it runs two).
_CALIBRATION_WINDOW = 5
# The calibration's kNN evaluation uses this fraction of the examples.
_KNN_FRACTION = 5
# Seconds below which the part does not start (generating the data and the
# calibration's compilations alone take about this long).
_MIN_CALIBRATION_S = 60.0


def pretrain_config(scale: str, variant: str, data_dir: str | None,
                    epochs: int, log_every: int) -> Any:
  """The demo pretraining of one method for `epochs`, kNN every epoch."""
  from configs import detco  # pylint: disable=g-import-not-at-top
  config = detco.get_config(",".join(filter(None, (scale, variant))))
  config.num_epochs = epochs
  config.total_steps = -1  # The epochs count (the tiny scale sets steps).
  if data_dir:
    config.data.data_dir = data_dir
  steps = config_lib.total_steps(config)
  config.knn.every_steps = config_lib.steps_per_epoch(config)
  config.log_every = min(log_every, steps)
  config.checkpoint_every = steps  # Only the end: saving costs time.
  config.write_views_image = False
  return config


def probe_config(probe: str, pretrained_dir: str, data_dir: str | None,
                 random_init: bool = False) -> Any:
  """The linear probe `configs/linear_probe.py:<probe>` of a run."""
  from configs import linear_probe  # pylint: disable=g-import-not-at-top
  config = linear_probe.get_config(probe)
  config.pretrained = pretrained_dir
  config.random_init = random_init
  if data_dir:
    config.data.data_dir = data_dir
  return config


def knn_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, kNN top-1) of every monitor run in a pretraining workdir."""
  events = event_accumulator.EventAccumulator(
      os.fspath(workdir), size_guidance={event_accumulator.SCALARS: 0,
                                         event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()
  tag = "knn/top1"
  if tag in tags["tensors"]:
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in events.Tensors(tag)]
  if tag in tags["scalars"]:
    return [(e.step, float(e.value)) for e in events.Scalars(tag)]
  return []


def plan_epochs(left_s: float, epoch_s: float, startup_s: float,
                probes_s: float, max_epochs: int) -> int:
  """The epochs each of the two methods can train in `left_s`.

  Args:
    left_s: seconds left.
    epoch_s: one epoch of one method, with its kNN evaluation.
    startup_s: one run's fixed cost (compilation, data, saving).
    probes_s: the three probes at the end.
    max_epochs: the cap.

  Returns:
    0 to `max_epochs`.
  """
  spare = left_s - probes_s - 2 * startup_s
  return max(0, min(max_epochs, int(spare // (2 * epoch_s))))


def _command(config_string: str, epochs: int, every: int,
             workdir: str) -> str:
  return (f"python -m detco_jax.main --config=configs/detco.py:"
          f"{config_string},epochs={epochs} --config.knn.every_steps={every} "
          f"--workdir={workdir}")


def run_part(ctx: Any, part: Part) -> None:
  """Calibrates, trains DetCo and MoCo v2, probes them and the floor.

  In smoke mode (`ctx.budget.force`) the epochs are `Sizes.max_epochs` and
  no calibration run is made: the calibration row's figures then come from
  the DetCo run itself.

  Args:
    ctx: the suite's `Context` (sizes, budget, out, data_dir, log, write).
    part: where the rows go.
  """
  sizes, budget = ctx.sizes, ctx.budget
  if not budget.allows(_MIN_CALIBRATION_S):
    part.skip("the learning curve", f"{budget.left():.0f} s left, less than "
              f"the {_MIN_CALIBRATION_S:.0f} s its calibration takes on a "
              "fast host")
    return
  root = epath.Path(ctx.out) / "curve"
  base = pretrain_config(sizes.curve, "", ctx.data_dir, 1, sizes.log_every)
  start = budget.elapsed()
  sources.prepare_builtin(base.data)  # Generates the dataset if missing.
  figures = {"prepare_data_s": budget.elapsed() - start,
             "knn_s": _knn_seconds(base, budget),
             "steps_per_epoch": config_lib.steps_per_epoch(base)}
  if budget.force:
    epochs, command = sizes.max_epochs, None
  else:
    command = _calibrate(ctx, root, figures)
    epochs = budget_lib.agree(plan_epochs(
        budget.left(), figures["predicted_epoch_s"], figures["startup_s"],
        3 * figures["predicted_probe_s"], sizes.max_epochs))
    figures["epochs"] = epochs
    part.add({"run": "calibration", "scale": sizes.curve}, figures, command)
    ctx.write()
    if epochs < 1:
      part.skip("DetCo and MoCo v2 pretraining", f"one epoch each "
                f"({figures['predicted_epoch_s']:.0f} s, with kNN) plus "
                f"start-up ({figures['startup_s']:.0f} s) and the probes "
                f"({3 * figures['predicted_probe_s']:.0f} s) do not fit the "
                f"{budget.left():.0f} s left")
      return

  runs = {}
  for label, key, variant in METHODS:
    config = pretrain_config(sizes.curve, variant, ctx.data_dir, epochs,
                             sizes.log_every)
    workdir = os.fspath(_fresh(root / key))
    start = budget.elapsed()
    last = train.run(config, workdir)
    seconds = budget.elapsed() - start
    if command is None and label == "DetCo":
      # Smoke: the calibration's figures, from this run.
      _costs(figures, config.batch_size / last["images_per_sec"],
             seconds - epochs * figures["knn_s"], epochs
             * figures["steps_per_epoch"], sizes.probe)
      figures["epochs"] = epochs
      part.add({"run": "calibration", "scale": sizes.curve,
                "source": "the DetCo run (smoke mode)"}, figures,
               _command(sizes.curve, epochs, figures["steps_per_epoch"],
                        workdir))
    _add_run(part, label, variant, sizes.curve, workdir, last, seconds,
             epochs, figures["steps_per_epoch"])
    runs[label] = workdir
    ctx.write()

  probes = [(label, runs[label], False) for label, _, _ in METHODS]
  probes.append((FLOOR, runs["DetCo"], True))
  for label, pretrained_dir, random_init in probes:
    if not budget.allows(figures["predicted_probe_s"]):
      part.skip(f"linear probe of {label}", f"predicted "
                f"{figures['predicted_probe_s']:.0f} s > "
                f"{budget.left():.0f} s left")
      continue
    _probe(ctx, part, root, label, pretrained_dir, random_init)
  logging.info("Learning curve done.")


def _knn_seconds(base: Any, budget: Any) -> float:
  """One kNN evaluation's seconds: a fifth of the examples, times five.

  Its fixed costs are counted five times too: an overestimate. Its programs
  (the feature extractor) are the monitor's, which the compilation cache
  then serves.
  """
  mesh = sharding.make_mesh()
  small = base.copy_and_resolve_references()
  small.knn.train_examples = max(small.knn.batch_size,
                                 base.knn.train_examples // _KNN_FRACTION)
  small.knn.test_examples = max(small.knn.batch_size,
                                base.knn.test_examples // _KNN_FRACTION)
  start = budget.elapsed()
  knn.evaluate(pretrained.random_init(small, 0, mesh), small, mesh)
  return (budget.elapsed() - start) * _KNN_FRACTION


def _calibrate(ctx: Any, root: epath.Path, figures: dict[str, float]) -> str:
  """Two short log windows of DetCo; adds the costs to `figures`.

  The second window's speed is the steady state; the rest of the run's
  time is its start-up (compilation, data, saving).

  Returns:
    The calibration run's command.
  """
  sizes = ctx.sizes
  window = min(sizes.log_every, _CALIBRATION_WINDOW)
  config = pretrain_config(sizes.curve, "", ctx.data_dir, 1, window)
  config.total_steps = 2 * window
  config.knn.every_steps = 0
  config.checkpoint_every = 2 * window
  workdir = os.fspath(_fresh(root / "calibration"))
  start = ctx.budget.elapsed()
  last = train.run(config, workdir)
  figures["calibration_s"] = ctx.budget.elapsed() - start
  _costs(figures, config.batch_size / last["images_per_sec"],
         figures["calibration_s"], 2 * window, sizes.probe)
  return (_command(sizes.curve, 1, 0, workdir)
          + f" --config.total_steps={2 * window}")


def _costs(figures: dict[str, float], step_s: float, run_s: float,
           steps: int, probe: str) -> None:
  """Adds step_s, startup_s and the predicted epoch and probe seconds.

  Args:
    figures: the calibration's figures so far (knn_s, steps_per_epoch).
    step_s: one steady step.
    run_s: a run's seconds without its kNN evaluations.
    steps: its steps.
    probe: the probes' config string (their epochs).
  """
  startup_s = max(0.0, run_s - steps * step_s)
  knn_s = figures["knn_s"]
  figures.update(
      step_s=step_s, startup_s=startup_s,
      predicted_epoch_s=figures["steps_per_epoch"] * step_s + knn_s,
      predicted_probe_s=0.5 * startup_s + knn_s * (
          0.5 + _PROBE_EPOCH_PER_KNN * _probe_epochs(probe)))


def _add_run(part: Part, label: str, variant: str, scale: str, workdir: str,
             last: dict[str, float], seconds: float, epochs: int,
             steps_per_epoch: int) -> None:
  """A pretraining run's row: its kNN top-1 after every epoch."""
  curve = knn_curve(workdir)
  figures = {"pretrain_s": seconds, "epochs": epochs,
             "final_knn_top1": curve[-1][1] if curve else None}
  for step, value in curve:
    figures[f"epoch_{round(step / steps_per_epoch):03d}_knn_top1"] = value
  config_string = ",".join(filter(None, (scale, variant)))
  part.add({"run": label, "scale": scale,
            "final_loss": round(float(last["loss"]), 4)}, figures,
           _command(config_string, epochs, steps_per_epoch, workdir))
  logging.info("%s: %d epochs in %.0f s, kNN %s", label, epochs, seconds,
               [round(v, 3) for _, v in curve])


def _probe(ctx: Any, part: Part, root: epath.Path, label: str,
           pretrained_dir: str, random_init: bool) -> None:
  """The linear probe of a run (or of its untrained network): a row."""
  probe = ctx.sizes.probe
  config = probe_config(probe, pretrained_dir, ctx.data_dir, random_init)
  name = "floor" if random_init else label.replace(" ", "_").lower()
  workdir = os.fspath(_fresh(root / f"linear_{name}"))
  start = ctx.budget.elapsed()
  results = linear.run(config, workdir)
  figures = {f"{s}_top1": results["stages"][s]["top1"] for s in STAGES}
  figures["probe_s"] = ctx.budget.elapsed() - start
  part.add({"run": f"linear probe: {label}"}, figures,
           f"python -m detco_jax.eval.linear --config=configs/"
           f"linear_probe.py:{probe} --config.pretrained={pretrained_dir}"
           + (" --config.random_init=True" if random_init else "")
           + f" --workdir={workdir}")
  ctx.write()


def _probe_epochs(probe: str) -> float:
  from configs import linear_probe  # pylint: disable=g-import-not-at-top
  return float(linear_probe.get_config(probe).num_epochs)


def _fresh(path: epath.Path) -> epath.Path:
  """`path`, emptied: a run left by an earlier suite would be resumed.

  Process 0 empties it; the others wait, so that none opens it first.
  """
  if jax.process_index() == 0 and path.exists():
    path.rmtree()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"detco_jax suite: {path} fresh")
  return path


def render(part: Part) -> list[str]:
  """The kNN curve (one column per method) and the probes' table."""
  runs = [r for r in part.rows if r.labels["run"] in
          tuple(label for label, _, _ in METHODS)]
  lines = []
  if runs:
    epochs = sorted({k for r in runs for k in r.figures
                     if k.startswith("epoch_")})
    lines += report_lib.table(
        ["epoch"] + [f"{r.labels['run']} kNN top-1" for r in runs],
        [[int(k.split("_")[1])] + [r.figures.get(k) for r in runs]
         for k in epochs])
    lines += ["", f"kNN top-1 (res5, k=200) after each epoch of the "
              f"`{runs[0].labels['scale']}` pretraining; final losses: "
              + ", ".join(f"{r.labels['run']} {r.labels['final_loss']}"
                          for r in runs) + "."]
  probes = [r for r in part.rows if r.labels["run"].startswith("linear")]
  if probes:
    lines += [""] + report_lib.table(
        ["linear probe"] + [f"{s} top-1" for s in STAGES] + ["s"],
        [[r.labels["run"].split(": ", 1)[1]]
         + [r.figures.get(f"{s}_top1") for s in STAGES]
         + [r.figures.get("probe_s")] for r in probes])
  calibration = [r for r in part.rows if r.labels["run"] == "calibration"]
  if calibration:
    f = calibration[0].figures
    how = ("Smoke mode: the epochs fixed; costs measured on the DetCo run"
           if calibration[0].labels.get("source")
           else f"Planned {f['epochs']:.0f} epochs from a calibration run")
    lines += ["", f"{how}: {f['step_s'] * 1e3:.1f} ms/step, "
              f"{f['knn_s']:.1f} s per kNN evaluation, {f['startup_s']:.0f}"
              f" s start-up, {f['steps_per_epoch']:.0f} steps per epoch; "
              f"generating the data took {f['prepare_data_s']:.0f} s."]
  return lines
