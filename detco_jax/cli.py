"""One command-line wrapper for every job.

Each program (`detco_jax.main`, the probes, the attention maps, the export,
the benchmarks) ends in `cli.run(...)` or, for jobs that take a config and a
workdir, `cli.run_job(...)`. The wrapper parses the flags, starts
`jax.distributed` where the run spans processes, logs the devices, keeps
library chatter (orbax's per-save INFO lines) off the console, and turns a
user's mistake (a bad config value, a missing dataset, a NaN loss) into one
line on stderr and exit status 1, without a traceback. `--traceback` shows
the full stack instead; `--verbose` keeps the libraries' INFO lines.

The flags are parsed before JAX, TensorFlow or a job's module is imported
(`run_job` takes the job as "module:function"), so a mistyped flag, config
key, variant or value fails within a second or two, as one line such as
`Error: unknown config key 'batch_sise'; did you mean 'batch_size'?`. So do
the checks that need no device (`precheck`; `detco_jax.config_checks`): a
batch that does not split into BN groups, a `--workdir` that is a file, a
`--config.pretrained` that holds no checkpoint. Nothing is written before
they pass.

A job run by `run_job` ends with one line that says what it wrote where,
and the command that opens it (`describe_outputs`).
"""

import os

# TensorFlow (tf.data) prints C++ INFO lines on import; this module is
# imported before any job module pulls TensorFlow in.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import difflib
import importlib
import importlib.util
import logging as py_logging
import re
import sys
from typing import Any, Callable, NoReturn

import ml_collections
from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from detco_jax import config_checks
# Defines the multi-process flags; imports no JAX until a job starts.
from detco_jax import distributed

# What a user can fix from the message alone: bad config values and sizes,
# a missing dataset or checkpoint, a diverged run.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
# Libraries whose INFO lines are progress chatter on a console (and JAX's
# "Unable to initialize backend 'tpu'" on every machine without one).
_QUIET_LIBRARIES = ("/orbax/", "/clu/", "/tensorflow_datasets/",
                    "/jax/_src/xla_bridge.py")
# In the name of every TensorBoard event file.
_EVENTS = "tfevents"


class _LibraryInfoFilter(py_logging.Filter):
  """Drops records below WARNING that come from the quiet libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace(os.sep, "/")
    return not any(part in path for part in _QUIET_LIBRARIES)


def quiet_libraries() -> None:
  """Keeps orbax's, clu's and TFDS's INFO lines out of the log (idempotent)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def run(main: Callable[[], Any] | str,
        define_flags: Callable[[], None] | None = None,
        precheck: Callable[[], None] | None = None) -> None:
  """Runs `main()` as the program.

  Args:
    main: the program's body; flags are parsed when it runs. A
      "module:function" name is imported after `precheck` passed, so a
      mistake does not wait for the module's imports (JAX, TensorFlow).
    define_flags: defines the program's own flags. Flags are defined here,
      not at import, so that job modules can import each other.
    precheck: checks the parsed flags before `main` is imported or JAX
      starts; its user error (`USER_ERRORS`) is one line, without the
      traceback hint (the stack says nothing the message does not).
  """
  flags.DEFINE_bool("traceback", False,
                    "Show the full stack of an error instead of one line.")
  flags.DEFINE_bool("verbose", False,
                    "Keep orbax's, clu's and TFDS's INFO lines in the log.")
  if define_flags is not None:
    define_flags()
  app.run(lambda argv: _main(argv, main, precheck),
          flags_parser=_parse_flags)


