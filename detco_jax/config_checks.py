"""The checks of a job's config and paths that need no device.

The command line (`detco_jax.cli.run_job`) runs them before JAX or
TensorFlow is imported, so a batch that does not split into BN groups, a
queue that holds no whole number of batches, a `--workdir` that is a file or
a `--config.pretrained` that holds no checkpoint fails within a second, as
one line. The jobs call the same functions when they start (through
`config_lib.validate` and `pretrained.load_source`), so a run started in
process is held to the same rules. Checks that need the devices (a batch
that divides over them) or the model code (the ResNet depths) stay in
`config_lib`.

Nothing here imports JAX, TensorFlow or torch (a gs:// path lets etils load
its storage backend).
"""

import os

import ml_collections
from etils import epath

from detco_jax.interop import sniff

Config = ml_collections.ConfigDict
STEMS = ("imagenet", "cifar")
DTYPE_NAMES = ("float32", "bfloat16")
# Where a pretraining workdir keeps its checkpoints (`checkpoint.Checkpointer`)
# and its config (`train`), each step in a folder named by the step.
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def raise_first(checks: list[tuple[bool, str]]) -> None:
  """Raises `ValueError("Bad config: ...")` for the first failed check.

  Args:
    checks: (passed, what is wrong and how to fix it) pairs, in order.

  Raises:
    ValueError: for the first pair that did not pass.
  """
  for ok, message in checks:
    if not ok:
      raise ValueError(f"Bad config: {message}")


def bn_groups(config: Config) -> int:
  """BN sub-batches of the global batch.

  Args:
    config: the experiment config.

  Returns:
    1 for sync BN; for shuffle BN, `batch_size // bn_group_size` when
    `bn_group_size` is set (> 0), else `bn_groups`.
  """
  if config.bn == "sync":
    return 1
  # Configs recorded before `bn_group_size` existed (a run's config.json)
  # lack the key: they meant `bn_groups`.
  size = config.get("bn_group_size") or 0
  return config.batch_size // size if size > 0 else config.bn_groups


def check_backbone(config: Config) -> None:
  """The device-free checks every pretraining method shares.

  Args:
    config: the experiment config.

  Raises:
    ValueError: on the first bad value (batch, BN groups, stem, dtype).
  """
  b, size = config.batch_size, config.get("bn_group_size") or 0
  raise_first([
      (b > 0, f"batch_size={b} must be positive."),
      (size >= 0, f"bn_group_size={size} must be positive, or 0 to use "
       "bn_groups."),
  ])
  if size > 0 and config.bn != "sync":
    raise_first([
        (b % size == 0,
         f"batch_size={b} must be a multiple of bn_group_size={size}; e.g. "
         f"--config.batch_size={max(1, round(b / size)) * size}."),
    ])
  groups = bn_groups(config)
  raise_first([
      (groups > 0, f"bn_groups={groups} must be positive."),
      (groups > 0 and b % groups == 0,
       f"batch_size={b} must be a multiple of bn_groups={config.bn_groups}; "
       f"set --config.bn_groups to a divisor of {b}."),
      (config.model.stem in STEMS,
       f"model.stem={config.model.stem!r} must be 'imagenet' or 'cifar'."),
      (config.model.dtype in DTYPE_NAMES,
       f"model.dtype={config.model.dtype!r} must be one of "
       f"{sorted(DTYPE_NAMES)}."),
  ])


def check_detco(config: Config) -> None:
  """DetCo's own device-free checks: BN, patches, queue.

  Args:
    config: a DetCo (or MoCo v2) config.

  Raises:
    ValueError: on the first bad value.
  """
  views = config.views
  raise_first([
      (config.bn in ("shuffle", "sync"),
       f"bn={config.bn!r} must be 'shuffle' or 'sync'."),
      (config.bn_stats in ("views", "views_and_patches"),
       f"bn_stats={config.bn_stats!r} must be 'views' or "
       "'views_and_patches'."),
      (views.patch_size <= views.local_size // views.grid,
       f"views.patch_size={views.patch_size} exceeds its grid cell "
       f"(views.local_size // views.grid = {views.local_size // views.grid})"
       "; lower views.patch_size or raise views.local_size."),
  ])
  check_queue_size(config.queue_size, config.batch_size)


def check_queue_size(queue_size: int, global_batch: int) -> None:
  """Raises a ValueError unless the queue holds a whole number of batches.

  Args:
    queue_size: K.
    global_batch: keys enqueued per step (the batch of all processes).
  """
  if queue_size <= 0 or queue_size % global_batch:
    raise ValueError(
        f"Bad config: queue_size={queue_size} must be a positive multiple of "
        f"the global batch_size={global_batch}, so that each step's keys fit "
        f"without wrapping mid-batch; e.g. --config.queue_size="
        f"{max(1, round(queue_size / global_batch)) * global_batch}.")


def check_pretraining(config: Config, workdir: str) -> None:
  """The pretraining command's checks before JAX loads.

  Args:
    config: the experiment config; `method` picks DetCo's checks or only
      the shared ones (a pretext task's own checks need its module).
    workdir: the run's directory (checked by `check_directory`).

  Raises:
    ValueError: on the first bad value.
  """
  del workdir  # `cli.run_job` checks it for every job.
  check_backbone(config)
  if config.get("method", "detco") == "detco":
    check_detco(config)


