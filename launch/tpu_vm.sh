#!/usr/bin/env bash
# DetCo pretraining on a Cloud TPU VM: one host (v4-8) or a pod slice (v4-32).
#
# Every sub-command is one or two gcloud calls. A pod slice has one VM per 4
# chips ("workers"); JAX runs one process per worker, so `setup`, `run` and
# `stop` act on `--worker=all`. The workdir (checkpoints, TensorBoard) and the
# TFDS data live on GCS, because every worker must see the same files and
# they must outlive the VMs: preemption, `stop` + `delete` and a later
# `create` + `setup` + `run` resume from the same checkpoint.
#
# Written for bash 3.2 too (macOS's /bin/bash), where gcloud users often are.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [--dry-run] COMMAND [ARGS...]

Create a Cloud TPU VM (one host or a pod slice), install detco_jax on every
worker, then run, watch, stop and delete a pretraining job.

Commands:
  create             create the TPU VM
  setup              install jax[tpu] and detco_jax on every worker: a git clone
                     of $REPO_URL if set, else a copy of this checkout
  run [FLAGS...]     start training in the background on all workers. FLAGS go
                     to `python -m detco_jax.main`: --config=FILE[:variant],
                     --workdir=gs://..., --config.key=value overrides.
                     Defaults: --config=configs/detco.py
                               --workdir=gs://$BUCKET/detco_jax/$TPU_NAME
                     Running it again with the same workdir resumes.
                     JOB=detco_jax.eval.linear (or .knn, .dense, .detection)
                     runs that job instead, with the same flags; it needs its own
                     --workdir and --config.pretrained=gs://... .
                     JOB=detco_jax.benchmark.suite runs the evidence suite; its
                     --workdir=gs://... is where suite.json and suite.md go.
  logs [WORKER|all]  follow a worker's log (default: worker 0; Ctrl-C to quit)
  stop               send SIGTERM to the training on all workers: the job saves
                     a checkpoint and exits (waits up to $STOP_WAIT s)
  delete             delete the TPU VM (the workdir on GCS stays)

Options (anywhere on the command line):
  --dry-run          print each gcloud command, quoted so it can be pasted,
                     instead of running it (same as DRY_RUN=1)
  -h, --help         show this text

Environment:
  TPU_NAME           TPU VM name                                  (all commands)
  ZONE               zone, e.g. us-central2-b                     (all commands)
  ACCELERATOR_TYPE   e.g. v4-8, v4-32, v5litepod-16                     (create)
  RUNTIME_VERSION    TPU software version; default tpu-ubuntu2204-base (create)
  SPOT               1: a Spot VM (cheaper, preemptible)                (create)
  PROJECT            GCP project; default: gcloud's configured one (optional)
  REPO_URL           git URL to clone on the workers                     (setup)
  REPO_REF           commit, tag or origin/BRANCH; default origin/HEAD   (setup)
  BUCKET             GCS bucket name (no gs://) for the workdir and data   (run)
  DATA_DIR           TFDS data dir; default gs://$BUCKET/tensorflow_datasets (run)
  PYTHON             the Python that `setup` installs (apt) and builds the venv
                     ~/detco_venv with; default python3.11 (the image's own
                     python3 is 3.10, for which jax stops at 0.6)
  STOP_WAIT          seconds `stop` waits for the checkpoint; default 300
  JOB                the module `run` starts; default detco_jax.main (run)
  LOG_DIR            directory for the log and pid file on each worker; default
                     /tmp (logs: LOG_DIR/detco_worker_HOSTNAME.log)

Example (a v4-32 slice: 16 chips, 4 workers):
  export TPU_NAME=detco-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 BUCKET=my-bucket
  launch/tpu_vm.sh create
  launch/tpu_vm.sh setup
  launch/tpu_vm.sh run --config=configs/detco.py:batch=1024
  launch/tpu_vm.sh logs
  launch/tpu_vm.sh stop      # checkpoint and exit; `run` again resumes
  launch/tpu_vm.sh delete
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 1
}

