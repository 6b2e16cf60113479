"""Flax linen modules: ResNet backbone, contrastive heads, DetCo encoder."""
