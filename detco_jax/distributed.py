"""Multi-process start-up shared by every job (pretraining, probes).

Importing this module defines the flags `--distributed`,
`--coordinator_address`, `--num_processes` and `--process_id`; a job's
`main` calls `initialize()` before touching devices.
"""

import glob
import importlib.util
import os

from absl import flags
from absl import logging

from detco_jax import versions

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: 'auto' on Cloud TPU VMs, in multi-task "
    "SLURM jobs and when a coordinator is given; 'on' always; 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index.")


def initialize() -> None:
  """Starts the multi-controller runtime when the run spans processes."""
  import jax  # pylint: disable=g-import-not-at-top  # After the flags parse.
  explicit = _COORDINATOR.value is not None
  if _DISTRIBUTED.value == "off":
    return
  if _DISTRIBUTED.value == "auto" and not (explicit or cluster_detected()):
    return
  # CPU processes (tests, debugging) need a collectives backend; the
  # setting is ignored on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)


def cluster_detected(dev: str = "/dev") -> bool:
  """True inside a multi-task SLURM job or on a Cloud TPU VM.

  On a TPU VM the slice's hosts are listed in the VM's metadata, not in the
  environment; `jax.distributed.initialize()` with no arguments reads them
  (and on a single-host VM starts one process), so finding the TPU is
  enough. A TPU shows up as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e and
  later); libtpu must be installed too, which rules out other vfio
  devices.

  Args:
    dev: the device directory (a parameter for tests).

  Returns:
    Whether to start the multi-controller runtime.
  """
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return True
  tpu_devices = (glob.glob(os.path.join(dev, "accel[0-9]*")) +
                 glob.glob(os.path.join(dev, "vfio", "[0-9]*")))
  return bool(tpu_devices) and importlib.util.find_spec("libtpu") is not None


def log_devices() -> None:
  """Logs this process's place in the run, its devices and the versions.

  The versions line lets a log read later say which build produced it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("JAX process %d of %d; %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info("Versions: %s.", versions.line())
