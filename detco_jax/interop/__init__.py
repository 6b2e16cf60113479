"""torch and detectron2 checkpoint files, written and read without torch.

Layout: `names` (a ResNet's variables under torchvision's and detectron2's
names, both ways), `torch_format` (torch's zip format, written),
`safe_pickle` (torch's zip and legacy formats and detectron2's pickles,
read without running code from them; `sniff` tells the containers apart by
their first bytes, also for the command line before JAX loads),
`backbone_file` (a checkpoint file's ResNet: which tensors, which
architecture, checked against the model).
The jobs that use them: `detco_jax.export` (a backbone to a file) and
`detco_jax.pretrained` (a file to a backbone).
"""
