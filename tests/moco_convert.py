"""MoCo's detectron2 converter, re-stated for the tests (no torch needed)."""

from typing import Any, Mapping

import numpy as np


def moco_convert(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """MoCo's `convert-pretrain-to-detectron2.py`, re-stated without torch.

  facebookresearch/moco, `detection/convert-pretrain-to-detectron2.py` (its
  `__main__` block): of the training checkpoint's `state_dict`, the keys
  under `module.encoder_q.` only, that prefix removed; a key without "layer"
  gets a `stem.` prefix; `layer1..4` become `res2..5`, `bn1..3` become
  `conv1..3.norm`, `downsample.0` `shortcut` and `downsample.1`
  `shortcut.norm` (plain substring replacements, in that order); each
  tensor becomes a numpy array. Nothing else is dropped: BN's
  `num_batches_tracked` stays, and the MLP head `fc.*` becomes `stem.fc.*`.

  Args:
    state_dict: name -> array, as in MoCo's checkpoint["state_dict"].

  Returns:
    `{"model": {name: np.ndarray}, "__author__": "MOCO",
    "matching_heuristics": True}`.
  """
  model = {}
  for key, value in state_dict.items():
    if not key.startswith("module.encoder_q."):
      continue
    key = key[len("module.encoder_q."):]
    if "layer" not in key:
      key = "stem." + key
    for t in (1, 2, 3, 4):
      key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
      key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    key = key.replace("downsample.1", "shortcut.norm")
    model[key] = np.asarray(value)
  return {"model": model, "__author__": "MOCO", "matching_heuristics": True}
