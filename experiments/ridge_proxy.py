r"""A fast proxy of the linear probe: ridge regression on pooled features.

  python experiments/ridge_proxy.py --workdir=workdirs/demo [--random]
      [--step=N] [--data_dir=DIR] [--train_examples=5000]

Reads the frozen backbone of a pretraining run (or, with `--random`, its
architecture untrained, BN statistics measured on data as the probes' floor
has them), pools each stage's map of the test-transform train and test
images of the built-in dataset, standardises the features and fits a ridge
classifier to one-hot `label`s. The ridge penalty is chosen on the last
fifth of the train features, refitted on all of them, and scored once on
the test split. It takes under a minute on a 2-core CPU where the linear
probe takes minutes, so candidate test-bed changes can be compared after
short runs; the linear probe stays the measure the README reports.
"""

import argparse
import os
import sys
import time
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import common  # pylint: disable=g-import-not-at-top
from configs import linear_probe  # pylint: disable=g-import-not-at-top
from detco_jax import sharding  # pylint: disable=g-import-not-at-top
from detco_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from detco_jax.data import sources  # pylint: disable=g-import-not-at-top
from detco_jax.eval import features  # pylint: disable=g-import-not-at-top
from detco_jax.eval import probe  # pylint: disable=g-import-not-at-top

PENALTIES = (1.0, 10.0, 100.0, 1000.0)


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int,
              penalty: float) -> np.ndarray:
  """Ridge regression of one-hot labels on features with a bias column.

  Args:
    x: float [n, d] (standardised) features.
    y: int [n] labels.
    num_classes: number of classes.
    penalty: the L2 penalty on the weights (the bias is penalised too; with
      standardised features it barely matters).

  Returns:
    float64 [d + 1, num_classes] weights; the last row is the bias.
  """
  a = np.c_[x.astype(np.float64), np.ones(len(x))]
  gram = a.T @ a + penalty * np.eye(a.shape[1])
  return np.linalg.solve(gram, a.T @ np.eye(num_classes)[y])


def predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Class predictions of `fit_ridge` weights: int [n]."""
  return (np.c_[x.astype(np.float64), np.ones(len(x))] @ w).argmax(axis=1)


def ridge_accuracy(train_x: np.ndarray, train_y: np.ndarray,
                   test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
                   penalties: Sequence[float] = PENALTIES
                   ) -> tuple[float, float]:
  """Test accuracy of a ridge classifier, its penalty picked on held-out data.

  Features are standardised with the train mean and std. The penalty with
  the best accuracy on the last fifth of the train rows (fitted on the
  rest) is refitted on every train row and scored on the test rows.

  Args:
    train_x: float [n, d]; train_y: int [n].
    test_x: float [m, d]; test_y: int [m].
    num_classes: number of classes.
    penalties: the candidate penalties.

  Returns:
    (test accuracy, the chosen penalty).
  """
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  cut = len(train_x) * 4 // 5

  def held_out(penalty):
    w = fit_ridge(train_x[:cut], train_y[:cut], num_classes, penalty)
    return np.mean(predict(w, train_x[cut:]) == train_y[cut:])

  best = max(penalties, key=held_out)
  w = fit_ridge(train_x, train_y, num_classes, best)
  return float(np.mean(predict(w, test_x) == test_y)), best


def probe_config(workdir: str, random_init: bool, step: int | None,
                 data_dir: str | None,
                 variant: str = "demo") -> ml_collections.ConfigDict:
  """The linear probe's config `variant`, pointed at `workdir`."""
  c = linear_probe.get_config(variant)
  c.pretrained = workdir
  c.pretrained_step = step
  c.random_init = random_init
  c.batch_size = 200
  if data_dir:
    c.data.data_dir = data_dir
  return c


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="A pretraining run's --workdir.")
  parser.add_argument("--random", action="store_true",
                      help="Its architecture untrained (the floor).")
  parser.add_argument("--step", type=int, default=None,
                      help="Which checkpoint; default the latest.")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--train_examples", type=int, default=5000)
  parser.add_argument("--variant", default="demo",
                      help="configs/linear_probe.py variant (data, views).")
  args = parser.parse_args()

  start = time.time()
  config = probe_config(args.workdir, args.random, args.step, args.data_dir,
                        args.variant)
  mesh = sharding.make_mesh()
  backbone = probe.backbone_for(config, mesh,
                                lambda: probe.train_images(config))
  def split(name, max_examples):
    batches = pipeline.make_eval_iterator(config, name, train=False,
                                          batch_size=config.batch_size)
    return features.extract_pooled(backbone, batches, mesh, common.STAGES,
                                   max_examples)

  train = split(config.data.train_split, args.train_examples)
  test = split(config.data.eval_split, 10 ** 9)
  num_classes = sources.num_classes(config.data)
  cells = []
  for stage in common.STAGES:
    accuracy, _ = ridge_accuracy(train[0][stage], train[1], test[0][stage],
                                 test[1], num_classes)
    cells.append(f"{100 * accuracy:.1f}")
  print(f"ridge top-1 res2..res5 ({backbone.source}): {' / '.join(cells)} "
        f"({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
