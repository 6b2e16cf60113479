r"""Benchmarks the jitted DetCo train step (see `train_step` for the figures).

  python -m detco_jax.benchmark --config=configs/detco.py[:variant] \
      [--config.key=value ...] [--per_device_batch=B] [--steps=N] \
      [--warmup=N] [--compile_only [--topology=v3:2x2]] [--nobackbone] \
      [--breakdown]
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import sys

from absl import flags
from ml_collections import config_flags

from detco_jax.benchmark import train_step

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/detco.py:demo.",
    lock_config=True)
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None,
    "Images per device; default: config.batch_size // device count.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median).")
_WARMUP = flags.DEFINE_integer("warmup", 2,
                               "Untimed steps run after compilation.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the step and print its FLOPs and "
    "memory; allocate and run nothing.")
_BACKBONE = flags.DEFINE_bool(
    "backbone", True, "Also time the backbone alone and print the overhead "
    "ratio full step / backbone-only.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also time the step's pieces on their own "
    "(augmentation, encoders + loss, optimiser, EMA + enqueue).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: compile for this TPU topology "
    "instead of the local devices, e.g. v3:2x2 (a v3-8: 8 cores) or "
    "v4:2x2x1 (a v4-8); needs the libtpu package, runs on any host.")
_CHIP_CONFIG = flags.DEFINE_string(
    "chip_config", None, "With --topology: libtpu's chip configuration, "
    "e.g. megacore (one device per v4 / v5p chip, as JAX shows them).")
flags.mark_flags_as_required(["config"])


def main() -> None:
  """Benchmarks with the command-line flags."""
  train_step.run(
      _CONFIG.value, per_device_batch=_PER_DEVICE_BATCH.value,
      steps=_STEPS.value, warmup=_WARMUP.value,
      compile_only=_COMPILE_ONLY.value, backbone=_BACKBONE.value,
      breakdown=_BREAKDOWN.value, topology=_TOPOLOGY.value,
      chip_config=_CHIP_CONFIG.value)


if __name__ == "__main__":
  cli.make_configs_importable(sys.argv)
  cli.run(main)
