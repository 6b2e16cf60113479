"""The command-line wrapper every job goes through (detco_jax/cli.py)."""

import logging as py_logging
import os
import subprocess
import sys

import pytest

from detco_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, cwd=REPO, python_args=False):
  """Runs `python -m detco_jax.main ARGS` (python's own flags first)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  pre = args[:2] if python_args else []
  args = args[2:] if python_args else args
  return subprocess.run([sys.executable, *pre, "-m", "detco_jax.main", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.long
def test_a_config_mistake_is_one_line_and_exit_1(tmp_path):
  # From another directory, with the config given by absolute path.
  config = os.path.join(REPO, "configs", "detco.py") + ":tiny"
  bad = [f"--config={config}", "--config.batch_size=12",
         f"--workdir={tmp_path / 'bad'}"]
  out = run_main(bad, cwd=str(tmp_path))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: Bad config: batch_size=12 must "
                         "be a positive multiple of the 8 devices")
  assert last.endswith("(--traceback shows where)")

  out = run_main(bad + ["--traceback"], cwd=str(tmp_path))
  assert out.returncode == 1 and "Traceback" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--config.batch_sise=3"],
     "unknown config key 'batch_sise'; did you mean 'batch_size'?"),
    (["--config.data.datset=x"],
     "unknown config key 'data.datset'; did you mean 'data.dataset'?"),
    (["--config.zzzzz=1"],
     "unknown config key 'zzzzz' (no close match in the config file)"),
    (["--config.model=x"],
     "config key 'model' is a block; set one of its keys, e.g. "
     "--config.model.depth=VALUE"),
    (["--config.model.depth.x=1"],
     "config key 'model.depth' is a value, so 'model.depth.x' does not "
     "exist"),
    (["--config.batch_size=abc"],
     "config key 'batch_size' takes int values, got 'abc'"),
    (["--config.base_lr=fast"],
     "config key 'base_lr' takes float values, got 'fast'"),
    (["--config.model.remat=maybe"],
     "config key 'model.remat' takes bool values, got 'maybe'"),
    (["--worddir=x"], "unknown flag --worddir; did you mean --workdir?"),
])
def test_a_flag_mistake_is_one_line_before_any_heavy_import(args, message,
                                                             tmp_path):
  out = run_main(["-X", "importtime", "--config=configs/detco.py:demo", *args,
                  f"--workdir={tmp_path}"], python_args=True)
  assert out.returncode == 1
  errors = [l for l in out.stderr.splitlines() if not
            l.startswith("import time:")]
  assert errors == [f"Error: {message}"]
  # The job (JAX, TensorFlow) was never imported: the flags failed first.
  imported = {l.split("|")[-1].strip() for l in out.stderr.splitlines()
              if l.startswith("import time:")}
  assert "detco_jax.cli" in imported
  assert not imported & {"jax", "tensorflow", "detco_jax.train"}
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("module,config", [
    ("detco_jax.eval.linear", "configs/linear_probe.py:demo"),
    ("detco_jax.eval.knn", "configs/linear_probe.py:demo"),
    ("detco_jax.eval.dense", "configs/dense_probe.py:demo"),
    ("detco_jax.eval.detection", "configs/detection.py:demo"),
])
def test_an_evaluation_job_checks_its_flags_before_any_heavy_import(
    module, config, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", module, f"--config={config}",
       "--config.batch_sise=3", f"--workdir={tmp_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  errors = [l for l in out.stderr.splitlines()
            if not l.startswith("import time:")]
  assert errors == ["Error: unknown config key 'batch_sise'; did you mean "
                    "'batch_size'?"]
  imported = {l.split("|")[-1].strip() for l in out.stderr.splitlines()
              if l.startswith("import time:")}
  assert not imported & {"jax", "tensorflow"}
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("config,message", [
    ("configs/detco.py:dmeo",
     "unknown config variant 'dmeo'; did you mean 'demo'? (variants: demo,"),
    ("configs/detco.py:demo,epochs=x",
     "Config argument 'epochs' takes int values, got 'x'."),
    ("configs/detco.py:demo,epochs=3,epochs=4",
     "Config item 'epochs' is given twice in 'demo,epochs=3,epochs=4'."),
    ("configs/nope.py", "config file 'configs/nope.py' does not exist"),
])
def test_a_config_string_mistake_is_one_line(config, message, tmp_path):
  out = run_main([f"--config={config}", f"--workdir={tmp_path}"])
  assert out.returncode == 1
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert out.stderr.startswith(f"Error: {message}")


def test_traceback_shows_a_flag_mistake_with_its_stack(tmp_path):
  out = run_main(["--config=configs/detco.py:demo", "--config.batch_sise=3",
                  "--traceback", f"--workdir={tmp_path}"])
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
  assert not [l for l in lines if l.startswith("I") and
              ("orbax" in l or "dataset_builder" in l)], lines
  assert any("Process 0 finished: epoch=" in l for l in lines)
  # The TensorBoard events hold the views picture and the kNN monitor.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  tags = {value.tag for name in os.listdir(run) if "tfevents" in name
          for event in tf.compat.v1.train.summary_iterator(str(run / name))
          for value in event.summary.value}
  assert {"views/detco", "knn/top1"} <= tags, tags


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
