"""When jobs start the multi-controller runtime on their own."""

import importlib.util

import pytest

from detco_jax import distributed


@pytest.fixture
def clean_env(monkeypatch):
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  return monkeypatch


def test_slurm_and_worker_lists(clean_env, tmp_path):
  assert not distributed.cluster_detected(str(tmp_path))
  clean_env.setenv("SLURM_NTASKS", "1")
  assert not distributed.cluster_detected(str(tmp_path))
  clean_env.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_detected(str(tmp_path))
  clean_env.delenv("SLURM_NTASKS")
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert distributed.cluster_detected(str(tmp_path))


@pytest.mark.parametrize("node", ["accel0", "vfio/0"])
def test_tpu_vm_needs_a_tpu_device_and_libtpu(clean_env, tmp_path, node):
  (tmp_path / node).parent.mkdir(parents=True, exist_ok=True)
  (tmp_path / node).touch()
  (tmp_path / "vfio" / "vfio").parent.mkdir(exist_ok=True)
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  assert distributed.cluster_detected(str(tmp_path)) == has_libtpu
  real = importlib.util.find_spec
  clean_env.setattr(importlib.util, "find_spec",
                    lambda name, *a: object() if name == "libtpu"
                    else real(name, *a))
  assert distributed.cluster_detected(str(tmp_path))


def test_other_vfio_devices_are_not_a_tpu(clean_env, tmp_path):
  (tmp_path / "vfio").mkdir()
  (tmp_path / "vfio" / "vfio").touch()  # The control node every host has.
  clean_env.setattr(importlib.util, "find_spec", lambda name, *a: object())
  assert not distributed.cluster_detected(str(tmp_path))
