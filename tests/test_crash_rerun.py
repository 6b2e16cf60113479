"""The suite's crash policy (tests/crash_rerun.py), run for real: pytest with
xdist in a subprocess, on tests that abort their worker process."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = '''
import os
import pathlib

MARK = pathlib.Path(os.environ["CRASH_MARK"])


def test_crashes_once():
  if not MARK.exists():
    MARK.write_text("crashed")
    os.abort()


def test_crashes_always():
  os.abort()


def test_fails():
  with open(os.environ["FAIL_LOG"], "a") as f:
    f.write("ran\\n")
  assert False, "an ordinary failure"
'''


def run_pytest(tmp_path, *selected):
  """Runs the cases with the policy as a plugin; returns (rc, output)."""
  (tmp_path / "test_cases.py").write_text(CASES)
  (tmp_path / "tmp").mkdir(exist_ok=True)
  env = dict(os.environ, CRASH_MARK=str(tmp_path / "mark"),
             FAIL_LOG=str(tmp_path / "fail.log"), TMPDIR=str(tmp_path / "tmp"),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider",
             "-p", "tests.crash_rerun", "--rootdir", str(tmp_path)]
  command += [f"test_cases.py::{name}" for name in selected]
  done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  return done.returncode, done.stdout + done.stderr


def section(out):
  """The "worker crashes" part of a run's output, up to the next section."""
  assert "= worker crashes =" in out, out
  rest = out.split("= worker crashes =", 1)[1]
  return rest.split("short test summary info", 1)[0]


@pytest.mark.long
def test_a_test_that_crashes_once_passes_on_its_rerun_and_is_listed(tmp_path):
  rc, out = run_pytest(tmp_path, "test_crashes_once")
  assert rc == 0, out
  assert re.search(r"1 passed, 1 crashed and rerun", out), out
  crashes = section(out)
  assert ("test_cases.py::test_crashes_once: worker 'gw0' died (rerun in a "
          "new worker)") in crashes
  # The dump says where the worker died, without the runner's own frames.
  assert re.search(r'test_cases\.py", line \d+ in test_crashes_once', crashes)
  assert "Fatal Python error: Aborted" in crashes
  assert "/_pytest/" not in crashes and "/xdist/" not in crashes
  # The crash's dumps are kept, one file per worker that ran.
  kept = [p.name for p in (tmp_path / "tmp").glob("pytest-crash-dumps-*/*")]
  assert sorted(kept) == ["gw0.txt", "gw1.txt"], kept


@pytest.mark.long
def test_a_test_that_crashes_every_time_fails_after_one_rerun(tmp_path):
  rc, out = run_pytest(tmp_path, "test_crashes_always")
  assert rc == 1, out
  assert re.search(r"1 failed, 1 crashed and rerun", out), out
  # The rerun ran in the replacement worker, and crashed it too.
  assert re.search(r"worker 'gw1' crashed while running "
                   r"'test_cases.py::test_crashes_always'", out), out
  assert "FAILED test_cases.py::test_crashes_always - worker" in out
  crashes = section(out)
  assert "worker 'gw0' died (rerun in a new worker)" in crashes
  assert "worker 'gw1' died (failed: it crashed 2 times)" in crashes
  assert len(re.findall(r"line \d+ in test_crashes_always", crashes)) == 2


def test_an_ordinary_failure_is_never_rerun(tmp_path):
  rc, out = run_pytest(tmp_path, "test_fails")
  assert rc == 1, out
  assert re.search(r"1 failed in", out), out
  assert "crashed" not in out
  assert (tmp_path / "fail.log").read_text() == "ran\n"
  # No worker died: the dump folder is gone.
  assert not list((tmp_path / "tmp").glob("pytest-crash-dumps-*")), list(
      (tmp_path / "tmp").iterdir())


def test_the_suite_runs_under_the_policy(pytestconfig):
  """tests/conftest.py registers the policy (in the workers and in the
  controller, which loads the same conftest)."""
  assert pytestconfig.pluginmanager.has_plugin("tests.crash_rerun")
