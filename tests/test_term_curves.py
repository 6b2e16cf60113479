"""The per-term curve script on a real tiny run."""

import json

import numpy as np
from PIL import Image

from detco_jax import config_lib
from detco_jax import pretrained
from experiments import learning_curve
from experiments import term_curves as script


def test_panels_table_and_picture_from_a_real_run(tiny_pretrain_workdir,
                                                  tmp_path):
  workdir = tiny_pretrain_workdir
  per_epoch = config_lib.steps_per_epoch(pretrained.load_config(workdir))
  # One bin as wide as the whole run: each series is its windows' mean.
  width = 6 / per_epoch
  results = script.make(workdir, workdir, str(tmp_path), bin_epochs=width)
  assert len(results) == 4 + 2 + 2
  for title, tag, label in (
      ("DetCo res3 InfoNCE losses", "res3/ll", "res3 ll"),
      ("res5 top-1 vs queue", "res5/gl_acc", "res5 gl"),
      ("res5 top-1 vs queue", "res5/gg_acc", "MoCo v2 gg"),
      ("std across the batch, local heads", "res4/local_std", "res4 local"),
      ("std across the batch, global heads", "res5/global_std",
       "MoCo v2 res5")):
    windows = [v for _, v in learning_curve.read_scalar(workdir, tag)]
    assert len(windows) == 3  # Log windows at steps 2, 4 and 6.
    got, = results[title][label].values()
    np.testing.assert_allclose(got, np.mean(windows), rtol=1e-6)
  assert json.load(open(tmp_path / "term_curves.json")) == results
  image = np.asarray(Image.open(tmp_path / "term_curves.png"))
  assert image.shape == (8 * 300, 720, 3)


def test_bins_end_at_multiples_of_their_width(tiny_pretrain_workdir):
  per_epoch = config_lib.steps_per_epoch(
      pretrained.load_config(tiny_pretrain_workdir))
  # Windows at steps 2, 4, 6 with bins of 4 steps: (0, 4] and (4, 8].
  ends, values = script.binned(tiny_pretrain_workdir, "loss", per_epoch,
                               4 / per_epoch)
  windows = dict(learning_curve.read_scalar(tiny_pretrain_workdir, "loss"))
  np.testing.assert_allclose(np.asarray(ends) * per_epoch, [4, 8])
  np.testing.assert_allclose(values, [(windows[2] + windows[4]) / 2,
                                      windows[6]], rtol=1e-6)
