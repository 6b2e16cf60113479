"""Test set-up: CPU JAX with 8 fake devices, set before jax is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow (tf.data) must never grab an accelerator in tests.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Identical programs compiled by several tests (the tiny train step above
# all) are compiled once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "detco_jax_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # pylint: disable=g-import-not-at-top

# A test whose xdist worker dies (a native crash) runs once more in a new
# worker, and the crash is listed at the end; see tests/crash_rerun.py.
pytest_plugins = ["tests.crash_rerun"]


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding the tiny built-in dataset, made once."""
  from detco_jax.data import builtin  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builtin.prepare(image_size=32, num_train=256, num_test=64, data_dir=data_dir)
  return data_dir


@pytest.fixture(scope="session")
def tiny_pretrain_workdir(builtin_data_dir, tmp_path_factory) -> str:
  """A finished tiny pretraining run (6 steps, checkpoints at 3 and 6).

  The kNN monitor ran at steps 3 and 6 (`knn/top1` in its events).

  Probes and the export start from it; made once per test worker.
  """
  from configs import detco  # pylint: disable=g-import-not-at-top
  from detco_jax import train  # pylint: disable=g-import-not-at-top
  config = detco.get_config("tiny")
  config.data.data_dir = builtin_data_dir
  config.write_views_image = False
  config.knn.every_steps = 3  # The monitor runs at steps 3 and 6.
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  train.run(config, workdir)
  return workdir
