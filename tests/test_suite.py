"""The evidence suite: its smoke run, time boxes, largest-batch search and
record."""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from configs import detco as detco_config
from detco_jax import versions
from detco_jax.benchmark import budget as budget_lib
from detco_jax.benchmark import curve
from detco_jax.benchmark import devices
from detco_jax.benchmark import report as report_lib
from detco_jax.benchmark import suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
  """A clock the test moves by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


# ---- Time boxes.


def test_each_part_ends_at_its_cumulative_share():
  clock = FakeClock()
  budget = budget_lib.Budget(100.0, {"a": 0.2, "b": 0.3, "c": 0.5},
                             ("a", "b", "c"), clock=clock)
  assert budget.start("a") == pytest.approx(20.0)
  clock.now += 5.0  # Part a ends early: b gets the 15 s it left.
  assert budget.start("b") == pytest.approx(45.0)
  clock.now += 50.0  # b overruns by 5 s: c's box shrinks.
  assert budget.start("c") == pytest.approx(45.0)
  assert budget.elapsed() == pytest.approx(55.0)


def test_shares_of_the_parts_that_run_are_renormalised():
  budget = budget_lib.Budget(90.0, {"a": 0.2, "b": 0.3, "c": 0.4},
                             ("b", "c"), clock=FakeClock())
  assert budget.start("b") == pytest.approx(90.0 * 3 / 7)
  assert budget.start("c") == pytest.approx(90.0)


def test_an_item_runs_only_if_its_padded_prediction_fits():
  clock = FakeClock()
  budget = budget_lib.Budget(100.0, {"a": 1.0}, ("a",), clock=clock)
  budget.start("a")
  clock.now += 60.0  # 40 s left.
  assert budget.allows(40.0 / budget_lib.SAFETY)
  assert not budget.allows(40.0 / budget_lib.SAFETY + 1.0)
  forced = budget_lib.Budget(1.0, {"a": 1.0}, ("a",), force=True,
                             clock=clock)
  assert forced.allows(1e9)


def test_predicted_timing_grows_with_flops_and_falls_with_mfu():
  ctx = suite.Context(suite.FULL, None, "out", None, print,
                      peaks={"bfloat16": 1e12})
  figures = {"compile_s": 10.0, "flops_per_step": 1e12}
  rounds = suite.FULL.steps + suite.FULL.warmup
  # Step + backbone + product per round at the first MFU guess, the cached
  # load, the backbone's compilation and a constant.
  per_step = 1.0 / suite._FIRST_MFU  # pylint: disable=protected-access
  assert ctx.predict_timing(figures, "bfloat16", backbone=True) == \
      pytest.approx(3.0 + 10.0 + rounds * (2 * per_step + 0.05) + 2.0)
  ctx.mfus.append(0.5)
  ctx.mfus.append(0.8)  # The lowest MFU seen is used.
  assert ctx.predict_timing(figures, "bfloat16", backbone=False) == \
      pytest.approx(3.0 + rounds * (2.0 + 0.05) + 2.0)


# ---- The largest batch.


def linear_memory(fixed, per_sample, calls):
  def memory_at(batch):
    calls.append(batch)
    return fixed + per_sample * batch
  return memory_at


@pytest.mark.parametrize("known_batches", [(32, 64, 128), (64,)])
def test_largest_batch_is_the_largest_step_multiple_that_fits(known_batches):
  fixed, per_sample, limit, step = 3e9, 0.1e9, 80e9, 8
  calls = []
  memory_at = linear_memory(fixed, per_sample, calls)
  known = {b: fixed + per_sample * b for b in known_batches}
  batch, memory = suite.largest_batch(memory_at, known, limit, step,
                                      lambda: True)
  assert batch % step == 0 and memory == fixed + per_sample * batch
  assert memory <= limit
  # With the line known, the first guess is the largest batch under the
  # margin; from one point through the origin, a smaller one.
  best = int((suite._MEMORY_MARGIN * limit - fixed) / per_sample)  # pylint: disable=protected-access
  if len(known_batches) > 1:
    assert batch == best // step * step and calls == [batch]
  else:
    assert batch < best and len(calls) == 1


def test_largest_batch_steps_down_when_the_guess_does_not_fit():
  # Memory grows faster than the known points say (e.g. a layout change).
  calls = []
  memory_at = lambda b: calls.append(b) or 1e9 + 0.3e9 * b
  known = {32: 1e9 + 0.1e9 * 32, 64: 1e9 + 0.1e9 * 64}
  batch, memory = suite.largest_batch(memory_at, known, 40e9, 8,
                                      lambda: True)
  assert memory <= 40e9 and len(calls) >= 2 and calls[-1] == batch
  assert calls[0] > batch


def test_largest_batch_stops_when_no_time_is_left():
  assert suite.largest_batch(lambda b: 0.0, {8: 1.0}, 100.0, 8,
                             lambda: False) is None


# ---- Figures and the record.


def test_throughput_figures_are_200_imagenet_epochs_in_hours():
  figures = suite.throughput_figures(per_device=500.0, num_devices=2)
  samples = 200 * detco_config.get_config().num_train_examples
  assert figures["samples_per_s"] == 1000.0
  assert figures["imagenet_200_epochs_hours"] == pytest.approx(
      samples / 1000.0 / 3600)
  assert figures["imagenet_200_epochs_8_devices_hours"] == pytest.approx(
      samples / 4000.0 / 3600)


def test_pipeline_rows_say_the_cores_the_need_takes_and_the_cores_here():
  # 1,000 samples/s needed; 239 per core on one thread: 1000 / 239 = 4.18,
  # so 5 cores (ceil, not round); all 16 cores give 2,000 samples/s.
  part = report_lib.Part("pipeline", "4. P")
  for threads, rate, one_thread in (("all", 2000.0, False),
                                    ("1", 239.0, True)):
    part.add({"threads": threads},
             {"samples_per_s": rate, "cores": 16, "usable_cores": 8,
              **suite.need_figures(1000.0, rate, one_thread)}, "python -m x")
  everything, one = (r.figures for r in part.rows)
  assert one["cores_needed"] == 5 and "cores_needed" not in everything
  assert everything["supply_to_need_ratio"] == pytest.approx(2.0)
  lines = suite.render_pipeline(part)
  assert lines[0].endswith("| cores needed | cores here |")
  assert lines[2].endswith("| 1e+03 | 2 | - | 16 (8 usable) |")
  assert lines[3].endswith("| 1e+03 | 0.239 | 5 | 16 (8 usable) |")
  # An exact multiple takes no extra core; no step timed: no need figures.
  assert suite.need_figures(956.0, 239.0, True)["cores_needed"] == 4
  assert suite.need_figures(None, 239.0, True) == {}
  # All cores usable: the count alone.
  part.rows[1].figures["usable_cores"] = 16.0
  assert suite.render_pipeline(part)[3].endswith("| 5 | 16 |")
  cores, usable = suite.host_cores()
  assert cores == os.cpu_count() and 1 <= usable <= cores


def test_every_figure_name_has_a_unit_and_unknown_names_fail():
  for name, want in [("step_s", "s"), ("memory_temp_bytes", "bytes"),
                     ("peak_flops_per_s", "FLOP/s"), ("mfu", None),
                     ("imagenet_200_epochs_hours", "h"),
                     ("res5_top1", "fraction correct"),
                     ("epoch_007_knn_top1", "fraction correct"),
                     ("samples_per_s_per_core", "samples/s per core"),
                     ("overhead_ratio_paired", "ratio")]:
    assert report_lib.unit(name) and (want is None
                                      or report_lib.unit(name) == want)
  with pytest.raises(ValueError, match="no unit"):
    report_lib.unit("mystery")


def test_report_files_hold_every_figure_with_its_unit(tmp_path):
  part = report_lib.Part("p", "1. P")
  part.add({"dtype": "bfloat16"},
           {"step_s": 0.5, "mfu": float("nan"), "predicted_s": None},
           "python -m x --y")
  part.skip("big item", "predicted 900 s > 10 s left")
  report = report_lib.Report(
      str(tmp_path), {"command": "c", "budget_s": 10.0}, [part],
      {"p": lambda p: report_lib.table(["dtype", "step s"], [
          [r.labels["dtype"], r.figures["step_s"]] for r in p.rows])})
  report.write()
  saved = json.loads((tmp_path / report_lib.JSON_FILE).read_text())
  row = saved["parts"]["p"]["rows"][0]
  assert row["figures"] == {"step_s": {"value": 0.5, "unit": "s"}}
  assert row["command"] == "python -m x --y"
  # What was not measured is said, not silently dropped.
  assert any("mfu not measured" in n for n in saved["parts"]["p"]["notes"])
  md = (tmp_path / report_lib.MARKDOWN_FILE).read_text()
  assert "| bfloat16 | 0.5 |" in md and "- big item: predicted 900 s" in md
  assert "    python -m x --y" in md
  assert not list(tmp_path.glob(".*partial"))


def test_datasheet_peaks_of_known_and_unknown_devices():
  assert devices.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") == \
      pytest.approx(989.4e12)
  assert devices.datasheet_peak("NVIDIA H100 PCIe", "bfloat16") == \
      pytest.approx(756e12)
  assert devices.datasheet_peak("NVIDIA H200", "float32") == \
      pytest.approx(494.7e12)
  assert devices.datasheet_peak("TPU v4", "float32") is None
  assert devices.datasheet_peak("cpu", "bfloat16") is None


def test_gpu_flags_missing_reads_the_flag_names():
  assert suite.gpu_flags_missing("") == list(suite.GPU_XLA_FLAGS)
  assert suite.gpu_flags_missing(
      " ".join(suite.GPU_XLA_FLAGS).replace("=true", "=false")) == []
  assert suite.gpu_flags_missing(suite.GPU_XLA_FLAGS[0]) == list(
      suite.GPU_XLA_FLAGS[1:])


def test_the_record_names_the_versions_it_ran_with():
  header = suite._header("out", 10.0, True, ("device",), ["suite"])  # pylint: disable=protected-access
  names = ["python"] + [shown for shown, _ in versions.PACKAGES]
  assert list(header["versions"])[:len(names)] == names
  assert header["versions"]["jaxlib"] == devices.versions()["jaxlib"]
  assert header["versions_line"].startswith(
      f"python {header['versions']['python']}, jax ")


def test_smoke_runs_compile_at_the_lowest_llvm_level():
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  suite.smoke_environment(["suite", "--out=x"], environ)
  assert environ == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  suite.smoke_environment(["suite", "--smoke"], environ)
  assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                  + suite.SMOKE_XLA_FLAG)
  mine = {"XLA_FLAGS": "--xla_backend_optimization_level=2"}
  suite.smoke_environment(["suite", "--smoke"], mine)
  assert mine == {"XLA_FLAGS": "--xla_backend_optimization_level=2"}


def test_parts_flag_takes_names_in_any_order_and_rejects_others():
  assert suite.parse_parts("curve,device") == ("device", "curve")
  with pytest.raises(ValueError, match="choose from device,train_step"):
    suite.parse_parts("device,speed")


def test_a_rows_command_builds_the_config_the_suite_measured():
  command = suite.train_step_command(suite.FULL, "mocov2", "bfloat16", 64)
  words = shlex.split(command)
  assert words[:3] == ["python", "-m", "detco_jax.benchmark"]
  string = words[3].split(":", 1)[1]
  config = detco_config.get_config(string)
  config.model.dtype = words[4].split("=", 1)[1]
  assert config == suite.pretrain_config(suite.FULL, "mocov2", "bfloat16")
  assert not config.loss.multi_level and config.model.depth == 50
  assert "--per_device_batch=64" in words


def test_epochs_fit_what_is_left_after_the_probes():
  assert curve.plan_epochs(left_s=1000.0, epoch_s=10.0, startup_s=50.0,
                           probes_s=300.0, max_epochs=200) == 30
  assert curve.plan_epochs(1000.0, 10.0, 50.0, 300.0, max_epochs=12) == 12
  assert curve.plan_epochs(100.0, 10.0, 50.0, 300.0, max_epochs=12) == 0


# ---- The smoke run.

# Figures of every row of each part, on a CPU (no datasheet figure there).
DEVICE_PEAK_FIGURES = ("measured_peak_flops_per_s", "peak_matmul_size")
TIMED_STEP_FIGURES = (
    "compile_s", "flops_per_step", "memory_total_bytes", "memory_temp_bytes",
    "step_s", "images_per_s_per_device", "peak_flops_per_s", "mfu",
    "backbone_s", "overhead_ratio", "flops_ratio", "samples_per_s",
    "imagenet_200_epochs_hours", "imagenet_200_epochs_8_devices_hours")
DETECTION_FIGURES = ("compile_s", "flops_per_step", "memory_total_bytes",
                     "step_s", "images_per_s_per_device", "mfu")
PIPELINE_FIGURES = ("samples_per_s", "samples_per_s_per_core",
                    "samples_per_cpu_s")
PROBE_FIGURES = tuple(f"{s}_top1" for s in curve.STAGES)


# The smoke run's devices: two, so that the mesh is a real one, and not the
# tests' eight, whose programs take several times longer to compile.
SMOKE_ENV = dict(os.environ,
                 XLA_FLAGS="--xla_force_host_platform_device_count=2")


def run_command(command: str, xla_flags: str) -> dict[str, float]:
  """Runs a benchmark command as the smoke run did; its printed figures."""
  result = subprocess.run([sys.executable, *shlex.split(command)[1:]],
                          cwd=REPO, env=dict(SMOKE_ENV, XLA_FLAGS=xla_flags),
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return {k: float(v) for k, v in re.findall(r"^(\w+): (\S+)$",
                                             result.stdout, re.MULTILINE)}


@pytest.mark.long
def test_smoke_run_measures_every_figure(tmp_path, builtin_data_dir):
  out = tmp_path / "suite"
  command = [sys.executable, "-m", "detco_jax.benchmark.suite", "--smoke",
             f"--out={out}", f"--data_dir={builtin_data_dir}"]
  result = subprocess.run(command, cwd=REPO, env=SMOKE_ENV,
                          capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((out / report_lib.JSON_FILE).read_text())
  assert saved["suite"]["finished"] and saved["suite"]["smoke"]
  recorded = saved["suite"]["versions"]
  assert recorded["detco_jax"] == versions.installed()["detco_jax"]
  assert set(recorded) >= {"python", "jax", "flax", "tensorflow"}
  xla_flags = saved["suite"]["environment"]["XLA_FLAGS"]
  assert suite.SMOKE_XLA_FLAG in xla_flags
  parts = saved["parts"]
  for name in suite.PART_NAMES:
    assert parts[name]["status"] == "done", (name, parts[name])
    assert not parts[name]["skipped"], (name, parts[name]["skipped"])
  # Every recorded figure is a finite number with a unit.
  for name, part in parts.items():
    for row in part["rows"]:
      assert row["command"].startswith("python -m detco_jax."), row
      for figure, entry in row["figures"].items():
        assert math.isfinite(entry["value"]) and entry["unit"], (name,
                                                                 figure)

  def rows(part, **labels):
    return [r for r in parts[part]["rows"]
            if all(r["labels"].get(k) == v for k, v in labels.items())]

  def assert_figures(row, names):
    missing = [n for n in names if n not in row["figures"]]
    assert not missing, (missing, row)

  for dtype in suite.DTYPES:
    [peak] = rows("device", dtype=dtype)
    assert_figures(peak, DEVICE_PEAK_FIGURES)
  # Each (method, dtype) of the grid at every batch, and the largest batch
  # of those searched, above the others.
  for label, dtype in suite.SMOKE.grid:
    found = rows("train_step", method=label, dtype=dtype)
    largest = [r for r in found if r["labels"].get("largest")]
    assert len(largest) == ((label, dtype) in suite.SMOKE.largest)
    assert sorted(r["labels"]["per_device_batch"] for r in found
                  if r not in largest) == sorted(suite.SMOKE.batches)
    for row in found:
      assert_figures(row, TIMED_STEP_FIGURES)
    for row in largest:
      assert row["labels"]["per_device_batch"] > max(suite.SMOKE.batches)
  for dtype in suite.SMOKE.detection_dtypes:
    [row] = rows("detection", dtype=dtype)
    assert_figures(row, DETECTION_FIGURES)
  for threads in ("all", "1"):
    [row] = rows("pipeline", threads=threads)
    assert_figures(row, PIPELINE_FIGURES)
  assert_figures(rows("pipeline", threads="all")[0],
                 ("needed_samples_per_s", "supply_to_need_ratio"))
  assert_figures(rows("pipeline", threads="1")[0],
                 ("needed_samples_per_s", "cores_needed", "usable_cores"))
  epochs = suite.SMOKE.max_epochs
  [calibration] = rows("curve", run="calibration")
  assert_figures(calibration, ("step_s", "startup_s", "knn_s",
                               "predicted_epoch_s", "predicted_probe_s",
                               "prepare_data_s"))
  assert calibration["figures"]["epochs"]["value"] == epochs
  for label, _, _ in curve.METHODS:
    [row] = rows("curve", run=label)
    assert_figures(row, [f"epoch_{e:03d}_knn_top1"
                         for e in range(1, epochs + 1)] + ["final_knn_top1"])
  for label in ("DetCo", "MoCo v2", curve.FLOOR):
    [row] = rows("curve", run=f"linear probe: {label}")
    assert_figures(row, PROBE_FIGURES)

  md = (out / report_lib.MARKDOWN_FILE).read_text()
  for heading in ("| dtype | matmul side | measured TFLOP/s",
                  "| method | dtype | batch / device | samples/s / device",
                  "| model | dtype | image px", "| threads | samples/s",
                  "| epoch | DetCo kNN top-1 | MoCo v2 kNN top-1 |",
                  "| linear probe | res2 top-1"):
    assert heading in md, heading
  for title in (t for _, t, _ in suite.PARTS):
    assert f"## {title}\n\nStatus: done" in md

  # The same step as the step benchmarks': their own commands, compile
  # only, find the FLOPs and memory the suite recorded.
  for part, row in (("train_step", parts["train_step"]["rows"][0]),
                    ("detection", parts["detection"]["rows"][0])):
    command = row["command"].replace(f" --steps={suite.SMOKE.steps} "
                                     f"--warmup={suite.SMOKE.warmup}",
                                     " --compile_only")
    alone = run_command(command, xla_flags)
    for name in ("flops_per_step", "memory_total_bytes"):
      assert alone[name] == row["figures"][name]["value"], (part, name)
