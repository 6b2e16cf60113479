"""The command-line wrapper every job goes through (detco_jax/cli.py)."""

import logging as py_logging
import os
import subprocess
import sys

from detco_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "detco_jax.main", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


def test_a_config_mistake_is_one_line_and_exit_1(tmp_path):
  # From another directory, with the config given by absolute path.
  config = os.path.join(REPO, "configs", "detco.py") + ":tiny"
  bad = [f"--config={config}", "--config.batch_size=12",
         f"--workdir={tmp_path / 'bad'}"]
  out = run_main(bad, cwd=str(tmp_path))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ValueError: Bad config: batch_size=12 must "
                         "be a positive multiple of the 8 devices")
  assert last.endswith("(--traceback shows where)")

  out = run_main(bad + ["--traceback"], cwd=str(tmp_path))
  assert out.returncode == 1 and "Traceback" in out.stderr


def test_a_run_logs_one_line_per_window_and_no_library_chatter(
    builtin_data_dir, tmp_path):
  out = run_main(["--config=configs/detco.py:tiny",
                  f"--config.data.data_dir={builtin_data_dir}",
                  "--config.total_steps=4", "--config.write_views_image=False",
                  f"--workdir={tmp_path / 'run'}"])
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stderr.splitlines()
  windows = [l for l in lines if "pretraining step " in l]
  assert len(windows) == 2, lines  # log_every=2.
  assert "pretraining step 4/4 loss " in windows[-1]
  assert "res5/gg_acc" in windows[-1] and "img/s, ETA" in windows[-1]
  # Checkpoints were saved (at 3 and 4) without orbax's INFO lines.
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["3", "4"]
  assert not [l for l in lines if l.startswith("I") and "orbax" in l], lines
  assert any("Process 0 finished: epoch=" in l for l in lines)


def test_library_filter_drops_only_their_info_lines():
  drop = cli._LibraryInfoFilter()  # pylint: disable=protected-access

  def record(path, level):
    return py_logging.LogRecord("absl", level, path, 1, "m", (), None)

  orbax = "/x/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not drop.filter(record(orbax, py_logging.INFO))
  assert drop.filter(record(orbax, py_logging.WARNING))
  assert drop.filter(record("/x/detco_jax/loop.py", py_logging.INFO))


def test_configs_importable_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p != REPO])
  cli.make_configs_importable(
      ["prog", f"--config={REPO}/configs/detco.py:demo", "--workdir=x"])
  assert sys.path[0] == REPO
