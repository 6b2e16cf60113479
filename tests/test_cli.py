"""The command-line wrapper every job goes through (detco_jax/cli.py)."""

import logging as py_logging
import os
import subprocess
import sys

import pytest

from detco_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, cwd=REPO):
  """Runs `python -m detco_jax.main ARGS`.

  The one-line errors of every job, this one included, are the table of
  tests/test_user_errors.py.
  """
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "detco_jax.main", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.long
def test_a_config_mistake_is_one_line_and_exit_1(tmp_path):
  # From another directory, with the config given by absolute path.
  config = os.path.join(REPO, "configs", "detco.py") + ":tiny"
  # A batch of 4 passes every check but the devices' (tests have 8).
  bad = [f"--config={config}", "--config.batch_size=4",
         f"--workdir={tmp_path / 'bad'}"]
  out = run_main(bad, cwd=str(tmp_path))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: Bad config: batch_size=4 must "
                         "be a positive multiple of the 8 devices")
  assert last.endswith("(--traceback shows where)")

  out = run_main(bad + ["--traceback"], cwd=str(tmp_path))
  assert out.returncode == 1 and "Traceback" in out.stderr


@pytest.mark.long
def test_the_smoke_run_logs_one_line_per_window_and_no_library_chatter(
    builtin_data_dir, tmp_path):
  # The README's smoke command, on the tests' copy of the same dataset.
  out = run_main(["--config=configs/detco.py:smoke",
                  f"--config.data.data_dir={builtin_data_dir}",
                  f"--workdir={tmp_path / 'run'}"])
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stderr.splitlines()
  windows = [l for l in lines if "pretraining step " in l]
  assert len(windows) == 6, lines  # log_every=4.
  assert "pretraining step 24/24 loss " in windows[-1]
  assert "res5/gg_acc" in windows[-1] and "img/s, ETA" in windows[-1]
  assert len([l for l in lines if "kNN top-1" in l]) == 2  # Steps 12, 24.
  # Checkpoints were saved without orbax's or TFDS's INFO lines.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["12", "24"]
  assert not [l for l in lines if l.startswith("I") and "Versions: " not in l
              and ("orbax" in l or "dataset_builder" in l)], lines
  # The start names the versions it ran with, once.
  [versions_line] = [l for l in lines if "Versions: python " in l]
  assert "orbax-checkpoint " in versions_line, versions_line
  assert any("Process 0 finished: epoch=" in l for l in lines)
  # The last line says where everything went and how to look at it.
  run = tmp_path / "run"
  assert lines[-1].endswith(
      f"Wrote checkpoints to {run}/checkpoints (steps 12, 24), TensorBoard "
      f"events and config.json to {run}; view the events with: tensorboard "
      f"--logdir {run}"), lines[-3:]
  # The TensorBoard events hold the views picture and the kNN monitor.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = {value.tag for name in os.listdir(run) if "tfevents" in name
          for event in tf.compat.v1.train.summary_iterator(str(run / name))
          for value in event.summary.value}
  assert {"views/detco", "knn/top1"} <= tags, tags


def test_a_job_ends_saying_what_it_wrote_where(tmp_path):
  run = tmp_path / "run"
  for step in ("24", "12", "36.orbax-checkpoint-tmp-7"):  # 36: unfinished.
    (run / "checkpoints" / step).mkdir(parents=True)
  (run / "events.out.tfevents.1.host").write_text("")
  (run / "config.json").write_text("{}")
  assert cli.describe_outputs(str(run)) == (
      f"Wrote checkpoints to {run}/checkpoints (steps 12, 24), TensorBoard "
      f"events and config.json to {run}; view the events with: tensorboard "
      f"--logdir {run}")
  knn = tmp_path / "knn"
  knn.mkdir()
  (knn / "knn_results.json").write_text("{}")
  assert cli.describe_outputs(str(knn)) == f"Wrote knn_results.json to {knn}."
  assert cli.describe_outputs(str(tmp_path / "nothing")) is None


def test_library_filter_drops_only_their_info_lines():
  drop = cli._LibraryInfoFilter()  # pylint: disable=protected-access

  def record(path, level):
    return py_logging.LogRecord("absl", level, path, 1, "m", (), None)

  orbax = "/x/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not drop.filter(record(orbax, py_logging.INFO))
  assert drop.filter(record(orbax, py_logging.WARNING))
  tfds = "/x/site-packages/tensorflow_datasets/core/dataset_builder.py"
  assert not drop.filter(record(tfds, py_logging.INFO))
  bridge = "/x/site-packages/jax/_src/xla_bridge.py"
  assert not drop.filter(record(bridge, py_logging.INFO))
  assert drop.filter(record("/x/detco_jax/loop.py", py_logging.INFO))


def test_configs_importable_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != REPO])
  cli.make_configs_importable(
      ["prog", f"--config={REPO}/configs/detco.py:demo", "--workdir=x"])
  assert sys.path[0] == REPO
