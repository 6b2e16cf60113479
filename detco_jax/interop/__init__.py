"""torch and detectron2 checkpoint files, written without torch.

Layout: `names` (a ResNet's variables under torchvision's and detectron2's
names), `torch_format` (torch's zip format). The job that uses them is
`detco_jax.export`.
"""
