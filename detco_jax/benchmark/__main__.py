r"""Benchmarks the jitted DetCo train step (see `train_step` for the figures).

  python -m detco_jax.benchmark --config=configs/detco.py[:variant] \
      [--config.key=value ...] [--per_device_batch=B] [--steps=N] \
      [--warmup=N] [--compile_only [--topology=v3:2x2]] [--nobackbone] \
      [--breakdown]
  python -m detco_jax.benchmark --config=configs/detco.py:demo \
      --compare=configs/detco.py:demo,mocov2 [--compare=...] [--steps=N]

`--compare` times the steps of `--config` and of each compared config in
turn, round after round, and prints them side by side with the time per
image of `--config` over each other's (`train_step.compare`). Overrides
(`--config.key=value`) apply to `--config` alone.

The detection fine-tuning step has its own command,
`python -m detco_jax.benchmark.detection_step`.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import sys

from absl import flags
from ml_collections import config_flags

from detco_jax.benchmark import common
from detco_jax.benchmark import train_step


def define_flags() -> None:
  """The shared step-benchmark flags, and the pretraining step's own."""
  common.define_flags("Experiment config file, e.g. configs/detco.py:demo.")
  flags.DEFINE_bool(
      "backbone", True, "Also time the backbone alone and print the "
      "overhead ratio full step / backbone-only.")
  flags.DEFINE_bool(
      "breakdown", False, "Also time the step's pieces on their own "
      "(augmentation, encoders + loss, optimiser, EMA + enqueue).")
  flags.DEFINE_multi_string(
      "compare", [], "Another config (FILE[:ARG], e.g. "
      "configs/detco.py:demo,mocov2) whose step is timed in turn with "
      "--config's; repeat for more. Prints them side by side.")


def main() -> None:
  """Benchmarks with the command-line flags."""
  f = flags.FLAGS
  if f.compare:
    if f.compile_only or f.breakdown or f.topology:
      raise ValueError("--compare times steps side by side: drop "
                       "--compile_only, --breakdown and --topology.")
    configs = {config_flags.get_config_filename(f["config"]): f.config}
    # The compared configs, made as `--config=SPEC` would make them.
    configs.update((spec, cli.load_config(["", f"--config={spec}"]))
                   for spec in f.compare)
    train_step.compare(configs, per_device_batch=f.per_device_batch,
                       steps=f.steps, warmup=f.warmup)
    return
  train_step.run(
      f.config, per_device_batch=f.per_device_batch, steps=f.steps,
      warmup=f.warmup, compile_only=f.compile_only, backbone=f.backbone,
      breakdown=f.breakdown, topology=f.topology, chip_config=f.chip_config)


if __name__ == "__main__":
  cli.make_configs_importable(sys.argv)
  cli.run(main, define_flags)
