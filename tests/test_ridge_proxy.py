"""The ridge proxy of the linear probe (experiments/ridge_proxy.py)."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "ridge_proxy.py")


def load_script():
  spec = importlib.util.spec_from_file_location("ridge_proxy", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fit_ridge_matches_the_augmented_least_squares_solution():
  ridge = load_script()
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
  w = ridge.fit_ridge(x, y, 3, penalty=2.5)
  # Independently: ridge is least squares on [A; sqrt(l) I] w = [Y; 0].
  a = np.c_[x, np.ones(40)]
  stacked = np.r_[a, np.sqrt(2.5) * np.eye(6)]
  target = np.r_[np.eye(3)[y], np.zeros((6, 3))]
  expected = np.linalg.lstsq(stacked, target, rcond=None)[0]
  np.testing.assert_allclose(w, expected, atol=1e-10)


def test_separable_classes_are_read_and_random_labels_are_not():
  ridge = load_script()
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(4, 16)) * 4

  def blobs(n):
    y = rng.integers(0, 4, n)
    return centres[y] + rng.normal(size=(n, 16)), y

  (tx, ty), (vx, vy) = blobs(400), blobs(200)
  accuracy, penalty = ridge.ridge_accuracy(tx, ty, vx, vy, 4)
  assert accuracy > 0.95 and penalty in ridge.PENALTIES
  shuffled, _ = ridge.ridge_accuracy(tx, rng.permutation(ty), vx, vy, 4)
  assert shuffled < 0.4


def test_penalty_is_chosen_on_held_out_train_rows():
  ridge = load_script()
  rng = np.random.default_rng(1)
  n = 100
  y = rng.integers(0, 2, n)
  x = np.c_[y[:, None] + rng.normal(size=(n, 1)), rng.normal(size=(n, 60))]
  vy = rng.integers(0, 2, 50)
  vx = np.c_[vy[:, None] + rng.normal(size=(50, 1)),
             rng.normal(size=(50, 60))]
  # By hand: standardise, fit on the first 80 rows, score the last 20.
  z = (x - x.mean(0)) / (x.std(0) + 1e-6)
  held = [np.mean(np.argmax(np.c_[z[80:], np.ones(20)] @ np.linalg.solve(
      np.c_[z[:80], np.ones(80)].T @ np.c_[z[:80], np.ones(80)]
      + p * np.eye(62), np.c_[z[:80], np.ones(80)].T @ np.eye(2)[y[:80]]),
      axis=1) == y[80:]) for p in ridge.PENALTIES]
  assert len(set(held)) > 1  # The choice matters here.
  _, penalty = ridge.ridge_accuracy(x, y, vx, vy, 2)
  assert penalty == ridge.PENALTIES[int(np.argmax(held))]
  # The test split is never looked at: scrambled test labels, same choice.
  _, same = ridge.ridge_accuracy(x, y, vx, 1 - vy, 2)
  assert same == penalty


@pytest.mark.long
def test_runs_on_a_pretraining_workdir_and_its_floor(tiny_pretrain_workdir,
                                                     builtin_data_dir):
  for extra in ([], ["--random"]):
    out = subprocess.run(
        [sys.executable, SCRIPT, f"--workdir={tiny_pretrain_workdir}",
         f"--data_dir={builtin_data_dir}", "--variant=tiny",
         "--train_examples=200", *extra],
        capture_output=True, text=True, check=True, cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    line = [l for l in out.stdout.splitlines() if l.startswith("ridge")][-1]
    cells = line.split(": ")[1].split(" (")[0].split(" / ")
    assert len(cells) == 4 and all(0 <= float(c) <= 100 for c in cells)
    assert ("random init" in line) == bool(extra), line
