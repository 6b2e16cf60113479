"""The ablation script's bookkeeping: configs per method, the table."""

import importlib.util
import json
import os

import ml_collections
import numpy as np
import pytest

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


def test_table_gives_mean_and_sample_std_in_percent():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  seeds = (0.10, 0.14, 0.15)
  results = {"runs": {
      "MoCo v2": [{"linear_top1": per_stage(v), "dense_miou": per_stage(2 * v),
                   "dense_fgbg_miou": per_stage(0.5)} for v in seeds],
      "random init": [{"linear_top1": per_stage(0.05),
                       "dense_miou": per_stage(0.1),
                       "dense_fgbg_miou": per_stage(0.4)}]}}
  lines = ablation.table(results).splitlines()
  assert lines[0] == ("| method | " + " | ".join(
      [f"linear res{i}" for i in range(2, 6)]
      + [f"mIoU res{i}" for i in range(2, 6)]
      + [f"fg/bg res{i}" for i in range(2, 6)]) + " |")
  values = 100 * np.array(seeds)
  linear = f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"
  dense = f"{2 * values.mean():.1f} ± {2 * values.std(ddof=1):.1f}"
  assert linear == "13.0 ± 2.6"
  assert lines[2] == "| MoCo v2 | " + " | ".join(
      [linear] * 4 + [dense] * 4 + ["50.0 ± 0.0"] * 4) + " |"
  assert lines[3] == "| random init | " + " | ".join(
      ["5.0"] * 4 + ["10.0"] * 4 + ["40.0"] * 4) + " |"
  # An older run without the fg/bg probe: that group is left out.
  del results["runs"]["random init"][0]["dense_fgbg_miou"]
  assert "fg/bg" not in ablation.table(results)


def test_contrasts_give_the_difference_and_its_standard_error():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  run = lambda lin, ap: {"linear_top1": per_stage(lin),
                         "dense_fgbg_miou": {"res2": 0.5, "res3": 0.6,
                                             "res4": 0.7, "res5": 0.4},
                         "detection": {"AP": ap, "AP50": 2 * ap}}
  results = {"runs": {
      "MoCo v2": [run(0.10, 0.02), run(0.12, 0.03), run(0.14, 0.02)],
      "DetCo": [run(0.20, 0.025), run(0.21, 0.02), run(0.22, 0.03)],
      "random init": [run(0.1, 0.01)]}}
  lines = ablation.contrasts(results).splitlines()
  base, detco = np.array([10., 12., 14.]), np.array([20., 21., 22.])
  se = np.sqrt(base.var(ddof=1) / 3 + detco.var(ddof=1) / 3)
  assert lines[0] == (f"linear res5: DetCo - MoCo v2 = +{detco.mean() - 12:.1f}"
                      f" ± {se:.1f} (standard error; beyond the seed spread)")
  assert lines[1] == "linear res5: random init - MoCo v2 = -2.0 (one seed: not judged)"
  # The fg/bg measure is the mean over the stages: equal here, so +0.0.
  assert lines[2].startswith("fg/bg mIoU, mean of res2..res5: DetCo - MoCo v2"
                             " = +0.0 ± 0.0")
  assert lines[4].startswith("det AP: DetCo - MoCo v2 = +0.2 ± ")
  assert lines[4].endswith("within the seed spread)")
  assert ablation.contrasts({"runs": {"DetCo": [run(0.2, 0.1)]}}) == ""


def test_seeds_run_one_after_another_each_with_its_own_floor(monkeypatch,
                                                              tmp_path):
  ablation = load_script()
  calls = []
  monkeypatch.setattr(ablation, "pretrain",
                      lambda config, run_dir: calls.append(
                          ("pretrain", os.path.basename(run_dir),
                           config.seed)) or {})
  def probe(pretrained, workdir, seed, random_init=False, detection_steps=0):
    calls.append(("probe", os.path.basename(workdir), seed, random_init))
    return {"linear_top1": {}, "dense_miou": {}}
  monkeypatch.setattr(ablation, "probe", probe)
  methods = ablation.select_methods("mocov2,supervised")
  assert methods == (("MoCo v2", "mocov2"), ("supervised", "supervised"))
  results = ablation.run_all(str(tmp_path), [0, 1], "tiny", 0, methods)
  assert [c[:2] for c in calls[:5]] == [
      ("pretrain", "mocov2_seed0"), ("probe", "mocov2_seed0"),
      ("pretrain", "supervised_seed0"), ("probe", "supervised_seed0"),
      ("probe", "random_init_supervised_seed0")]
  assert calls[4] == ("probe", "random_init_supervised_seed0", 0, True)
  assert calls[9] == ("probe", "random_init_supervised_seed1", 1, True)
  assert list(results["runs"]) == ["MoCo v2", "supervised", "random init"]
  assert len(results["runs"]["random init"]) == 2


