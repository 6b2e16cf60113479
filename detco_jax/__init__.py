"""DetCo: multi-level, global<->local contrastive pretraining in JAX/Flax."""

__version__ = "0.1.0"