info() {
  echo "tpu_vm.sh: $*" >&2
}

# Fails with the variable's name and what it is for, e.g.
#   require TPU_NAME "the TPU VM's name"
require() {
  if [ -z "${!1:-}" ]; then
    die "$1 is not set: export $1=... ($2). See launch/tpu_vm.sh --help."
  fi
}

# Prints one word so that a shell reads it back unchanged (like Python's
# shlex.quote): as is when it is plain, else in single quotes.
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Prints a whole command line, each word quoted.
quote_all() {
  local out="" word
  for word in "$@"; do
    out="$out${out:+ }$(quote "$word")"
  done
  printf '%s\n' "$out"
}

# Runs a command, or prints it under --dry-run.
run_cmd() {
  if [ "$DRY_RUN" = 1 ]; then
    quote_all "$@"
  else
    "$@"
  fi
}

# `gcloud compute tpus tpu-vm SUB ARGS... --zone=... [--project=...]`.
tpu_gcloud() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  if [ -n "${PROJECT:-}" ]; then
    cmd+=("--project=$PROJECT")
  fi
  run_cmd "${cmd[@]}"
}

# ---- Parse: pull --dry-run and -h/--help out from anywhere; keep the rest.
DRY_RUN=${DRY_RUN:-0}
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
if [ "${#ARGS[@]}" -eq 0 ]; then
  usage >&2
  exit 2
fi
COMMAND=${ARGS[0]}
ARGS=("${ARGS[@]:1}")

RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PYTHON=${PYTHON:-python3.11}
[[ $PYTHON =~ ^python3(\.[0-9]+)?$ ]] ||
  die "PYTHON must name an apt-installable python, e.g. python3.11 or python3; got '$PYTHON'"
STOP_WAIT=${STOP_WAIT:-300}
# On every worker, relative to the home directory (where ssh starts).
REMOTE_DIR=detco_jax
REMOTE_VENV=detco_venv
# The venv's Python, as seen from inside $REMOTE_DIR (where jobs start).
REMOTE_PYTHON=../$REMOTE_VENV/bin/python
# The log and pid file on each worker. The log name holds the hostname
# (expanded there, hence the single quotes) so that logs gathered from
# several workers stay apart.
LOG_DIR=${LOG_DIR:-/tmp}
[[ $LOG_DIR =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]] ||
  die "LOG_DIR must be a plain path (letters, digits, ._-/~), got '$LOG_DIR'"
PID_FILE=$LOG_DIR/detco_train.pid
# shellcheck disable=SC2016
REMOTE_LOG=$LOG_DIR/'detco_worker_$(hostname).log'
# Where the packed checkout lands on each worker (`setup` without REPO_URL).
REMOTE_TARBALL=/tmp/detco_jax_src.tar.gz
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

case "$COMMAND" in
  create | setup | run | logs | stop | delete) ;;
  *) die "unknown command '$COMMAND' (expected create, setup, run, logs, stop or delete; see --help)" ;;
esac
require TPU_NAME "the TPU VM's name"
require ZONE "the TPU's zone, e.g. us-central2-b"
if [ "$DRY_RUN" != 1 ] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud CLI, or use --dry-run to print the commands"
fi

