"""A test whose xdist worker process dies is run once more, in a new worker.

Why: once in 23 CI runs (stop 23), a worker died of a fatal signal while
running tests/test_probe.py::test_backbone_for_calibrates_only_the_floor, a
test unchanged for sessions that had passed in every run before; the whole
suite failed on it. The log kept only the tail of the worker's faulthandler
dump (the same tail an os.abort() prints), so where in native code (XLA,
tf.data, orbax) it died is not known. It did not reproduce here: 6 runs of
that file alone and full runs of the suite passed.

The policy is narrow on purpose:
  * only a worker that died (a segfault, an abort) reschedules its test;
    a failure of any other kind (an assertion, an exception, a timeout the
    test itself enforces) is reported as it is and never rerun;
  * the test runs at most `CRASH_RERUNS` more times; a test that crashes
    every time fails with xdist's own "crashed while running" report;
  * every crash is listed at the end of the run, under "worker crashes",
    and counted in the summary line ("1 crashed and rerun"), so it stays
    visible.

So that the next crash says where it happened, each worker writes its
faulthandler dump (every thread's Python stack at the fatal signal) to a
file of its own, and the list at the end prints it, without the test
runner's frames. The end of a log is the part that is kept.

It needs pytest-xdist (`-n`); without it, a crash ends the run as always.
"""

import collections
import dataclasses
import faulthandler
import os
import shutil
import tempfile
from typing import IO, Optional

import pytest

CRASH_RERUNS = 1
CATEGORY = "crashed and rerun"
# The folder of this run's dump files, one per worker: set by the
# controller before it starts the workers, which inherit it.
DUMPS_ENV = "DETCO_JAX_CRASH_DUMPS"
# Frames of the test runner itself, left out of a printed dump.
RUNNER_FRAMES = ("/_pytest/", "/pluggy/", "/xdist/", "/execnet/", '"<string>"')
MAX_DUMP_LINES = 80


@dataclasses.dataclass
class Crash:
  """One worker death, as the controller saw it.

  Attributes:
    nodeid: the test it was running.
    worker: the worker's id, e.g. "gw0".
    rerun: whether the test was rescheduled (else it failed).
    dump: the worker's faulthandler dump, "" if it wrote none.
  """
  nodeid: str
  worker: str
  rerun: bool
  dump: str


# On the controller (the process that schedules), in order.
_crashes: list[Crash] = []
# On a worker: its open dump file, kept open until the process ends.
_dump_file: Optional[IO[str]] = None


@pytest.hookimpl(trylast=True)  # After pytest's own faulthandler set-up.
def pytest_configure(config: pytest.Config) -> None:
  """The controller makes the dump folder; a worker sends its dump there."""
  global _dump_file
  workerinput = getattr(config, "workerinput", None)
  if workerinput is None:
    # Always a new folder: a pytest run inside a test must not share it.
    os.environ[DUMPS_ENV] = tempfile.mkdtemp(prefix="pytest-crash-dumps-")
    return
  folder = os.environ.get(DUMPS_ENV)
  if folder and os.path.isdir(folder):
    path = os.path.join(folder, f"{workerinput['workerid']}.txt")
    _dump_file = open(path, "w", encoding="utf-8")  # pylint: disable=consider-using-with
    faulthandler.enable(file=_dump_file, all_threads=True)


def pytest_unconfigure(config: pytest.Config) -> None:
  """The controller removes the dump folder of a run in which no worker died
  (the workers have ended by now); a crash's dumps are kept."""
  if getattr(config, "workerinput", None) is None and not _crashes:
    shutil.rmtree(os.environ.get(DUMPS_ENV, ""), ignore_errors=True)


def read_dump(worker: str) -> str:
  """The dump a dead worker wrote, without the test runner's frames.

  Args:
    worker: the worker's id.

  Returns:
    At most `MAX_DUMP_LINES` lines; "" when the worker wrote none.
  """
  folder = os.environ.get(DUMPS_ENV, "")
  path = os.path.join(folder, f"{worker}.txt")
  if not folder or not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line.rstrip("\n") for line in f
             if not any(frame in line for frame in RUNNER_FRAMES)]
  if len(lines) > MAX_DUMP_LINES:
    lines = lines[:MAX_DUMP_LINES] + [f"... ({path} has the rest)"]
  return "\n".join(lines)


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport,
                           sched) -> None:
  """xdist's hook for a test whose worker died: reschedule it, once.

  Args:
    crashitem: the test's node id.
    report: xdist's failed report for it; its outcome becomes "rerun" when
      the test is rescheduled, so it counts as no failure.
    sched: xdist's scheduler.
  """
  worker = report.node.gateway.id
  rerun = sum(c.nodeid == crashitem for c in _crashes) < CRASH_RERUNS
  _crashes.append(Crash(crashitem, worker, rerun, read_dump(worker)))
  if rerun:
    sched.mark_test_pending(crashitem)
    report.outcome = "rerun"


def pytest_report_teststatus(report: pytest.TestReport):
  """A rescheduled crash shows as "R" and counts under `CATEGORY`."""
  if report.outcome == "rerun":
    return CATEGORY, "R", "CRASHED, RERUN IN A NEW WORKER"
  return None


def pytest_terminal_summary(terminalreporter) -> None:
  """Lists each crash, what became of its test, and where the worker died."""
  if not _crashes:
    return
  counts = collections.Counter(c.nodeid for c in _crashes)
  terminalreporter.section("worker crashes", sep="=", yellow=True)
  for crash in _crashes:
    fate = ("rerun in a new worker" if crash.rerun else
            f"failed: it crashed {counts[crash.nodeid]} times")
    terminalreporter.line(
        f"{crash.nodeid}: worker {crash.worker!r} died ({fate}). Its "
        "faulthandler dump:", yellow=True)
    terminalreporter.line(crash.dump or "  (none written)")
