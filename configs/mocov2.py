r"""MoCo v2 baseline (Chen et al., 2020): DetCo with only Res5 and only g<->g.

  python -m detco_jax.main --config=configs/mocov2.py --workdir=$WORKDIR

Same data, schedule, queue and shuffle BN as configs/detco.py; no jigsaw
views, no shallow heads. Expected after 200 epochs (DetCo paper, Table 1):
ImageNet linear top-1 67.5; VOC07+12 Faster R-CNN C4 AP 57.0.

Variants of configs/detco.py apply too, e.g. `configs/mocov2.py:demo`.
"""

import importlib.util
import os

import ml_collections


def _detco_config_module():
  """configs/detco.py, loaded by path: config files are not a package."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detco.py")
  spec = importlib.util.spec_from_file_location("detco_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """MoCo v2; `arg` adds comma-separated variants of configs/detco.py."""
  variants = ",".join(filter(None, ["mocov2", arg]))
  return _detco_config_module().get_config(variants)
