"""The learning-curve script on a real tiny run, and its line chart."""

import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from detco_jax import config_lib
from detco_jax import pretrained
from detco_jax import visualize
from experiments import learning_curve as script


def knn_events(workdir):
  """`knn/top1` by step, read with TensorBoard's accumulator directly."""
  events = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0,
                              event_accumulator.SCALARS: 0})
  events.Reload()
  if "knn/top1" in events.Tags()["tensors"]:
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item()
            for e in events.Tensors("knn/top1")}
  return {e.step: e.value for e in events.Scalars("knn/top1")}


def test_curve_table_and_picture_from_a_real_run(tiny_pretrain_workdir,
                                                 tmp_path):
  expected = knn_events(tiny_pretrain_workdir)
  assert sorted(expected) == [3, 6]
  per_epoch = config_lib.steps_per_epoch(
      pretrained.load_config(tiny_pretrain_workdir))
  floor = 0.05
  results = script.make([("DetCo", [tiny_pretrain_workdir]),
                         ("twice", [tiny_pretrain_workdir] * 2)],
                        str(floor), str(tmp_path))
  for label in ("DetCo", "twice"):
    top1 = results["methods"][label]["top1"]
    assert len(top1) == 2
    for step, value in expected.items():
      values = top1[f"{round(step / per_epoch, 3):g}"]
      np.testing.assert_allclose(values, [value] * (2 if label == "twice"
                                                    else 1), rtol=1e-6)
  saved = json.load(open(tmp_path / "learning_curve.json"))
  assert saved["floor"] == floor and saved == json.loads(json.dumps(results))
  table = (tmp_path / "learning_curve.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert len(rows) == 1 + 2 + 1  # Header, two epochs, the floor.
  last = expected[6]
  # One seed: the value alone; two equal seeds: a zero spread.
  assert f"| {100 * last:.1f} | {100 * (last - floor):.1f} |" in rows[2]
  assert f"{100 * last:.1f} ± 0.0" in rows[2]
  assert "DetCo: 1 seed, twice: 2 seeds" in table
  image = np.asarray(Image.open(tmp_path / "learning_curve.png"))
  assert image.shape == (400, 640, 3)
  # Both methods' colours are drawn.
  for colour in visualize._LINE_COLOURS[:2]:  # pylint: disable=protected-access
    assert np.all(image == colour, axis=-1).sum() > 20, colour


def test_floor_from_a_knn_result_file_is_checked(tiny_pretrain_workdir,
                                                 tmp_path):
  config = pretrained.load_config(tiny_pretrain_workdir)
  results = {"knn_top1": 0.1, "stage": config.knn.stage, "k": config.knn.k,
             "temperature": config.knn.temperature, "num_train": 256,
             "num_test": 64}
  floor_dir = tmp_path / "floor"
  floor_dir.mkdir()
  (floor_dir / "knn_results.json").write_text(json.dumps(results))
  out = script.make([("DetCo", [tiny_pretrain_workdir])], str(floor_dir),
                    str(tmp_path / "out"))
  assert out["floor"] == 0.1
  (floor_dir / "knn_results.json").write_text(json.dumps(dict(results, k=20)))
  with pytest.raises(ValueError, match="not the monitor's"):
    script.make([("DetCo", [tiny_pretrain_workdir])], str(floor_dir),
                 str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="neither a number"):
    script.read_floor(str(tmp_path / "missing"))


def test_bad_runs_are_refused(tmp_path):
  assert script.parse_run("MoCo v2=a,b") == ("MoCo v2", ["a", "b"])
  for bad in ("DetCo", "=a", "DetCo="):
    with pytest.raises(ValueError, match="LABEL=DIR"):
      script.parse_run(bad)
  with pytest.raises(ValueError, match="kNN monitor"):
    script.read_scalar(str(tmp_path))  # No events at all.


def test_nice_ticks_cover_the_range_in_round_steps():
  for low, high in ((0, 8), (31.2, 48.7), (-3.5, 0.2), (0.3, 0.3), (1, 1e4)):
    ticks = visualize.nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high, (low, high, ticks)
    steps = np.diff(ticks)
    np.testing.assert_allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert np.isclose(mantissa, [1, 2, 5]).any(), ticks
    assert 3 <= len(ticks) <= 12


def test_line_chart_draws_points_where_the_axes_put_them():
  image = visualize.line_chart(
      {"a": ([0, 10], [0, 100]), "b": ([5], [50])}, title="t",
      x_label="x", y_label="y", reference=("floor", 20), size=(300, 200))
  assert image.shape == (200, 300, 3) and image.dtype == np.uint8
  a, b = visualize._LINE_COLOURS[:2]  # pylint: disable=protected-access
  m = visualize._CHART_MARGINS  # pylint: disable=protected-access
  # Series a runs corner to corner of the plot area; b's dot is its centre.
  x0, x1 = m["left"], 300 - m["right"]
  y0, y1 = 200 - m["bottom"], m["top"]
  assert (image[y0 - 1:y0 + 2, x0 - 1:x0 + 2] == a).all(-1).any()
  assert (image[y1 - 1:y1 + 2, x1 - 1:x1 + 2] == a).all(-1).any()
  centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
  assert (image[centre[1], centre[0]] == b).all()
  with pytest.raises(ValueError, match="one y per x"):
    visualize.line_chart({"a": ([1, 2], [1])}, title="", x_label="",
                         y_label="")
