"""One command-line wrapper for every job.

Each program (`detco_jax.main`, the probes, the attention maps, the export,
the benchmarks) ends in `cli.run(...)` or, for jobs that take a config and a
workdir, `cli.run_job(...)`. The wrapper parses the flags, starts
`jax.distributed` where the run spans processes, logs the devices, keeps
library chatter (orbax's per-save INFO lines) off the console, and turns a
user's mistake (a bad config value, a missing dataset, a NaN loss) into one
line on stderr and exit status 1, without a traceback. `--traceback` shows
the full stack instead; `--verbose` keeps the libraries' INFO lines.
"""

import os

# TensorFlow (tf.data) prints C++ INFO lines on import; this module is
# imported before any job module pulls TensorFlow in.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as py_logging
import sys
from typing import Any, Callable

import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from detco_jax import distributed

# What a user can fix from the message alone: bad config values and sizes,
# a missing dataset or checkpoint, a diverged run.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
# Libraries whose INFO lines are progress chatter on a console.
_QUIET_LIBRARIES = ("/orbax/", "/clu/")


class _LibraryInfoFilter(py_logging.Filter):
  """Drops records below WARNING that come from the quiet libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return not any(part in path for part in _QUIET_LIBRARIES)


def quiet_libraries() -> None:
  """Keeps orbax's and clu's INFO lines out of the log (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def run(main: Callable[[], Any],
        define_flags: Callable[[], None] | None = None) -> None:
  """Runs `main()` as the program.

  Args:
    main: the program's body; flags are parsed when it runs.
    define_flags: defines the program's own flags. Flags are defined here,
      not at import, so that job modules can import each other.
  """
  flags.DEFINE_bool("traceback", False,
                    "Show the full stack of an error instead of one line.")
  flags.DEFINE_bool("verbose", False,
                    "Keep orbax's and clu's INFO lines in the log.")
  if define_flags is not None:
    define_flags()
  app.run(lambda argv: _main(argv, main))


def _main(argv: list[str], main: Callable[[], Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.verbose:
    quiet_libraries()
  try:
    distributed.initialize()
    distributed.log_devices()
    main()
  except USER_ERRORS as e:
    if flags.FLAGS.traceback:
      raise
    # One line, after anything buffered in the log.
    sys.stderr.flush()
    print(f"Error: {type(e).__name__}: {e} (--traceback shows where)",
          file=sys.stderr, flush=True)
    sys.exit(1)


def run_job(job: Callable[[ml_collections.ConfigDict, str], Any], *,
            config_help: str, workdir_help: str,
            report: Callable[[Any], None] | None = None) -> None:
  """Runs `job(config, workdir)` with `--config=FILE[:args]` and `--workdir`.

  Args:
    job: the job's `run(config, workdir)`.
    config_help: help text of --config (name an example config).
    workdir_help: help text of --workdir.
    report: called with what `job` returned (e.g. to log the results).
  """

  def define_flags():
    config_flags.DEFINE_config_file("config", None, config_help,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

  def main():
    out = job(flags.FLAGS.config, flags.FLAGS.workdir)
    if report is not None:
      report(out)

  make_configs_importable(sys.argv)
  run(main, define_flags)


def make_configs_importable(argv: list[str]) -> None:
  """Lets `--config=/path/to/configs/detco.py` import `configs` anywhere.

  Config files import `configs.common`; the flag parser execs the file by
  path, so the folder above `configs/` must be on `sys.path` also when the
  job runs from another directory.

  Args:
    argv: the command line.
  """
  for arg in argv:
    if not arg.startswith("--config="):
      continue
    path = os.path.abspath(arg[len("--config="):].split(":", 1)[0])
    package = os.path.dirname(path)
    if os.path.exists(os.path.join(package, "__init__.py")):
      root = os.path.dirname(package)
      if root not in sys.path:
        sys.path.insert(0, root)
