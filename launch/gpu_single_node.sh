#!/usr/bin/env bash
# DetCo pretraining on all GPUs of one machine.
#
# One JAX process drives every local GPU: the mesh's `data` axis spans them,
# so nothing here starts one process per GPU. Run it from the repository
# root (config paths are relative to it), in the environment where
# detco_jax is installed with the [gpu] extra.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh [--dry-run] --workdir=DIR [--config=FILE[:variant]] [FLAGS...]

Runs `python -m detco_jax.main` once, on all GPUs of this machine. Every
argument goes to detco_jax.main: --config (default configs/detco.py),
--workdir (required; running again with the same workdir resumes) and
--config.key=value overrides.

Options:
  --dry-run     print the command instead of running it (same as DRY_RUN=1)
  -h, --help    show this text

Environment:
  CONFIG, WORKDIR                 defaults for --config and --workdir
  PYTHON                          Python to run; default python
  CUDA_VISIBLE_DEVICES            restrict the GPUs used (default: all)
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX reserves up front; default 0.9

Example (8 GPUs, batch 256 = 32 per GPU):
  launch/gpu_single_node.sh --config=configs/detco.py --workdir=runs/detco_r50
EOF
}

die() {
  echo "gpu_single_node.sh: error: $*" >&2
  exit 1
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

DRY_RUN=${DRY_RUN:-0}
CONFIG=${CONFIG:-configs/detco.py}
WORKDIR=${WORKDIR:-}
PYTHON=${PYTHON:-python}
FLAGS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --config=*) CONFIG=${1#--config=} ;;
    --workdir=*) WORKDIR=${1#--workdir=} ;;
    --config | --workdir)
      [ "$#" -ge 2 ] || die "$1 needs a value"
      if [ "$1" = --config ]; then CONFIG=$2; else WORKDIR=$2; fi
      shift
      ;;
    *) FLAGS+=("$1") ;;
  esac
  shift
done
[ -n "$WORKDIR" ] ||
  die "no workdir: pass --workdir=DIR (or set WORKDIR); see --help"

# JAX preallocates 75% of each GPU by default. Nothing else shares these GPUs
# (tf.data decodes on the host), so give XLA more room for the ResNet-50
# activations of 20 images per sample; keep what the caller set.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# --distributed=off: one process owns all local GPUs, even inside a SLURM
# allocation whose task count would make --distributed=auto start a cluster.
CMD=("$PYTHON" -m detco_jax.main --distributed=off "--config=$CONFIG"
     "--workdir=$WORKDIR" ${FLAGS[@]+"${FLAGS[@]}"})

if [ "$DRY_RUN" = 1 ]; then
  line="XLA_PYTHON_CLIENT_MEM_FRACTION=$(quote "$XLA_PYTHON_CLIENT_MEM_FRACTION")"
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    line="$line CUDA_VISIBLE_DEVICES=$(quote "$CUDA_VISIBLE_DEVICES")"
  fi
  for word in "${CMD[@]}"; do
    line="$line $(quote "$word")"
  done
  printf '%s\n' "$line"
  exit 0
fi
# exec: the job is this process, so a SIGTERM (from a scheduler, `kill`,
# `timeout`) reaches it directly and it checkpoints before exiting.
exec "${CMD[@]}"
