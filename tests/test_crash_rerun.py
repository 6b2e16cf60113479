"""The suite's crash policy (tests/crash_rerun.py), run for real: pytest with
xdist in a subprocess, on tests that abort their worker process."""

import os
import re
import subprocess
import sys

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
  env = dict(os.environ, CRASH_MARK=str(tmp_path / "mark"),
             FAIL_LOG=str(tmp_path / "fail.log"),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  command = [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider",
             "-p", "tests.crash_rerun", "--rootdir", str(tmp_path)]
  command += [f"test_cases.py::{name}" for name in selected]
  done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
  return done.returncode, done.stdout + done.stderr


def test_a_test_that_crashes_once_passes_on_its_rerun_and_is_listed(tmp_path):
  rc, out = run_pytest(tmp_path, "test_crashes_once")
  assert rc == 0, out
  assert re.search(r"1 passed, 1 crashed and rerun", out), out
  assert "worker crashes" in out
  assert re.search(r"test_cases.py::test_crashes_once: worker 'gw0' crashed",
                   out), out


def test_a_test_that_crashes_every_time_fails_after_one_rerun(tmp_path):
  rc, out = run_pytest(tmp_path, "test_crashes_always")
  assert rc == 1, out
  assert re.search(r"1 failed, 1 crashed and rerun", out), out
  # The rerun ran in the replacement worker, and crashed it too.
  assert re.search(r"worker 'gw1' crashed while running "
                   r"'test_cases.py::test_crashes_always'", out), out
  assert "FAILED test_cases.py::test_crashes_always - worker" in out


def test_an_ordinary_failure_is_never_rerun(tmp_path):
  rc, out = run_pytest(tmp_path, "test_fails")
  assert rc == 1, out
  assert re.search(r"1 failed in", out), out
  assert "crashed" not in out
  assert (tmp_path / "fail.log").read_text() == "ran\n"


def test_the_suite_runs_under_the_policy(pytestconfig):
  """tests/conftest.py registers the policy (in the workers and in the
  controller, which loads the same conftest)."""
  assert pytestconfig.pluginmanager.has_plugin("tests.crash_rerun")
