"""Host views of the classic pretext tasks against NumPy references.

Rotation, jigsaw permutation and relative patch location
(detco_jax/methods/{rotation,jigsaw_perm,rel_patch}.py) build their views
from detco_jax/data/views.py. Here each is checked against what its
definition says the pixels must be, computed independently in NumPy (slices,
np.rot90, np.fliplr), on configs where resampling is an exact pixel copy:
the crop is the whole image (area and aspect ratio pinned to 1) and the
image's side equals the resize target.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from configs import detco as detco_config
from detco_jax.methods import jigsaw_perm
from detco_jax.methods import permutations
from detco_jax.methods import rel_patch
from detco_jax.methods import rotation

SEEDS = [tf.constant([k, 7], tf.int64) for k in range(20)]

# The 8 neighbours of the centre cell, (row, column) offsets in reading order.
READING_ORDER = [(-1, -1), (-1, 0), (-1, 1),
                 (0, -1), (0, 1),
                 (1, -1), (1, 0), (1, 1)]


def _image(side, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (side, side, 3),
                                              dtype=np.uint8)


def _exact_config(variant, flip_prob=0.0, **pretext):
  """`tiny,<variant>` with crops pinned to the whole image."""
  config = detco_config.get_config(f"tiny,{variant}")
  v = config.views
  v.global_area = (1.0, 1.0)
  v.global_ratio = (1.0, 1.0)
  v.local_min_area = 1.0
  v.local_ratio = (1.0, 1.0)
  v.flip_prob = flip_prob
  for key, value in pretext.items():
    config.pretext[key] = value
  return config


def _run(make, image, seed):
  out = make(tf.constant(image), seed)
  return out["inputs"].numpy(), out["label"].numpy()


def _find_shift(image, patch, top, left, max_shift):
  """All (dy, dx) in [-J, J]^2 with image[top+dy.., left+dx..] == patch."""
  p = patch.shape[0]
  found = []
  for dy, dx in itertools.product(range(-max_shift, max_shift + 1), repeat=2):
    y, x = top + dy, left + dx
    if y < 0 or x < 0 or y + p > image.shape[0] or x + p > image.shape[1]:
      continue
    if np.array_equal(image[y:y + p, x:x + p], patch):
      found.append((dy, dx))
  return found


# ----------------------------------------------------------------------------
# Rotation.


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_rotation_all_angles_are_rot90_of_the_view(flip_prob):
  config = _exact_config("rotation", flip_prob=flip_prob, angles="all")
  g = config.views.global_size
  image = _image(g)
  view0 = np.fliplr(image) if flip_prob == 1.0 else image
  make = rotation.example_views(config)
  for seed in SEEDS:
    inputs, label = _run(make, image, seed)
    assert inputs.shape == (4, 1, g, g, 3) and inputs.dtype == np.uint8
    assert label.dtype == np.int32
    np.testing.assert_array_equal(label, [0, 1, 2, 3])
    for k in range(4):
      np.testing.assert_array_equal(
          inputs[k, 0], np.rot90(view0, k, axes=(0, 1)),
          err_msg=f"input {k} is not view0 rotated {90 * k} deg CCW "
                  f"(flip_prob={flip_prob}, seed={seed.numpy()})")


@pytest.mark.long
def test_rotation_random_angle_matches_label_and_is_uniform():
  config = _exact_config("rotation", angles="random")
  g = config.views.global_size
  image = _image(g)
  make = rotation.example_views(config)
  labels = []
  for k in range(200):
    inputs, label = _run(make, image, tf.constant([k, 7], tf.int64))
    assert inputs.shape == (1, 1, g, g, 3) and label.shape == (1,)
    assert 0 <= label[0] < 4
    if k < 20:  # The pixel check on a subset; the labels on all 200.
      np.testing.assert_array_equal(inputs[0, 0], np.rot90(image, label[0]))
    labels.append(int(label[0]))
  counts = np.bincount(labels, minlength=4)
  assert counts.min() >= 20, f"angle labels far from uniform: {counts}"


# ----------------------------------------------------------------------------
# Jigsaw permutation.


def _cells(image, cell):
  """The 3 x 3 grid cells of `image`, in reading order."""
  return [image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
          for r in range(3) for c in range(3)]


def test_permutation_table_is_a_set_of_distinct_permutations():
  perms = permutations.table(100, 0)
  assert perms.shape == (100, 9)
  for row in perms:
    assert sorted(row.tolist()) == list(range(9))
  assert len({tuple(r) for r in perms.tolist()}) == 100


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_jigsaw_tiles_are_the_permuted_cells(flip_prob):
  config = _exact_config("jigsaw_perm", flip_prob=flip_prob)
  v = config.views
  v.patch_size = v.local_size // 3  # patch == cell: every offset is 0.
  side, cell = v.local_size, v.local_size // 3
  image = _image(side)
  shown = np.fliplr(image) if flip_prob == 1.0 else image
  cells = _cells(shown, cell)
  perms = permutations.table(config.pretext.num_permutations,
                             config.pretext.permutation_seed)
  np.testing.assert_array_equal(jigsaw_perm.table(config), perms)
  make = jigsaw_perm.example_views(config)
  labels = set()
  for seed in SEEDS:
    inputs, label = _run(make, image, seed)
    assert inputs.shape == (1, 9, cell, cell, 3) and inputs.dtype == np.uint8
    assert label.shape == (1,) and label.dtype == np.int32
    assert 0 <= label[0] < len(perms)
    perm = perms[label[0]]
    for k in range(9):
      np.testing.assert_array_equal(
          inputs[0, k], cells[perm[k]],
          err_msg=f"tile {k} is not cell {perm[k]} (label {label[0]}, "
                  f"flip_prob={flip_prob}, seed={seed.numpy()})")
    # Un-shuffling the tiles rebuilds the (shown) image.
    rebuilt = np.zeros_like(shown)
    for k in range(9):
      r, c = divmod(int(perm[k]), 3)
      rebuilt[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = inputs[0, k]
    np.testing.assert_array_equal(rebuilt, shown)
    labels.add(int(label[0]))
  assert len(labels) >= 10, f"only {len(labels)} permutations in 20 draws"


def test_jigsaw_small_tiles_lie_inside_their_cells():
  config = _exact_config("jigsaw_perm")
  v = config.views
  side, cell, p = v.local_size, v.local_size // 3, v.patch_size
  assert p < cell
  image = _image(side)
  perms = permutations.table(100, 0)
  make = jigsaw_perm.example_views(config)
  offsets = set()
  for seed in SEEDS:
    inputs, label = _run(make, image, seed)
    assert inputs.shape == (1, 9, p, p, 3)
    perm = perms[label[0]]
    for k in range(9):
      r, c = divmod(int(perm[k]), 3)
      hits = [(dy, dx)
              for dy, dx in itertools.product(range(cell - p + 1), repeat=2)
              if np.array_equal(
                  image[r * cell + dy:r * cell + dy + p,
                        c * cell + dx:c * cell + dx + p], inputs[0, k])]
      assert hits, (f"tile {k} (seed {seed.numpy()}) is no {p}x{p} window "
                    f"inside its cell {perm[k]}")
      offsets.update(hits)
  assert len(offsets) > 1, "the offset inside the cell never varies"


# ----------------------------------------------------------------------------
# Relative patch location.


def test_neighbour_table_is_reading_order():
  assert [tuple(n) for n in rel_patch.NEIGHBOURS] == READING_ORDER


def test_rel_patch_geometry_defaults_follow_documented_formula():
  config = detco_config.get_config("tiny,rel_patch")
  p = config.views.patch_size
  j = max(1, round(7 * p / 96))
  assert rel_patch.geometry(config) == (p, p // 2, j, 3 * p + p + 2 * j)
  # The paper's own sizes: 96 px patches, a 48 px gap, up to 7 px jitter.
  config.pretext.patch_size = 96
  assert rel_patch.geometry(config) == (96, 48, 7, 3 * 96 + 2 * 48 + 14)
  config.pretext.patch_size, config.pretext.gap, config.pretext.jitter = 7, 3, 0
  assert rel_patch.geometry(config) == (7, 3, 0, 27)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_rel_patch_centre_and_neighbour_slices(flip_prob):
  p, g = 8, 3
  config = _exact_config("rel_patch", flip_prob=flip_prob, patch_size=p,
                         gap=g, jitter=0)
  side = rel_patch.geometry(config)[3]
  assert side == 3 * p + 2 * g
  image = _image(side)
  shown = np.fliplr(image) if flip_prob == 1.0 else image

  def cell(r, c):
    y, x = r * (p + g), c * (p + g)
    return shown[y:y + p, x:x + p]

  make = rel_patch.example_views(config)
  labels = set()
  for k in range(60):
    seed = tf.constant([k, 7], tf.int64)
    inputs, label = _run(make, image, seed)
    assert inputs.shape == (1, 2, p, p, 3) and inputs.dtype == np.uint8
    assert label.shape == (1,) and label.dtype == np.int32
    assert 0 <= label[0] < 8
    dr, dc = READING_ORDER[label[0]]
    np.testing.assert_array_equal(
        inputs[0, 0], cell(1, 1),
        err_msg=f"centre patch wrong (flip_prob={flip_prob}, seed {k})")
    np.testing.assert_array_equal(
        inputs[0, 1], cell(1 + dr, 1 + dc),
        err_msg=f"neighbour patch for label {label[0]} is not cell "
                f"({1 + dr}, {1 + dc}) (flip_prob={flip_prob}, seed {k})")
    labels.add(int(label[0]))
  assert labels == set(range(8)), f"labels seen: {sorted(labels)}"


def test_rel_patch_jitter_shifts_within_bounds():
  p, g, jit = 8, 3, 2
  config = _exact_config("rel_patch", patch_size=p, gap=g, jitter=jit)
  side = rel_patch.geometry(config)[3]
  assert side == 3 * p + 2 * g + 2 * jit
  image = _image(side, seed=1)
  make = rel_patch.example_views(config)
  shifts = set()
  for seed in SEEDS:
    inputs, label = _run(make, image, seed)
    dr, dc = READING_ORDER[label[0]]
    for i, (r, c) in enumerate([(1, 1), (1 + dr, 1 + dc)]):
      top, left = jit + r * (p + g), jit + c * (p + g)
      hits = _find_shift(image, inputs[0, i], top, left, jit)
      assert hits, (f"patch {i} (seed {seed.numpy()}) is not the nominal "
                    f"slice at ({top}, {left}) shifted by <= {jit}")
      shifts.update(hits)
  assert len(shifts) >= 3, f"jitter barely varies: {sorted(shifts)}"
  assert {dy for dy, _ in shifts} >= {-jit, jit}, sorted(shifts)


# ----------------------------------------------------------------------------
# Determinism and default sizes.


@pytest.mark.parametrize("module,variant", [
    (rotation, "rotation"), (jigsaw_perm, "jigsaw_perm"),
    (rel_patch, "rel_patch")])
def test_views_are_deterministic_per_seed(module, variant):
  config = detco_config.get_config(f"demo,{variant}")
  image = _image(64)
  make = module.example_views(config)
  first = _run(make, image, SEEDS[3])
  again = _run(make, image, SEEDS[3])
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  differs = False
  for seed in SEEDS[4:8]:
    other = _run(make, image, seed)
    differs |= not all(np.array_equal(a, b) for a, b in zip(first, other))
  assert differs, f"{variant}: four other seeds all gave the same views"


@pytest.mark.parametrize("module,variant,angles,shape", [
    (rotation, "rotation", "all", (4, 1, 32, 32, 3)),
    (rotation, "rotation", "random", (1, 1, 32, 32, 3)),
    (jigsaw_perm, "jigsaw_perm", None, (1, 9, 10, 10, 3)),
    (rel_patch, "rel_patch", None, (1, 2, 10, 10, 3))])
def test_demo_sizes(module, variant, angles, shape):
  config = detco_config.get_config(f"demo,{variant}")
  if angles is not None:
    config.pretext.angles = angles
  make = module.example_views(config)
  out = make(tf.constant(_image(64)), SEEDS[0])
  assert out["inputs"].shape == shape and out["inputs"].dtype == tf.uint8
  assert out["label"].shape == (shape[0],) and out["label"].dtype == tf.int32
  m, n, s = module.TASK.input_shape(config)
  assert (m, n, s, s, 3) == shape
  assert 0 <= out["label"].numpy().min()
  assert out["label"].numpy().max() < module.TASK.num_classes(config)
