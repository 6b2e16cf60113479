"""Input pipeline: sources, host-side crops and jigsaw sets, device-side augmentation."""
