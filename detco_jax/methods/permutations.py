"""The permutation set of the jigsaw pretext task.

Noroozi & Favaro (2016), "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles", Algorithm 1: starting from one random permutation of
the 9 tiles, greedily add the permutation whose summed Hamming distance to the
ones already chosen is largest. The network then classifies which of the
chosen permutations shuffled the tiles; far-apart permutations keep the
classes from differing in only a tile or two.

The default set (100 permutations, seed 0) is stored as data in
`_permutation_table.py`, so that training never depends on recomputing it;
`python -m detco_jax.methods.permutations` regenerates that file.
"""

import math
import os

import numpy as np

NUM_TILES = 9
_TABLE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "_permutation_table.py")


def all_permutations(n: int = NUM_TILES) -> np.ndarray:
  """All permutations of 0..n-1 in lexicographic order.

  Args:
    n: the number of elements, 1 <= n <= 256 (uint8 entries).

  Returns:
    [n!, n] uint8, row i the i-th tuple of `itertools.permutations(range(n))`.
  """
  if not 1 <= n <= 256:
    raise ValueError(f"n must be in [1, 256], got {n}")
  # Built block by block rather than from itertools: listing 9! Python tuples
  # costs far more than indexing arrays. Lexicographic order is "first element
  # ascending, then the rest in lexicographic order", and mapping the
  # (n-1)-permutations through the ascending remaining elements preserves
  # their order.
  perms = np.zeros((1, 0), np.uint8)
  for m in range(1, n + 1):
    blocks = []
    for first in range(m):
      rest = np.array([j for j in range(m) if j != first], np.uint8)
      block = np.empty((perms.shape[0], m), np.uint8)
      block[:, 0] = first
      block[:, 1:] = rest[perms]
      blocks.append(block)
    perms = np.concatenate(blocks)
  return perms


def maximal_hamming_set(num: int, seed: int = 0,
                        n: int = NUM_TILES) -> np.ndarray:
  """The paper's maximal Hamming distance permutation set (Algorithm 1).

  Args:
    num: how many permutations to choose, 1 <= num <= n!.
    seed: seeds `np.random.default_rng`, which draws the first permutation.
    n: the number of tiles.

  Returns:
    [num, n] int32, in the order chosen. Rows are distinct permutations of
    0..n-1.
  """
  total = math.factorial(n)
  if not 1 <= num <= total:
    raise ValueError(f"num must be in [1, {total}] (= {n}!), got {num}")
  candidates = all_permutations(n)
  rng = np.random.default_rng(seed)
  first = int(rng.integers(total))
  chosen = [first]
  # The paper's 1^T D: the Hamming distance of every candidate to the chosen
  # set, summed over the chosen ones. D gains one row per chosen permutation,
  # so the sum is kept incrementally instead of recomputing D.
  sums = np.zeros(total, np.int64)
  selected = np.zeros(total, bool)
  selected[first] = True
  for _ in range(num - 1):
    sums += np.count_nonzero(candidates != candidates[chosen[-1]], axis=1)
    # The paper removes chosen permutations from the candidates. Masking them
    # is the same (removal keeps the survivors' order, so argmax's lowest
    # index tie-break agrees) and keeps the set distinct even once every
    # remaining sum is no larger than a chosen one's.
    best = int(np.argmax(np.where(selected, -1, sums)))
    selected[best] = True
    chosen.append(best)
  return candidates[chosen].astype(np.int32)


def table(num: int = 100, seed: int = 0) -> np.ndarray:
  """The jigsaw permutation set of 9 tiles.

  Args:
    num: how many permutations.
    seed: the seed of the first permutation.

  Returns:
    [num, 9] int32: the stored table when (num, seed) is its own, else
    `maximal_hamming_set(num, seed)`.
  """
  # Imported here so that a missing or broken table file does not stop
  # `main` from regenerating it.
  from detco_jax.methods import _permutation_table  # pylint: disable=g-import-not-at-top
  if (num, seed) == (len(_permutation_table.TABLE), _permutation_table.SEED):
    return np.array([[int(c) for c in row] for row in _permutation_table.TABLE],
                    np.int32)
  return maximal_hamming_set(num, seed)


def min_hamming(perms: np.ndarray) -> int:
  """The minimum pairwise Hamming distance of a set of permutations.

  Args:
    perms: [k, n], k >= 2, one permutation per row.

  Returns:
    The least number of positions in which two different rows differ.
  """
  perms = np.asarray(perms)
  if perms.ndim != 2 or perms.shape[0] < 2:
    raise ValueError(f"need a [k, n] array with k >= 2, got {perms.shape}")
  dist = np.count_nonzero(perms[:, None, :] != perms[None, :, :], axis=-1)
  # A row's distance to itself is 0; only pairs of different rows count.
  np.fill_diagonal(dist, np.iinfo(dist.dtype).max)
  return int(dist.min())


def main() -> None:
  """Regenerates `_permutation_table.py`: 100 permutations, seed 0."""
  num, seed = 100, 0
  perms = maximal_hamming_set(num, seed)
  lines = [
      '"""The stored jigsaw permutation set: generated, do not edit by hand.',
      "",
      "Generated by `python -m detco_jax.methods.permutations` (Noroozi &",
      "Favaro 2016, Algorithm 1); each string is a permutation of the 9 tiles.",
      '"""',
      "",
      f"SEED = {seed}",
      "TABLE = (",
  ]
  lines += [f'    "{"".join(str(int(d)) for d in row)}",' for row in perms]
  lines.append(")")
  with open(_TABLE_FILE, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {_TABLE_FILE}: {num} permutations, seed {seed}, "
        f"min Hamming distance {min_hamming(perms)}")


if __name__ == "__main__":
  main()
