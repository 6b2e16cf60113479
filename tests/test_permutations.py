"""The jigsaw permutation set against a brute-force Algorithm 1."""

import itertools
import math

import numpy as np
import pytest

from detco_jax.methods import _permutation_table
from detco_jax.methods import permutations

# Measured on the stored table (100 permutations, seed 0).
STORED_MIN_HAMMING = 2


def brute_force_set(num, seed, n):
  """Noroozi & Favaro's Algorithm 1, the slow obvious way.

  The summed Hamming distance of every remaining candidate to every chosen
  permutation is recomputed from scratch at each iteration, and chosen
  permutations are removed from the candidate list as in the paper.
  """
  remaining = list(itertools.permutations(range(n)))
  first = int(np.random.default_rng(seed).integers(len(remaining)))
  chosen = [remaining.pop(first)]
  while len(chosen) < num:
    best, best_sum = None, -1
    for i, cand in enumerate(remaining):
      total = sum(sum(a != b for a, b in zip(cand, p)) for p in chosen)
      if total > best_sum:  # Strict: ties keep the lowest index.
        best, best_sum = i, total
    chosen.append(remaining.pop(best))
  return np.array(chosen, np.int32)


def test_all_permutations_order():
  perms = permutations.all_permutations(4)
  assert perms.dtype == np.uint8
  np.testing.assert_array_equal(
      perms, np.array(list(itertools.permutations(range(4)))))
  assert len({tuple(r) for r in perms}) == 24


def test_all_permutations_nine():
  perms = permutations.all_permutations(9)
  assert perms.shape == (math.factorial(9), 9)
  np.testing.assert_array_equal(
      perms, np.array(list(itertools.permutations(range(9)))))


@pytest.mark.parametrize("n,num,seed", [
    (3, 6, 0), (4, 1, 0), (4, 3, 1), (4, 10, 2), (4, 24, 0), (4, 24, 5),
    (5, 2, 0), (5, 13, 3), (5, 60, 7), (5, 120, 1),
])
def test_maximal_hamming_set_matches_brute_force(n, num, seed):
  got = permutations.maximal_hamming_set(num, seed=seed, n=n)
  assert got.dtype == np.int32 and got.shape == (num, n)
  np.testing.assert_array_equal(got, brute_force_set(num, seed, n))
  # Distinct even when num is all of n!.
  assert len({tuple(r) for r in got}) == num


def test_stored_table():
  assert _permutation_table.SEED == 0
  assert len(_permutation_table.TABLE) == 100
  assert all(len(s) == 9 and s.isdigit() for s in _permutation_table.TABLE)
  stored = permutations.table(100, 0)
  assert stored.dtype == np.int32 and stored.shape == (100, 9)
  np.testing.assert_array_equal(np.sort(stored, axis=1),
                                np.tile(np.arange(9), (100, 1)))
  assert len({tuple(r) for r in stored}) == 100
  # The stored data is what the procedure gives.
  np.testing.assert_array_equal(stored,
                                permutations.maximal_hamming_set(100, 0))
  assert permutations.min_hamming(stored) == STORED_MIN_HAMMING
  assert permutations.min_hamming(stored) >= 2


def test_table_parses_stored_strings():
  stored = permutations.table(100, 0)
  for row, s in zip(stored, _permutation_table.TABLE):
    assert "".join(str(d) for d in row) == s


def test_table_computes_other_sizes_and_seeds():
  np.testing.assert_array_equal(permutations.table(10, 3),
                                permutations.maximal_hamming_set(10, 3))
  firsts = {tuple(permutations.table(10, s)[0]) for s in range(1, 5)}
  firsts.add(tuple(permutations.table(100, 0)[0]))
  assert len(firsts) == 5


def test_min_hamming_hand_made():
  # Pairwise distances: 3 (rows 0, 1), 4 (rows 0, 2), 3 (rows 1, 2).
  perms = np.array([[0, 1, 2, 3], [1, 2, 0, 3], [3, 2, 1, 0]])
  assert permutations.min_hamming(perms) == 3
  # A transposition differs from the identity in exactly 2 places.
  assert permutations.min_hamming(np.array([[0, 1, 2, 3], [1, 0, 2, 3],
                                            [2, 3, 0, 1]])) == 2
  with pytest.raises(ValueError):
    permutations.min_hamming(np.array([[0, 1, 2]]))


@pytest.mark.parametrize("num,n", [(0, 9), (-1, 9), (25, 4), (7, 3)])
def test_num_out_of_range(num, n):
  limit = math.factorial(n)
  with pytest.raises(ValueError, match=str(limit)):
    permutations.maximal_hamming_set(num, n=n)
