#!/usr/bin/env python
r"""detectron2 training and evaluation for the configs beside this file.

  python configs/detectron2/train_net.py \
      --config-file configs/detectron2/coco_R_50_RetinaNet_1x.yaml \
      --num-gpus 8 MODEL.WEIGHTS r50_detco.pkl

needs detectron2 (not a dependency of detco_jax) and its datasets under
`$DETECTRON2_DATASETS` (default `./datasets`). It is detectron2's
`DefaultTrainer` with two additions:

* the `Res5ROIHeadsExtraNorm` ROI head that the R50-C4 configs name: the C4
  head of MoCo's detection benchmark (facebookresearch/moco,
  `detection/train_net.py`, class `Res5ROIHeadsExtraNorm`; DetCo's
  `benchmarks/detection/train_net.py` has it too), which appends a norm layer
  of `MODEL.RESNETS.NORM` after the res5 blocks that the head runs on each
  region. The layer is named `norm` inside `res5`, as in MoCo's, so that
  checkpoints fine-tuned with either script load into the other.
* an evaluator chosen by the dataset's `evaluator_type`: COCO, PASCAL VOC or
  Cityscapes instances (the evaluators of detectron2's `tools/train_net.py`
  for the datasets these configs use).

`--eval-only` evaluates `MODEL.WEIGHTS`; `--resume` continues from
`OUTPUT_DIR`. Any `KEY VALUE` pairs after the flags override the config.
"""

import os
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import (DefaultTrainer, default_argument_parser,
                               default_setup, launch)
from detectron2.evaluation import (CityscapesInstanceEvaluator, COCOEvaluator,
                                   DatasetEvaluator,
                                   PascalVOCDetectionEvaluator)
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
  """detectron2's C4 ROI head with a norm layer after its res5 stage.

  The extra normalisation of the region features that MoCo's paper
  describes for its R50-C4 transfer, as its benchmark implements it.
  """

  @classmethod
  def from_config(cls, cfg: CfgNode,
                  input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
    """Res5ROIHeads' arguments, with the norm appended to `res5`.

    Args:
      cfg: the detectron2 config.
      input_shape: the backbone's output shapes, by feature name.

    Returns:
      The keyword arguments of `Res5ROIHeads.__init__`.
    """
    ret = super().from_config(cfg, input_shape)
    res5 = ret["res5"]  # An nn.Sequential of bottleneck blocks.
    res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM,
                                     res5[-1].out_channels))
    return ret


class Trainer(DefaultTrainer):
  """DefaultTrainer that evaluates COCO, PASCAL VOC and Cityscapes."""

  @classmethod
  def build_evaluator(cls, cfg: CfgNode, dataset_name: str,
                      output_folder: str | None = None) -> DatasetEvaluator:
    """The evaluator of a registered dataset, by its `evaluator_type`.

    Args:
      cfg: the detectron2 config.
      dataset_name: a test dataset, e.g. "coco_2017_val".
      output_folder: where COCO results go; default OUTPUT_DIR/inference.

    Returns:
      A detectron2 evaluator.

    Raises:
      NotImplementedError: for a dataset of another kind.
    """
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    kind = MetadataCatalog.get(dataset_name).evaluator_type
    if kind == "coco":
      return COCOEvaluator(dataset_name, output_dir=output_folder)
    if kind == "pascal_voc":
      return PascalVOCDetectionEvaluator(dataset_name)
    if kind == "cityscapes_instance":
      return CityscapesInstanceEvaluator(dataset_name)
    raise NotImplementedError(
        f"No evaluator for {dataset_name} (evaluator_type {kind!r}).")


def setup(args: Any) -> CfgNode:
  """The config of the command line: the file, then the KEY VALUE pairs.

  Args:
    args: from `default_argument_parser().parse_args()`.

  Returns:
    The frozen config (detectron2's logging and output folder set up).
  """
  cfg = get_cfg()
  cfg.merge_from_file(args.config_file)
  cfg.merge_from_list(args.opts)
  cfg.freeze()
  default_setup(cfg, args)
  return cfg


def main(args: Any) -> Any:
  """Trains, or with --eval-only evaluates, in one process of the launch.

  Args:
    args: from `default_argument_parser().parse_args()`.

  Returns:
    The evaluation results (the trainer's, after training).
  """
  cfg = setup(args)
  if args.eval_only:
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=args.resume)
    return Trainer.test(cfg, model)
  trainer = Trainer(cfg)
  trainer.resume_or_load(resume=args.resume)
  return trainer.train()


if __name__ == "__main__":
  parsed = default_argument_parser().parse_args()
  print("Command Line Args:", parsed)
  launch(main, parsed.num_gpus, num_machines=parsed.num_machines,
         machine_rank=parsed.machine_rank, dist_url=parsed.dist_url,
         args=(parsed,))