def test_table_gains_detection_columns_when_every_run_has_them():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  run = lambda ap: {"linear_top1": per_stage(0.1), "dense_miou": per_stage(0.2),
                    "detection": {"AP": ap, "AP50": 2 * ap}}
  results = {"runs": {"DetCo": [run(0.30), run(0.34)],
                      "random init": [run(0.10)]}}
  lines = ablation.table(results).splitlines()
  assert lines[0].endswith("| det AP | det AP50 |")
  assert lines[2].endswith("| 32.0 ± 2.8 | 64.0 ± 5.7 |")
  assert lines[3].endswith("| 10.0 | 20.0 |")
  # A run without detection (an older workdir): no detection columns.
  del results["runs"]["random init"][0]["detection"]
  assert "det AP" not in ablation.table(results)
  config = ablation.detection_transfer_config("w", seed=3, steps=40)
  assert (config.total_steps, config.seed, config.pretrained) == (40, 3, "w")


def test_a_finished_probe_is_read_back_not_run_again(tmp_path):
  ablation = load_script()
  calls = []

  class FakeProbe:
    RESULTS_FILE = "fake_results.json"

    @staticmethod
    def run(config, workdir):
      calls.append(workdir)
      results = {"pretrained": config.pretrained,
                 "random_init": config.random_init, "top1": 0.25}
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, FakeProbe.RESULTS_FILE), "w") as f:
        json.dump(results, f)
      return results

  config = ml_collections.ConfigDict(dict(pretrained="p", random_init=False))
  workdir = str(tmp_path / "probe")
  first = ablation.run_probe(FakeProbe, config, workdir)
  assert ablation.run_probe(FakeProbe, config, workdir) == first
  assert len(calls) == 1
  # Another backbone's results in the same workdir are not taken.
  config.random_init = True
  assert ablation.run_probe(FakeProbe, config, workdir)["random_init"]
  assert len(calls) == 2


@pytest.mark.long
def test_attention_column_is_the_attention_job_ratio(tiny_pretrain_workdir,
                                                     builtin_data_dir,
                                                     tmp_path):
  ablation = load_script()
  from detco_jax.eval import attention  # pylint: disable=g-import-not-at-top
  job = attention.run([f"run:{tiny_pretrain_workdir}", "floor:random"],
                      str(tmp_path / "job"), num_images=2,
                      data_dir=builtin_data_dir, seed=3)["ratios"]
  # The tiny run's config names its own data dir, so no override is needed.
  ratios = ablation.attention_ratios(tiny_pretrain_workdir,
                                     str(tmp_path / "run"), seed=3)
  floor = ablation.attention_ratios(tiny_pretrain_workdir,
                                    str(tmp_path / "floor"), seed=3,
                                    random_init=True)
  for got, want in ((ratios, job["run"]), (floor, job["floor"])):
    assert set(got) == set(ablation.STAGES)
    np.testing.assert_allclose([got[s] for s in ablation.STAGES],
                               [want[s] for s in ablation.STAGES], rtol=1e-5)
  assert ratios != floor
  # Kept beside the run and read back, not measured again.
  path = tmp_path / "run" / attention.RATIO_FILE
  path.write_text(json.dumps({"images": 1, "ratios": {"res2": 9.0}}))
  assert ablation.attention_ratios(tiny_pretrain_workdir,
                                   str(tmp_path / "run"), seed=3) == {
                                       "res2": 9.0}


def test_attention_ratios_show_as_ratios_not_percent():
  ablation = load_script()
  per_stage = lambda v: {s: v for s in ablation.STAGES}
  run = lambda r: {"linear_top1": per_stage(0.1), "attention": per_stage(r)}
  lines = ablation.table({"runs": {"DetCo": [run(1.0), run(1.2)]}}).splitlines()
  assert lines[0].endswith("| attn res2 | attn res3 | attn res4 | attn res5 |")
  assert lines[2].endswith("| 1.10 ± 0.14 |")
