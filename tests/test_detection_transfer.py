"""The detection-transfer script's bookkeeping: configs, reuse, the table."""

import argparse
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
  spec = importlib.util.spec_from_file_location(
      "detection_transfer",
      os.path.join(REPO, "experiments", "detection_transfer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_is_the_demo_with_seed_steps_and_source():
  script = load_script()
  config = script.transfer_config("some/run", seed=3, steps=100,
                                  random_init=True)
  assert (config.seed, config.total_steps, config.pretrained,
          config.random_init) == (3, 100, "some/run", True)
  # Only what the script sets differs from the demo variant.
  demo = script.detection_config.get_config("demo").to_dict()
  mine = config.to_dict()
  for key in ("seed", "total_steps", "pretrained", "random_init"):
    demo.pop(key), mine.pop(key)
  assert mine == demo


def test_a_finished_run_is_read_not_rerun(tmp_path, monkeypatch):
  script = load_script()
  figures = {"AP": 0.3, "AP50": 0.6, "AP75": 0.2, "steps": 100}
  (tmp_path / "detection_results.json").write_text(json.dumps(figures))

  def fail(*args):
    raise AssertionError("a finished run was fine-tuned again")

  monkeypatch.setattr(script.detection, "run", fail)
  got, seconds = script.run_one("pre", str(tmp_path), seed=0, steps=100)
  assert got == {"AP": 0.3, "AP50": 0.6, "AP75": 0.2}
  assert seconds is None   # Run by nobody who recorded its time.
  # A run of another length is not the one asked for: it is (re)run, and
  # its time is recorded for the next reuse.
  ran = []

  def run(config, workdir):
    ran.append(config.total_steps)
    return dict(figures, steps=config.total_steps)

  monkeypatch.setattr(script.detection, "run", run)
  _, seconds = script.run_one("pre", str(tmp_path), seed=0, steps=500)
  assert ran == [500] and seconds >= 0
  (tmp_path / "detection_results.json").write_text(
      json.dumps(dict(figures, steps=500)))
  monkeypatch.setattr(script.detection, "run", fail)
  assert script.run_one("pre", str(tmp_path), seed=0, steps=500)[1] == seconds


def test_run_all_adds_the_floor_from_the_first_backbone(tmp_path,
                                                        monkeypatch):
  script = load_script()
  calls = []

  def fake_run(config, workdir):
    calls.append((config.pretrained, config.random_init, config.seed,
                  config.total_steps, os.path.basename(workdir)))
    return {"AP": 0.1, "AP50": 0.2, "AP75": 0.05}

  monkeypatch.setattr(script.detection, "run", fake_run)
  results = script.run_all(str(tmp_path), [("DetCo", "a"), ("MoCo v2", "b")],
                           seeds=[0, 1], schedules=[100])
  assert list(results["runs"]) == ["DetCo", "MoCo v2", script.FLOOR]
  assert calls[-1] == ("a", True, 1, 100, "random_init_100steps_seed1")
  assert len({c[-1] for c in calls}) == 6   # One workdir per run.


def test_table_and_ordering_in_percent():
  script = load_script()
  run = lambda ap: {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}
  results = {
      "schedules": [100],
      "runs": {"DetCo": {"100": [run(0.30), run(0.34)]},
               "MoCo v2": {"100": [run(0.20), run(0.30)]},
               script.FLOOR: {"100": [run(0.05), run(0.07)]}},
      "seconds": {label: {"100": [60.0, 180.0]}
                  for label in ("DetCo", "MoCo v2", script.FLOOR)},
  }
  lines = script.table(results, "half_range").splitlines()
  assert lines[2] == ("| DetCo | 100 | 32.0 ± 2.0 | 64.0 ± 4.0 | 16.0 ± 1.0 "
                      "| 30.0 / 34.0 | 2.0 |")
  # The default: the sample standard deviation, sqrt(2) x 2 for two seeds.
  lines = script.table(results).splitlines()
  assert lines[2].startswith("| DetCo | 100 | 32.0 ± 2.8 | 64.0 ± 5.7 |")
  # Unknown times (reused runs without a record) are left out, or "-".
  results["seconds"]["DetCo"]["100"] = [None, 120.0]
  results["seconds"]["MoCo v2"]["100"] = [None, None]
  lines = script.table(results).splitlines()
  assert lines[2].endswith("| 2.0 |") and lines[3].endswith("| - |")
  ordering = script.ordering(results, "half_range").splitlines()
  # 32 - 25 = 7 is not more than 2 + 5: the ranges overlap.
  assert ordering[0] == ("100 steps: DetCo - MoCo v2 = +7.0 AP (half-ranges "
                         "2.0 and 5.0: within the two half-ranges)")
  # 25 - 6 = 19 is more than 5 + 1.
  assert ordering[1].endswith("+19.0 AP (half-ranges 5.0 and 1.0: beyond "
                              "the two half-ranges)")
  ordering = script.ordering(results).splitlines()
  assert ordering[0] == ("100 steps: DetCo - MoCo v2 = +7.0 AP (std 2.8 and "
                         "7.1: within the two std)")


def test_backbone_argument_needs_a_label_and_a_path():
  script = load_script()
  assert script._backbone("MoCo v2=workdirs/m") == ("MoCo v2", "workdirs/m")
  with pytest.raises(argparse.ArgumentTypeError, match="LABEL=PRETRAIN"):
    script._backbone("workdirs/m")
