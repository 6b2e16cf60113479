r"""MoCo v2 baseline (Chen et al., 2020): DetCo with only Res5 and only g<->g.

  python -m detco_jax.main --config=configs/mocov2.py --workdir=$WORKDIR

Same data, schedule, queue and shuffle BN as configs/detco.py; no jigsaw
views, no shallow heads. Expected after 200 epochs (DetCo paper, Table 1):
ImageNet linear top-1 67.5; VOC07+12 Faster R-CNN C4 AP 57.0.

This file is `configs/detco.py:mocov2`: the variants and arguments of
configs/detco.py apply after it, e.g. `configs/mocov2.py:demo` or
`configs/mocov2.py:ablation,seed=1`.
"""

import ml_collections

from configs import common
from configs import detco


def base_config() -> ml_collections.ConfigDict:
  """The paper's DetCo setting with the two DetCo parts switched off."""
  return detco.get_config("mocov2")


VARIANTS = detco.VARIANTS
ARGUMENTS = detco.ARGUMENTS

get_config = common.make_get_config(base_config, VARIANTS, ARGUMENTS)