cmd_create() {
  require ACCELERATOR_TYPE "the slice, e.g. v4-8 or v4-32"
  local flags=("--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
  if [ "${SPOT:-0}" = 1 ]; then
    # Spot VMs are preempted with a SIGTERM first; the job checkpoints then.
    flags+=(--spot)
  fi
  tpu_gcloud create "$TPU_NAME" "${flags[@]}"
}

# Packs the files git tracks or would track (not .git, venvs or workdirs,
# which .gitignore lists) into the tarball $1: one small transfer per worker
# instead of a recursive copy of everything in the checkout.
pack_checkout() {
  local tarball=$1 path
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout: set REPO_URL to install from git instead"
  (
    cd "$REPO_ROOT"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' path; do
        # Tracked files deleted in the working tree are listed but absent.
        if [ -e "$path" ]; then printf '%s\0' "$path"; fi
      done |
      tar --null -T - -czf "$tarball"
  )
}

cmd_setup() {
  local fetch
  if [ -n "${REPO_URL:-}" ]; then
    local ref=${REPO_REF:-origin/HEAD}
    fetch="if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch --quiet origin; else git clone --quiet $(quote "$REPO_URL") $REMOTE_DIR; fi; git -C $REMOTE_DIR checkout --quiet --detach $(quote "$ref")"
  else
    local tarball
    if [ "$DRY_RUN" = 1 ]; then
      tarball=$REMOTE_TARBALL
      echo "# pack the checkout: (cd $(quote "$REPO_ROOT") && git ls-files -z -co --exclude-standard | tar --null -T - -czf $tarball)"
    else
      PACK_DIR=$(mktemp -d)
      trap 'rm -rf "$PACK_DIR"' EXIT
      tarball=$PACK_DIR/detco_jax_src.tar.gz
      info "packing $REPO_ROOT"
      pack_checkout "$tarball"
    fi
    tpu_gcloud scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
    # A fresh directory each time, so files deleted here go there too.
    fetch="rm -rf $REMOTE_DIR.new && mkdir $REMOTE_DIR.new && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR.new && rm -rf $REMOTE_DIR && mv $REMOTE_DIR.new $REMOTE_DIR"
  fi
  # Our own venv keeps the image's Python packages out of the way; the
  # `-venv` package brings that Python and its ensurepip. Fresh VMs run
  # unattended upgrades at boot, hence the wait for apt's lock. The [tpu]
  # extra pulls jax[tpu] with libtpu; editable, so the checkout's code and
  # configs/ are what runs.
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq"
  tpu_gcloud ssh "$TPU_NAME" --worker=all \
    "--command=set -e; $apt update; $apt install -y $PYTHON-venv git; $fetch; $PYTHON -m venv $REMOTE_VENV; cd $REMOTE_DIR; $REMOTE_PYTHON -m pip install --quiet --upgrade pip; $REMOTE_PYTHON -m pip install --quiet -e '.[tpu]'; $REMOTE_PYTHON -c 'import jax, detco_jax; print(\"jax\", jax.__version__)'"
}

cmd_run() {
  local job=${JOB:-detco_jax.main}
  local config="" workdir="" distributed="" flags=() arg
  # Take --config and --workdir (as --flag=value or --flag value) out of the
  # flags to apply the defaults; everything else goes through unchanged.
  while [ "${#ARGS[@]}" -gt 0 ]; do
    arg=${ARGS[0]}
    ARGS=("${ARGS[@]:1}")
    case "$arg" in
      --config=*) config=${arg#--config=} ;;
      --workdir=*) workdir=${arg#--workdir=} ;;
      --config | --workdir)
        [ "${#ARGS[@]}" -gt 0 ] || die "$arg needs a value"
        if [ "$arg" = --config ]; then config=${ARGS[0]}; else workdir=${ARGS[0]}; fi
        ARGS=("${ARGS[@]:1}")
        ;;
      --distributed=*) distributed=$arg; flags+=("$arg") ;;
      *) flags+=("$arg") ;;
    esac
  done
  if [ -z "$workdir" ] || [ -z "${DATA_DIR:-}" ]; then
    require BUCKET "the GCS bucket for the workdir and TFDS data, without gs://"
  fi
  if [ "$job" != detco_jax.main ] && [ -z "$workdir" ]; then
    die "JOB=$job needs its own --workdir=gs://... (the default is the pretraining run's)"
  fi
  workdir=${workdir:-gs://$BUCKET/detco_jax/$TPU_NAME}
  # Pretraining's default config; other jobs take theirs on the command line
  # (the suite takes none).
  if [ -z "$config" ] && [ "$job" = detco_jax.main ]; then
    config=configs/detco.py
  fi
  local data_dir=${DATA_DIR:-gs://$BUCKET/tensorflow_datasets}
  case "$workdir" in
    gs://*) ;;
    *) die "the workdir must be on GCS (gs://...), shared by all workers and kept after delete; got '$workdir'" ;;
  esac
  # Explicit, though --distributed=auto finds the TPU too: JAX's own TPU
  # detection reads the slice's hosts from the VM metadata, on one host too.
  local main_args=("--workdir=$workdir")
  if [ -n "$config" ]; then
    main_args=("--config=$config" "${main_args[@]}")
  fi
  if [ -z "$distributed" ]; then
    main_args=(--distributed=on "${main_args[@]}")
  fi
  # (`${a[@]+"${a[@]}"}` expands an empty array under bash 3.2's set -u.)
  main_args+=(${flags[@]+"${flags[@]}"})

  # One line for the remote shell. `set --` holds the command so that it is
  # quoted once, logged as run, and started with "$@". It runs under nohup
  # with all three streams redirected, so ssh returns and the job outlives
  # the session; its pid goes to $PID_FILE for `stop` (`$!` is python itself:
  # nohup execs it).
  local remote
  remote="cd $REMOTE_DIR || exit 1; if [ -f $PID_FILE ] && kill -0 \"\$(cat $PID_FILE)\" 2>/dev/null; then echo \"\$(hostname): training already running (pid \$(cat $PID_FILE)); run stop first\" >&2; exit 1; fi; export TFDS_DATA_DIR=$(quote "$data_dir"); set -- $(quote_all "$REMOTE_PYTHON" -m "$job" "${main_args[@]}"); echo \"==== \$(date -u +%FT%TZ) TFDS_DATA_DIR=\$TFDS_DATA_DIR \$*\" >> $REMOTE_LOG; nohup \"\$@\" >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $PID_FILE; echo \"\$(hostname): started pid \$!, log $REMOTE_LOG\""
  tpu_gcloud ssh "$TPU_NAME" --worker=all "--command=$remote"
  if [ "$DRY_RUN" != 1 ]; then
    info "started; follow it with: launch/tpu_vm.sh logs [WORKER]; TensorBoard: tensorboard --logdir $workdir"
  fi
}

