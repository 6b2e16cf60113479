r"""Entry point: `python -m detco_jax.main --config=configs/detco.py --workdir=DIR`.

Flags select the config (`--config=FILE[:variant]`, `--config.key=value`
overrides) and the workdir. Multi-process runs initialise
`jax.distributed` first: automatically on TPU pods and SLURM, or with the
explicit coordinator flags of `detco_jax.distributed`. `--traceback` shows
the stack of an error (by default: one line).
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
import jax
from absl import logging

from detco_jax import train


def report(last: dict[str, float]) -> None:
  """Logs the last window on every process (process 0 also wrote events)."""
  if last:
    logging.info("Process %d finished: epoch=%.4f loss=%.8f",
                 jax.process_index(), last["epoch"], last["loss"])


if __name__ == "__main__":
  cli.run_job(
      train.run,
      config_help="Experiment config file, e.g. configs/detco.py:demo.",
      workdir_help="Directory for checkpoints, TensorBoard events, config.",
      report=report)
