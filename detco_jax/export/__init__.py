r"""Exports a pretrained backbone for torchvision or detectron2.

  python -m detco_jax.export --pretrained=PRETRAIN_WORKDIR [--step=N] \
      --format={torchvision,detectron2} --out=FILE
  python -m detco_jax.export --pretrained=CHECKPOINT_FILE \
      --format={torchvision,detectron2} --out=FILE

writes the query encoder's ResNet of a pretraining checkpoint (the latest
complete one unless `--step` is given; `--workdir=` is the same as
`--pretrained=` a workdir), or the ResNet of a checkpoint file (a
torchvision / MoCo / DetCo `.pth`, a detectron2 `.pkl`: see
`detco_jax.pretrained.load_file`), so that a file converts from one format
to the other. The output is written whole or not at all (a temporary file,
renamed), and not at all on an error.

* `torchvision`: a file that `torch.load(FILE, weights_only=True)` reads as
  an `OrderedDict` of tensors named and laid out like torchvision's ResNet
  (`conv1.weight`, `bn1.running_var`, `layer2.0.downsample.0.weight`, ...;
  no `fc.*`), so that

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load(FILE, weights_only=True), strict=False)

  leaves only `fc.weight` and `fc.bias` missing. It is written in torch's
  own zip serialisation format without importing torch, which this project
  does not depend on.
* `detectron2`: a pickle of `{"model": {name: np.ndarray}, "__author__":
  "detco_jax", "matching_heuristics": True}` with detectron2's ResNet names
  (`stem.conv1.norm.weight`, `res3.0.shortcut.weight`, ...), as MoCo's
  `convert-pretrain-to-detectron2.py` makes them; give it a `.pkl` name
  (detectron2 reads `.pkl` files as such) and use it as
  `MODEL.WEIGHTS` with `MODEL.RESNETS.STRIDE_IN_1X1 False` (the stride of
  a bottleneck is in its 3x3 conv, as in torchvision) and
  `MODEL.PIXEL_MEAN`/`PIXEL_STD` of the pretraining normalisation (in
  0..255 and RGB order, `INPUT.FORMAT "RGB"`), as for MoCo's weights.

The weights expect images normalised as in pretraining (`config.aug.mean`
and `std`; ImageNet's by default), or, from a file, as that file's network
expects (torchvision's convention unless it was trained otherwise). A
backbone with the "cifar" stem (3x3/1 conv1, no max-pool) exports under the
same names, but torchvision's and detectron2's ResNets have the ImageNet
stem (7x7/2 conv1 + max-pool): such a file loads only into a model whose
stem was changed to match, and a warning says so. Likewise `model.width != 64` gives shapes that no stock
torchvision ResNet has (torchvision's "wide" ResNets widen only the inner
bottleneck convs).

The export runs in a single process; on a multi-host job run it once, on
one host that can read the workdir.

This package holds the job (`export`, `run`) and its command line
(`python -m detco_jax.export`); the formats are `detco_jax.interop`'s.
"""

import pickle
import re
from typing import Any, TYPE_CHECKING

from absl import logging
from etils import epath

if TYPE_CHECKING:
  from detco_jax import pretrained  # pylint: disable=g-bad-import-order

FORMATS = ("torchvision", "detectron2")
# How each format's file is opened, for the last line of the log.
_OPEN_WITH = {
    "torchvision": "model.load_state_dict(torch.load({path!r}, "
                   "weights_only=True), strict=False)",
    "detectron2": "MODEL.WEIGHTS {path} with MODEL.RESNETS.STRIDE_IN_1X1 "
                  "False (docs/checkpoints.md)",
}


# ----------------------------------------------------------------------------
# Export.


def export(backbone: "pretrained.Backbone", fmt: str,
           out: str) -> dict[str, Any]:
  """Writes `backbone` in `fmt` to `out`.

  Args:
    backbone: e.g. from `pretrained.load` or `pretrained.load_file`.
    fmt: "torchvision" or "detectron2".
    out: the output file (local or gs://); its folder is created.

  Returns:
    What was written: {"format", "path", "tensors", "parameters", "step"}
    ("parameters" counts the learned ones, not BN statistics).

  Raises:
    ValueError: for an unknown format.
  """
  # Imported here: the command line checks its flags before JAX loads.
  # pylint: disable=g-import-not-at-top
  from detco_jax.interop import names
  from detco_jax.interop import torch_format
  # pylint: enable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
  module = backbone.module
  if module.stem != "imagenet":
    logging.warning(
        "The backbone has the %r stem (3x3/1 conv1, no max-pool) but "
        "torchvision's and detectron2's ResNets have the ImageNet stem "
        "(7x7/2 conv1 + max-pool): load the file into a model whose stem "
        "matches, or conv1.weight will not fit.", module.stem)
  state_dict = names.torchvision_state_dict(backbone.variables)
  if fmt == "torchvision":
    archive = re.sub(r"\W", "_", epath.Path(out).stem) or "archive"
    data = torch_format.torch_bytes(state_dict, archive)
    tensors = len(state_dict)
  else:
    checkpoint = names.detectron2_checkpoint(state_dict)
    data = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    tensors = len(checkpoint["model"])
  path = epath.Path(out)
  _write_atomically(path, data)
  parameters = sum(
      v.size for k, v in state_dict.items()
      if k.endswith(".weight") or k.endswith(".bias"))
  logging.info(
      "Wrote %s (%s, %d tensors, %d parameters) of ResNet-%d width %d from "
      "%s. %s Open it with: %s", path, fmt, tensors, parameters,
      module.depth, module.width, backbone.source,
      normalisation(backbone.config.get("aug", {})),
      _OPEN_WITH[fmt].format(path=str(path)))
  return {"format": fmt, "path": str(path), "tensors": tensors,
          "parameters": int(parameters), "step": backbone.step}


def normalisation(aug: Any) -> str:
  """The input convention, worded alike for a workdir and for a file.

  A workdir's config.json gives lists and an int range, a file's settings
  tuples and a float: both print as "(0.485, 0.456, 0.406)" and "0..1".

  Args:
    aug: a config's `aug` (mean, std, channels, pixel_range).

  Returns:
    e.g. "Inputs: RGB images in 0..1, normalised with mean (0.485, 0.456,
    0.406) and std (0.229, 0.224, 0.225)."
  """
  def values(v):
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"
  return (f"Inputs: {aug.get('channels', 'RGB')} images in "
          f"0..{float(aug.get('pixel_range', 1)):g}, normalised with mean "
          f"{values(aug.get('mean', ()))} and std "
          f"{values(aug.get('std', ()))}.")


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """Writes `data` to `path` whole or not at all (its folder is created)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f".{path.name}.partial")
  partial.write_bytes(data)
  partial.replace(path)


def run(source: str, fmt: str, out: str,
        step: int | None = None) -> dict[str, Any]:
  """Exports the backbone of a pretraining run or of a checkpoint file.

  Args:
    source: the pretraining run's directory, or a checkpoint file.
    fmt: "torchvision" or "detectron2".
    out: the output file.
    step: which checkpoint of a workdir; None for the latest complete one.

  Returns:
    `export`'s summary.

  Raises:
    ValueError: for an unknown format, a step for a file, or a source that
      holds no backbone; nothing is written.
  """
  # Imported here, as in `export`: JAX loads only once the flags are good.
  from detco_jax import pretrained  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
  return export(pretrained.load_source(source, step), fmt, out)
