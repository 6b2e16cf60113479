"""Every user error is one line, early, and writes nothing: one table.

Each row runs a real command (`python -m ...`) with one mistake and checks
that it exits with status 1, that stderr holds the one line `Error: ...`
(no traceback, no exception repr) and that nothing appeared on disk. Rows
that the command line can judge without a device also check that JAX and
TensorFlow were never imported (`python -X importtime`); the rest need the
dataset, so JAX and TensorFlow have loaded and the log's INFO lines may come
first. How long each row took is printed, not asserted: the speeds are
measured in docs/benchmarks.md.
"""

import os
import pickle
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/detco.py:smoke"
DEMO = "--config=configs/detco.py:demo"
LINEAR = "--config=configs/linear_probe.py:demo"
_HEAVY = {"jax", "tensorflow", "flax", "torch"}
# The line's start: README.md's first bytes may change.
README_IS_NO_CHECKPOINT = (
    "README.md is not a checkpoint this project reads: not torch's zip or "
    "legacy format (torch.save), nor a pickle (detectron2's .pkl); it starts "
    "with b'")
NO_CHECKPOINT_YET = (
    "{tmp}/started holds no checkpoint yet (nothing in "
    "{tmp}/started/checkpoints): wait for the pretraining run's first "
    "checkpoint_every steps.")
NO_CONFIG_JSON = (
    "{tmp}/empty has no config.json: give the --workdir of a pretraining run "
    "(python -m detco_jax.main ...), which writes config.json and "
    "checkpoints/ there, or a checkpoint file.")
WORKDIR_IS_A_FILE = ("--workdir={tmp}/afile is a file, not a directory; "
                     "choose a directory (it is created if missing).")
UNKNOWN_BATCH_SISE = (
    "unknown config key 'batch_sise'; did you mean 'batch_size'?")


def _job(module, config, rows):
  """(module, arguments, message) rows of a job that takes --config.

  Args:
    module: the job, e.g. "detco_jax.eval.linear".
    config: `--config=...` put first ("": the row's arguments give one).
    rows: (arguments, message); `--workdir={tmp}/w` is added unless the
      arguments name a workdir (or misspell the flag).

  Returns:
    The table's rows.
  """
  def workdir(args):
    return [] if any(a.startswith("--w") for a in args) else [
        "--workdir={tmp}/w"]
  return [(module, [config] * bool(config) + args + workdir(args), message)
          for args, message in rows]


# Rows: (module, arguments, the start of the line after "Error: "). In
# arguments and message, {tmp} is a folder holding `afile` (a text file),
# `d2.pkl` (a pickle: it opens like a checkpoint), `empty/` (a directory)
# and `started/` (a pretraining workdir with config.json and no checkpoint
# yet); nothing else may appear in it.
LIGHT = _job("detco_jax.main", SMOKE, [
    # The workdir.
    (["--workdir={tmp}/afile"], WORKDIR_IS_A_FILE),
    (["--workdir={tmp}/afile/run"],
     "--workdir={tmp}/afile/run is under {tmp}/afile, which is a file, not "
     "a directory; choose a directory (it is created if missing)."),
    # Config values that need no device.
    (["--config.batch_size=63"],
     "Bad config: batch_size=63 must be a multiple of bn_groups=2; set "
     "--config.bn_groups to a divisor of 63."),
    (["--config.queue_size=100"],
     "Bad config: queue_size=100 must be a positive multiple of the global "
     "batch_size=16, so that each step's keys fit without wrapping "
     "mid-batch; e.g. --config.queue_size=96."),
    (["--config.bn=ghost"],
     "Bad config: bn='ghost' must be 'shuffle' or 'sync'."),
]) + _job("detco_jax.main", DEMO, [
    # Config keys and values, flags.
    (["--config.batch_sise=3"], UNKNOWN_BATCH_SISE),
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
    (["--worddir={tmp}/w"], "unknown flag --worddir; did you mean --workdir?"),
]) + _job("detco_jax.main", "", [
    # Config strings.
    (["--config=configs/detco.py:dmeo"],
     "unknown config variant 'dmeo'; did you mean 'demo'? (variants: "),
    (["--config=configs/detco.py:demo,epochs=x"],
     "Config argument 'epochs' takes int values, got 'x'."),
    (["--config=configs/detco.py:demo,epochs=3,epochs=4"],
     "Config item 'epochs' is given twice in 'demo,epochs=3,epochs=4'."),
    (["--config=configs/nope.py"],
     "config file 'configs/nope.py' does not exist"),
]) + _job("detco_jax.eval.linear", LINEAR, [
    # The pretrained backbone, in every job that reads one.
    (["--config.pretrained=README.md"], README_IS_NO_CHECKPOINT),
    ([], "Set --config.pretrained=PRETRAIN_WORKDIR or =CHECKPOINT_FILE: the "
         "probe takes the backbone (and, with --config.random_init=True, "
         "just its architecture) from a pretraining run's workdir or from a "
         "torchvision / MoCo / DetCo .pth or detectron2 .pkl file."),
    (["--config.pretrained={tmp}/started", "--workdir={tmp}/started"],
     "--workdir must differ from --config.pretrained: the probe would "
     "write its checkpoints over the pretraining run's."),
    (["--config.pretrained={tmp}/d2.pkl", "--workdir={tmp}/afile"],
     WORKDIR_IS_A_FILE),
]) + _job("detco_jax.eval.knn", LINEAR, [
    (["--config.batch_sise=3"], UNKNOWN_BATCH_SISE),
    (["--config.pretrained={tmp}/nowhere"],
     "{tmp}/nowhere is neither a checkpoint file nor a pretraining workdir "
     "(a directory with config.json and checkpoints/)."),
]) + _job("detco_jax.eval.dense", "--config=configs/dense_probe.py:demo", [
    (["--config.batch_sise=3"], UNKNOWN_BATCH_SISE),
    (["--config.pretrained={tmp}/empty"], NO_CONFIG_JSON),
]) + _job("detco_jax.eval.detection", "--config=configs/detection.py:demo", [
    (["--config.batch_sise=3"], UNKNOWN_BATCH_SISE),
    (["--config.pretrained={tmp}/started"], NO_CHECKPOINT_YET),
]) + [
    ("detco_jax.export", ["--pretrained=README.md", "--format=torchvision",
                          "--out={tmp}/r.pth"], README_IS_NO_CHECKPOINT),
    ("detco_jax.export", ["--pretrained={tmp}/afile", "--step=3",
                          "--format=detectron2", "--out={tmp}/r.pkl"],
     "{tmp}/afile is not a checkpoint this project reads: not torch's zip or "
     "legacy format (torch.save), nor a pickle (detectron2's .pkl); it "
     "starts with b'text, no'."),
    ("detco_jax.export", ["--pretrained={tmp}/d2.pkl", "--format=torchvision",
                          "--out={tmp}/empty"],
     "--out={tmp}/empty is a directory; name the file to write in it."),
    ("detco_jax.export", ["--workdir={tmp}/started", "--format=torchvision",
                          "--out={tmp}/r.pth"], NO_CHECKPOINT_YET),
    ("detco_jax.eval.attention", ["--run=detco:README.md", "--run=r:random",
                                  "--out={tmp}/maps"],
     README_IS_NO_CHECKPOINT),
    ("detco_jax.eval.attention", ["--run=de tco:{tmp}/started",
                                  "--out={tmp}/maps"],
     "--run='de tco:{tmp}/started': the label 'de tco' must be letters, "
     "digits or _.+- (it names files and TensorBoard tags)."),
]

