r"""Entry point: `python -m detco_jax.main --config=configs/detco.py --workdir=DIR`.

Flags select the config (`--config=FILE[:variant]`, `--config.key=value`
overrides) and the workdir. Multi-process runs initialise
`jax.distributed` first: automatically on TPU pods and SLURM, or with the
explicit coordinator flags of `detco_jax.distributed`.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from detco_jax import distributed
from detco_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/detco.py:demo.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard events, config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  distributed.initialize()
  distributed.log_devices()
  last = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if last:
    # Every process logs this line (process 0 also writes TensorBoard).
    logging.info("Process %d finished: epoch=%.4f loss=%.8f",
                 jax.process_index(), last["epoch"], last["loss"])


if __name__ == "__main__":
  app.run(main)
