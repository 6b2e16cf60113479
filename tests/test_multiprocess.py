"""Multi-host code run for real: two JAX processes on this machine (gloo).

Each process has 2 fake CPU devices, reads its own data shard and builds its
slice of the global batch; both take part in the orbax save and restore.
"""

import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINISHED = re.compile(r"Process (\d) finished: epoch=[\d.]+ loss=([-\d.e]+)")

# A single process over 4 devices fed the global batches of the 2-process
# run: process 0's slice then process 1's, as the global array lays them out.
REFERENCE = textwrap.dedent("""
    import sys
    import numpy as np
    from configs import detco
    from detco_jax import train
    from detco_jax.data import pipeline

    make = pipeline.make_pretrain_iterator

    class Concatenated:
      num_corrupt = 0
      def __init__(self, parts):
        self.parts = parts
      def __iter__(self):
        return self
      def __next__(self):
        batches = [next(p) for p in self.parts]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    pipeline.make_pretrain_iterator = lambda config, start_step=0, **_: (
        Concatenated([make(config, process_index=i, process_count=2,
                           start_step=start_step) for i in range(2)]))
    config = detco.get_config("tiny")
    config.data.data_dir, workdir = sys.argv[1], sys.argv[2]
    config.total_steps = int(sys.argv[3])
    config.checkpoint_every = 100
    print("REFERENCE loss=%.8f" % train.train_and_evaluate(config,
                                                           workdir)["loss"])
""")


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_job_two_processes(module, args):
  """Runs `python -m module args` as 2 processes; returns their outputs."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, *args,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  return outputs


def run_two_processes(workdir, data_dir, total_steps):
  """Runs pretraining as 2 processes; returns {process: final loss}."""
  outputs = run_job_two_processes("detco_jax.main", [
      "--config=configs/detco.py:tiny", f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
      f"--config.total_steps={total_steps}", "--config.checkpoint_every=100"])
  losses = {}
  for out in outputs:
    for index, loss in FINISHED.findall(out):
      losses[int(index)] = float(loss)
  return losses, outputs


@pytest.mark.slow
def test_two_processes_save_resume_and_match_one_process(builtin_data_dir,
                                                         tmp_path):
  workdir = str(tmp_path / "two")
  first, _ = run_two_processes(workdir, builtin_data_dir, total_steps=3)
  assert set(first) == {0, 1} and first[0] == first[1]
  saved = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "3" in saved and "6" not in saved

  resumed, outputs = run_two_processes(workdir, builtin_data_dir,
                                       total_steps=6)
  assert "Resuming from checkpoint 3" in outputs[0]
  assert set(resumed) == {0, 1} and resumed[0] == resumed[1]
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))

  reference = subprocess.run(
      [sys.executable, "-c", REFERENCE, builtin_data_dir,
       str(tmp_path / "one"), "6"],
      cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=900)
  assert reference.returncode == 0, reference.stderr[-4000:]
  loss = float(re.search(r"REFERENCE loss=([-\d.e]+)",
                         reference.stdout).group(1))
  assert resumed[0] == pytest.approx(loss, rel=1e-5)



@pytest.mark.slow
def test_probes_run_as_two_processes(tiny_pretrain_workdir, builtin_data_dir,
                                     tmp_path):
  """The eval jobs start like pretraining and agree across processes.

  kNN reads whole splits, so two processes must give exactly the
  one-process figure; the linear probe's processes must report the same
  accuracies, and one results file is written.
  """
  common = ["--config=configs/linear_probe.py:tiny",
            f"--config.pretrained={tiny_pretrain_workdir}",
            f"--config.data.data_dir={builtin_data_dir}"]
  knn_re = re.compile(r"kNN top-1 \(res5, k=200\): ([\d.]+) on 64 test")
  outputs = run_job_two_processes(
      "detco_jax.eval.knn", common + [f"--workdir={tmp_path / 'knn2'}"])
  two = [float(knn_re.search(out).group(1)) for out in outputs]
  one = subprocess.run(
      [sys.executable, "-m", "detco_jax.eval.knn", *common,
       f"--workdir={tmp_path / 'knn1'}"],
      cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-4000:]
  assert two[0] == two[1] == float(knn_re.search(one.stderr).group(1))

  linear_re = re.compile(r"Process (\d): res5 top-1 ([\d.]+) top-5 ([\d.]+)")
  outputs = run_job_two_processes(
      "detco_jax.eval.linear", common + [f"--workdir={tmp_path / 'linear'}"])
  reports = [linear_re.search(out).groups() for out in outputs]
  assert {r[0] for r in reports} == {"0", "1"}
  assert reports[0][1:] == reports[1][1:]
  assert os.path.exists(tmp_path / "linear" / "linear_results.json")
