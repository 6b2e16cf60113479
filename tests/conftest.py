"""Test set-up: CPU JAX with 8 fake devices, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (tf.data) must never grab an accelerator or many threads in tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