cmd_logs() {
  local worker=${ARGS[0]:-0}
  case "$worker" in
    all | [0-9] | [0-9][0-9] | [0-9][0-9][0-9]) ;;
    *) die "logs takes a worker number or 'all', got '$worker'" ;;
  esac
  tpu_gcloud ssh "$TPU_NAME" "--worker=$worker" "--command=tail -n 100 -F $REMOTE_LOG"
}

cmd_stop() {
  case "$STOP_WAIT" in
    '' | *[!0-9]*) die "STOP_WAIT must be a number of seconds, got '$STOP_WAIT'" ;;
  esac
  # SIGTERM makes the job save a checkpoint at the next step boundary and
  # exit. Waiting here means the checkpoint is on GCS when `stop` returns.
  local remote
  remote="pid=\$(cat $PID_FILE 2>/dev/null || true); if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then kill -TERM \"\$pid\"; echo \"\$(hostname): SIGTERM sent to \$pid, waiting for the checkpoint\"; i=0; while kill -0 \"\$pid\" 2>/dev/null && [ \$i -lt $(quote "$STOP_WAIT") ]; do sleep 1; i=\$((i + 1)); done; if kill -0 \"\$pid\" 2>/dev/null; then echo \"\$(hostname): still running after $STOP_WAIT s; see $REMOTE_LOG\"; else echo \"\$(hostname): stopped\"; fi; else echo \"\$(hostname): no training running\"; fi"
  tpu_gcloud ssh "$TPU_NAME" --worker=all "--command=$remote"
}

cmd_delete() {
  # gcloud asks for confirmation: deleting is not undoable (GCS data stays).
  tpu_gcloud delete "$TPU_NAME"
}

"cmd_$COMMAND"