def _fail(message: str) -> NoReturn:
  """Prints `Error: message` as the last line on stderr; exits with 1."""
  sys.stderr.flush()  # After anything buffered in the log.
  print(f"Error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a mistake reported as one line.

  The config file is loaded and every `--config.KEY=VALUE` checked against
  it first, independently of how the flag libraries word their errors.

  Args:
    argv: the command line.

  Returns:
    The arguments left after the flags.
  """
  traceback = any(arg.startswith("--traceback") for arg in argv[1:])
  try:
    config = load_config(argv) if "config" in flags.FLAGS else None
    for key, value in _config_overrides(argv) if config else ():
      problem = check_override(config, key, value)
      if problem:
        raise ValueError(problem)
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if traceback:
      raise
    _fail(describe_flag_error(e))


def load_config(argv: list[str]) -> ml_collections.ConfigDict | None:
  """The config that `--config=FILE[:ARG]` on the command line makes.

  Args:
    argv: the command line.

  Returns:
    `FILE`'s `get_config(ARG)`, or None without a `--config=` flag.

  Raises:
    FileNotFoundError: FILE does not exist.
    ValueError: the config string is bad (the config file's own message).
  """
  spec = next((a[len("--config="):] for a in argv[1:]
               if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, has_arg, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if has_arg else module.get_config()


def describe_flag_error(error: Exception) -> str:
  """One line that says what is wrong with the command line.

  Args:
    error: what checking or parsing the command line raised.

  Returns:
    The message: an unknown flag with the closest name, or the innermost
    user error's message (a config file's errors reach absl wrapped, with
    their traceback as text) without its traceback.
  """
  if isinstance(error, flags.UnrecognizedFlagError):
    name = error.flagname
    hint = difflib.get_close_matches(name, list(flags.FLAGS), n=1)
    return (f"unknown flag --{name}" +
            (f"; did you mean --{hint[0]}?" if hint else
             " (--helpfull lists the flags)"))
  cause = error
  while cause is not None:
    if isinstance(cause, USER_ERRORS) and not isinstance(cause, flags.Error):
      error = cause
      break
    cause = cause.__cause__ or cause.__context__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return re.sub(r"^\w+(Error|Exception): ", "", lines[-1].strip())


def _config_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
  """`(key, value)` of each `--config.KEY=VALUE` (value None if separate)."""
  out = []
  for arg in argv[1:]:
    if arg.startswith("--config."):
      key, has_value, value = arg[len("--config."):].partition("=")
      out.append((key, value if has_value else None))
  return out


def check_override(config: ml_collections.ConfigDict, key: str,
                    value: str | None) -> str | None:
  """What is wrong with `--config.KEY=VALUE`, or None.

  Args:
    config: the config file's config.
    key: the dotted key as written.
    value: the value as written (None: not checked).

  Returns:
    `unknown config key 'KEY'; did you mean 'NAME'?`, a key that is a block
    or below a value, a value of the wrong type, or None.
  """
  node, done = config, []
  for part in key.split("."):
    where = ".".join(done)
    if not isinstance(node, ml_collections.ConfigDict):
      return f"config key {where!r} is a value, so {key!r} does not exist"
    if part not in node:
      close = difflib.get_close_matches(part, list(node.keys()), n=1)
      if close:
        name = ".".join([*done, close[0]])
        return f"unknown config key {key!r}; did you mean {name!r}?"
      return (f"unknown config key {key!r} (no close match in " +
              (f"block {where!r})" if done else "the config file)"))
    parent, node = node, node[part]
    done.append(part)
  if isinstance(node, ml_collections.ConfigDict):
    return (f"config key {key!r} is a block; set one of its keys, e.g. "
            f"--config.{key}.{next(iter(node.keys()), 'KEY')}=VALUE")
  kind = parent.get_type(part)
  if value is not None and not _parses_as(kind, value):
    return f"config key {key!r} takes {kind.__name__} values, got {value!r}"
  return None


def _parses_as(kind: type, text: str) -> bool:
  """Whether absl's parser of `kind` reads `text` (other kinds: True)."""
  parser = {bool: flags.BooleanParser, int: flags.IntegerParser,
            float: flags.FloatParser}.get(kind)
  try:
    if parser is not None:
      parser().parse(text)
  except ValueError:
    return False
  return True


def _main(argv: list[str], main: Callable[[], Any] | str,
          precheck: Callable[[], None] | None) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS.verbose:
    quiet_libraries()
  try:
    if precheck is not None:
      precheck()
  except USER_ERRORS as e:
    if flags.FLAGS.traceback:
      raise
    _fail(str(e))
  try:
    distributed.initialize()
    distributed.log_devices()
    (load_job(main) if isinstance(main, str) else main)()
  except USER_ERRORS as e:
    if flags.FLAGS.traceback:
      raise
    _fail(f"{e} (--traceback shows where)")


Job = Callable[[ml_collections.ConfigDict, str], Any]


def run_job(job: Job | str, *,
            config_help: str, workdir_help: str,
            report: Callable[[Any], None] | str | None = None,
            precheck: Callable[[ml_collections.ConfigDict, str], None] | str
            | None = None) -> None:
  """Runs `job(config, workdir)` with `--config=FILE[:args]` and `--workdir`.

  Before the job's module is imported, `precheck` checks the config and
  `--workdir` is checked to be a directory or a path that can become one;
  after the job, one line says what it wrote where (`describe_outputs`).

  Args:
    job: the job's `run(config, workdir)`, or its name as "module:function"
      (e.g. "detco_jax.train:run"): imported after the flags parse, so a
      mistaken flag does not wait for JAX and TensorFlow to load.
    config_help: help text of --config (name an example config).
    workdir_help: help text of --workdir.
    report: called with what `job` returned (e.g. to log the results); a
      "module:function" name is imported with the job.
    precheck: `precheck(config, workdir)`, the job's checks that need no
      device (e.g. "detco_jax.config_checks:check_probe"); a
      "module:function" name must import no JAX or TensorFlow.
  """

  def define_flags():
    config_flags.DEFINE_config_file("config", None, config_help,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])

  def check():
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    if precheck is not None:
      (load_job(precheck) if isinstance(precheck, str) else precheck)(
          config, workdir)
    config_checks.check_directory("workdir", workdir)

  def main():
    run = load_job(job) if isinstance(job, str) else job
    out = run(flags.FLAGS.config, flags.FLAGS.workdir)
    if report is not None:
      (load_job(report) if isinstance(report, str) else report)(out)
    log_outputs(flags.FLAGS.workdir)

  make_configs_importable(sys.argv)
  run(main, define_flags, precheck=check)


