"""The ablation script's bookkeeping: configs per method, the table."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script():
  spec = importlib.util.spec_from_file_location(
      "ablation", os.path.join(REPO, "experiments", "ablation.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_methods_differ_only_in_the_two_switches():
  ablation = load_script()
  configs = {label: ablation.pretrain_config("ablation", variant, 1)
             for label, variant in ablation.METHODS}
  switches = {label: (c.loss.multi_level, c.loss.global_local)
              for label, c in configs.items()}
  assert switches == {"MoCo v2": (False, False),
                      "+ multi-level": (True, False),
                      "+ global-local": (False, True),
                      "DetCo": (True, True)}
  # Equal budgets: everything but the two switches is the same.
  plain = [c.to_dict() for c in configs.values()]
  for c in plain:
    c["loss"].pop("multi_level")
    c["loss"].pop("global_local")
  assert all(c == plain[0] for c in plain) and plain[0]["seed"] == 1


def test_table_gives_mean_and_half_range_in_percent():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  results = {"runs": {
      "MoCo v2": [
          {"linear_top1": per_stage(0.10), "dense_miou": per_stage(0.2)},
          {"linear_top1": per_stage(0.14), "dense_miou": per_stage(0.3)}],
      "random init": [{"linear_top1": per_stage(0.05),
                       "dense_miou": per_stage(0.1)}]}}
  lines = ablation.table(results).splitlines()
  assert lines[0].startswith("| method | linear res2 |")
  assert lines[2] == "| MoCo v2 | " + " | ".join(
      ["12.0 ± 2.0"] * 4 + ["25.0 ± 5.0"] * 4) + " |"
  assert lines[3] == "| random init | " + " | ".join(
      ["5.0"] * 4 + ["10.0"] * 4) + " |"


def test_table_gains_detection_columns_when_every_run_has_them():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  run = lambda ap: {"linear_top1": per_stage(0.1), "dense_miou": per_stage(0.2),
                    "detection": {"AP": ap, "AP50": 2 * ap}}
  results = {"runs": {"DetCo": [run(0.30), run(0.34)],
                      "random init": [run(0.10)]}}
  lines = ablation.table(results).splitlines()
  assert lines[0].endswith("| det AP | det AP50 |")
  assert lines[2].endswith("| 32.0 ± 2.0 | 64.0 ± 4.0 |")
  assert lines[3].endswith("| 10.0 | 20.0 |")
  # A run without detection (an older workdir): no detection columns.
  del results["runs"]["random init"][0]["detection"]
  assert "det AP" not in ablation.table(results)
  config = ablation.detection_transfer_config("w", seed=3, steps=40)
  assert (config.total_steps, config.seed, config.pretrained) == (40, 3, "w")
