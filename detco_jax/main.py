r"""Entry point: `python -m detco_jax.main --config=configs/detco.py --workdir=DIR`.

Flags select the config (`--config=FILE[:variant]`, `--config.key=value`
overrides) and the workdir. Multi-process runs initialise
`jax.distributed` first: automatically on TPU pods and SLURM, or with the
explicit coordinator flags of `detco_jax.distributed`. `--traceback` shows
the stack of an error (by default: one line).

Nothing heavy is imported here: the flags are parsed first, and the job
(detco_jax/train.py, with JAX and TensorFlow) loads only once they are good.
"""

from detco_jax import cli  # First: it quiets TensorFlow's import.

# pylint: disable=g-import-not-at-top,wrong-import-order
from absl import logging


def report(last: dict[str, float]) -> None:
  """Logs the last window on every process (process 0 also wrote events)."""
  import jax
  if last:
    logging.info("Process %d finished: epoch=%.4f loss=%.8f",
                 jax.process_index(), last["epoch"], last["loss"])


if __name__ == "__main__":
  cli.run_job(
      "detco_jax.train:run",
      config_help="Experiment config file, e.g. configs/detco.py:demo.",
      workdir_help="Directory for checkpoints, TensorBoard events, config.",
      report=report, precheck="detco_jax.config_checks:check_pretraining")
