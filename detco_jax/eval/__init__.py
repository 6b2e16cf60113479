"""Evaluation: linear probe, kNN monitor, dense probe."""
