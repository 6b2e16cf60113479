r"""Entry point: `python -m detco_jax.main --config=configs/detco.py --workdir=DIR`.

Flags select the config (`--config=FILE[:variant]`, `--config.key=value`
overrides) and the workdir. Multi-process runs initialise
`jax.distributed` first: automatically on TPU pods and SLURM, or with the
explicit coordinator flags below.
"""

import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from detco_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/detco.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard events, config.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize: 'auto' on TPU pods / SLURM / when a "
    "coordinator is given, 'on' always, 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of JAX processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """Starts the multi-controller runtime when the run spans processes."""
  explicit = _COORDINATOR.value is not None
  if _DISTRIBUTED.value == "off":
    return
  if _DISTRIBUTED.value == "auto" and not (explicit or _cluster_detected()):
    return
  # CPU processes (tests, debugging) need a collectives backend; the
  # setting is ignored on GPU and TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)


def _cluster_detected() -> bool:
  """True on a multi-host TPU slice or inside a multi-task SLURM job."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def main(argv):
  del argv
  initialize_distributed()
  logging.info("JAX process %d of %d; %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  last = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if last:
    # Every process logs this line (process 0 also writes TensorBoard).
    logging.info("Process %d finished: epoch=%.4f loss=%.8f",
                 jax.process_index(), last["epoch"], last["loss"])


if __name__ == "__main__":
  app.run(main)