def check_probe(config: Config, workdir: str) -> None:
  """A probe's (or the detection transfer's) checks before JAX loads.

  Args:
    config: a probe config (`pretrained`, `pretrained_step`, `random_init`).
    workdir: the probe's directory.

  Raises:
    ValueError, FileNotFoundError: `--config.pretrained` is unset, missing
      or no checkpoint, or is `workdir` itself.
  """
  if not config.get("pretrained"):
    raise ValueError(PRETRAINED_UNSET)
  if _absolute(config.pretrained) == _absolute(workdir):
    raise ValueError("--workdir must differ from --config.pretrained: the "
                     "probe would write its checkpoints over the "
                     "pretraining run's.")
  check_source(config.pretrained, config.get("pretrained_step"),
               needs_checkpoint=not config.get("random_init", False))


PRETRAINED_UNSET = (
    "Set --config.pretrained=PRETRAIN_WORKDIR or =CHECKPOINT_FILE: the probe "
    "takes the backbone (and, with --config.random_init=True, just its "
    "architecture) from a pretraining run's workdir or from a torchvision / "
    "MoCo / DetCo .pth or detectron2 .pkl file.")


def check_source(path: str, step: int | None = None,
                 needs_checkpoint: bool = True) -> None:
  """What `pretrained.load_source` reads is there and looks right.

  A file must open like a checkpoint (`interop.sniff`; its tensors are
  checked when it is read); a directory must hold a pretraining run's
  config.json and, unless only its architecture is wanted, a checkpoint
  (`step`'s, when given).

  Args:
    path: a pretraining run's workdir, or a checkpoint file (local or
      gs://).
    step: a workdir's checkpoint; None for the latest.
    needs_checkpoint: False when only the architecture is read
      (`random_init`).

  Raises:
    FileNotFoundError: `path` is neither, or lacks config.json or a
      checkpoint.
    ValueError: a file that is no checkpoint, or a step for a file.
  """
  source = epath.Path(path)
  if source.is_file():
    with source.open("rb") as f:
      problem = sniff.problem(path, f.read(sniff.HEAD_BYTES))
    if problem:
      raise ValueError(problem)
    if step is not None:
      raise ValueError(
          f"Step {step} names a checkpoint of a pretraining workdir, but "
          f"{path} is a checkpoint file: drop the step.")
    return
  if not source.is_dir():
    raise FileNotFoundError(
        f"{path} is neither a checkpoint file nor a pretraining workdir (a "
        f"directory with {CONFIG_FILE} and {CHECKPOINTS_DIR}/).")
  if not (source / CONFIG_FILE).is_file():
    raise FileNotFoundError(
        f"{path} has no {CONFIG_FILE}: give the --workdir of a pretraining "
        "run (python -m detco_jax.main ...), which writes config.json and "
        "checkpoints/ there, or a checkpoint file.")
  if needs_checkpoint:
    _check_steps(path, step)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints in a job's workdir, read without orbax.

  Args:
    workdir: a job's directory (local or gs://).

  Returns:
    The steps in increasing order; [] without a checkpoints folder.
  """
  folder = epath.Path(workdir) / CHECKPOINTS_DIR
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _check_steps(workdir: str, step: int | None) -> None:
  """A pretraining workdir holds a checkpoint (`step`'s if given)."""
  folder = epath.Path(workdir) / CHECKPOINTS_DIR
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f"{workdir} holds no checkpoint yet (nothing in {folder}): wait for "
        "the pretraining run's first checkpoint_every steps.")
  if step is not None and step not in steps:
    raise FileNotFoundError(
        f"{workdir} has no checkpoint of step {step}; it has steps "
        f"{', '.join(map(str, steps))}.")


def check_directory(flag: str, path: str) -> None:
  """An output directory flag names a directory or a path that can be one.

  Nothing is created: the job makes the directory once every check passed.

  Args:
    flag: the flag's name, for the message (e.g. "workdir").
    path: its value (remote paths, gs://..., are not checked).

  Raises:
    ValueError: `path`, or a folder above it, is a file.
  """
  if "://" in path:
    return
  fix = "choose a directory (it is created if missing)."
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is a file, not a directory; {fix}")
  _check_above(flag, path, fix)


def check_output_file(flag: str, path: str) -> None:
  """An output file flag names a file that can be written.

  Args:
    flag: the flag's name, for the message (e.g. "out").
    path: its value (remote paths, gs://..., are not checked).

  Raises:
    ValueError: `path` is a directory, or a folder above it is a file.
  """
  if "://" in path:
    return
  if os.path.isdir(path):
    raise ValueError(f"--{flag}={path} is a directory; name the file to "
                     "write in it.")
  _check_above(flag, path, "choose another place (missing folders are "
               "created).")


def _check_above(flag: str, path: str, fix: str) -> None:
  """Raises when the nearest existing folder above `path` is a file."""
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    raise ValueError(f"--{flag}={path} is under {above}, which is a file, "
                     f"not a directory; {fix}")


def _absolute(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)