def describe_outputs(directory: str) -> str | None:
  """One line: what a job left in `directory`, and how to look at it.

  e.g. "Wrote checkpoints to w/checkpoints (steps 12, 24), TensorBoard
  events and config.json to w; view the events with: tensorboard --logdir
  w". Read from the directory itself, so every job is described alike and
  none lists its outputs twice.

  Args:
    directory: a job's workdir or output folder (local or gs://).

  Returns:
    The line, or None when the directory holds nothing.
  """
  path = epath.Path(directory)
  if not path.is_dir():
    return None
  entries = sorted(path.iterdir(), key=lambda p: p.name)
  parts = []
  checkpoints = path / config_checks.CHECKPOINTS_DIR
  steps = config_checks.checkpoint_steps(directory)
  if steps:
    parts.append(f"checkpoints to {checkpoints} "
                 f"(steps {', '.join(map(str, steps))})")
  events = any(_EVENTS in p.name for p in entries)
  files = (["TensorBoard events"] if events else []) + [
      p.name for p in entries if p.is_file() and _EVENTS not in p.name
      and not p.name.startswith(".")]
  if files:
    listed = (", ".join(files[:-1]) + " and " if len(files) > 1 else "")
    parts.append(f"{listed}{files[-1]} to {directory}")
  if not parts:
    return None
  view = (f"; view the events with: tensorboard --logdir {directory}"
          if events else ".")
  return "Wrote " + ", ".join(parts) + view


def log_outputs(directory: str) -> None:
  """Logs `describe_outputs(directory)` on process 0 (after a job ran)."""
  import jax  # pylint: disable=g-import-not-at-top  # Loaded by the job.
  if jax.process_index() != 0:
    return
  line = describe_outputs(directory)
  if line:
    logging.info("%s", line)


def load_job(name: str) -> Job:
  """The function that "module:function" names, its module imported."""
  module, _, function = name.partition(":")
  return getattr(importlib.import_module(module), function)


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
