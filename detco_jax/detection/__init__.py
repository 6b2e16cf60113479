"""Static-shape building blocks of a RetinaNet detector, in pure JAX.

`boxes` holds the anchor grid (NumPy, built once per image size), pairwise
IoU/GIoU, the detectron2-style anchor matcher and the Box2BoxTransform
encoding of boxes as (dx, dy, dw, dh) deltas; `losses` the sigmoid focal loss
and the full RetinaNet training loss over a padded batch of ground truth;
`nms` greedy (per-class) non-maximum suppression and the RetinaNet inference
postprocess. Boxes are float32 (x0, y0, x1, y1) in pixels everywhere. Nothing
here has a data-dependent shape: variable-size sets (ground truth,
detections) are padded to a fixed size and carry a boolean `valid` mask, so
every function jits once per shape and runs on TPUs as well as GPUs.
"""
