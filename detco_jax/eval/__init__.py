"""Evaluation of pretrained backbones: linear probe, kNN, dense probe, maps."""