# Rows that need TensorFlow (the dataset) to judge. A batch that does not
# divide over the devices: tests/test_cli.py, run from another directory.
HEAVY = _job("detco_jax.main", "--config=configs/detco.py:tiny", [
    (["--config.data.dataset=no_such_dataset_xyz"],
     "Unknown dataset 'no_such_dataset_xyz' in config.data.dataset: "),
])


def _params(rows, marks=()):
  return [pytest.param(m, a, e, id=f"{m.split('.')[-1]}:{' '.join(a[-1:])}",
                       marks=marks) for m, a, e in rows]


def _files(root: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, names in os.walk(root) for n in dirs + names)


@pytest.mark.parametrize(
    "module,args,message",
    _params(LIGHT) + _params(HEAVY, marks=pytest.mark.long))
def test_a_user_error_is_one_line_and_writes_nothing(module, args, message,
                                                     tmp_path):
  tmp = str(tmp_path)
  (tmp_path / "afile").write_text("text, not a checkpoint")
  (tmp_path / "d2.pkl").write_bytes(pickle.dumps({"model": {}}, protocol=2))
  (tmp_path / "empty").mkdir()
  (tmp_path / "started").mkdir()
  (tmp_path / "started" / "config.json").write_text("{}")
  before = _files(tmp)
  light = (module, args, message) in LIGHT
  command = [sys.executable, *(["-X", "importtime"] if light else []),
             "-m", module, *(a.format(tmp=tmp) for a in args)]
  start = time.perf_counter()
  out = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=600)
  print(f"{module} {args}: {time.perf_counter() - start:.2f} s")
  lines = [l for l in out.stderr.splitlines()
           if not l.startswith("import time:")]
  assert out.returncode == 1, out.stderr[-3000:]
  expected = f"Error: {message.format(tmp=tmp)}"
  assert lines and lines[-1].startswith(expected), lines[-5:]
  assert "Traceback" not in out.stderr
  assert not re.search(r"\b\w+(Error|Exception)\(", out.stderr)
  if light:
    assert len(lines) == 1, lines
    imported = {l.split("|")[-1].strip().split(".")[0]
                for l in out.stderr.splitlines()
                if l.startswith("import time:")}
    assert not imported & _HEAVY, imported & _HEAVY
  else:  # The log (and TensorFlow's C++ lines) came first: one error.
    assert not [l for l in lines[:-1] if l.startswith("Error")], lines
  assert _files(tmp) == before


def test_traceback_shows_a_mistake_with_its_stack(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  # A flag mistake, and one that the job's own checks find.
  for mistake in (["--config.batch_sise=3", f"--workdir={tmp_path}"],
                  [f"--workdir={afile}"]):
    out = subprocess.run(
        [sys.executable, "-m", "detco_jax.main", SMOKE, *mistake,
         "--traceback"], cwd=REPO, capture_output=True, text=True,
        timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 1 and "Traceback" in out.stderr
