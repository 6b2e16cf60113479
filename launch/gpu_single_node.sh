#!/usr/bin/env bash
# DetCo pretraining (or another detco_jax job: JOB=...) on all GPUs of one
# machine.
#
# One JAX process drives every local GPU: the mesh's `data` axis spans them,
# so nothing here starts one process per GPU (launch/README.md says why).
# Run it from the repository root (config paths are relative to it), in the
# environment where detco_jax is installed with the [gpu] extra.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_node.sh [--dry-run] --workdir=DIR [--config=FILE[:variant]] [FLAGS...]

Runs `python -m detco_jax.main` (or $JOB) once, on all GPUs of this machine,
with the XLA flags of JAX's GPU performance tips. Every argument goes to the
job: --config (detco_jax.main's default: configs/detco.py), --workdir
(required; running again with the same workdir resumes) and
--config.key=value overrides.

Options:
  --dry-run     print the command instead of running it (same as DRY_RUN=1)
  -h, --help    show this text

Environment:
  CONFIG, WORKDIR                 defaults for --config and --workdir
  JOB                             the module to run; default detco_jax.main,
                                  e.g. detco_jax.benchmark.suite (the
                                  evidence suite: --workdir is its --out)
  PYTHON                          Python to run; default python
  CUDA_VISIBLE_DEVICES            restrict the GPUs used (default: all)
  XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX reserves up front; default 0.9
  XLA_FLAGS                       kept; each flag below is added unless named:
                                    --xla_gpu_enable_latency_hiding_scheduler=true
                                    --xla_gpu_triton_gemm_any=true
  NCCL_PROTO, NCCL_LL_BUFFSIZE,   kept; default SIMPLE,LL,LL128 / -2 / -2
  NCCL_LL128_BUFFSIZE             (single-host values of JAX's GPU tips)

Examples:
  # 8 GPUs, batch 256 = 32 per GPU:
  launch/gpu_single_node.sh --config=configs/detco.py --workdir=runs/detco_r50
  # The evidence suite (about 8 minutes):
  JOB=detco_jax.benchmark.suite launch/gpu_single_node.sh --workdir=suite_out
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
JOB=${JOB:-detco_jax.main}
CONFIG=${CONFIG:-}
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
[[ $JOB =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] ||
  die "JOB must be a module name such as detco_jax.main, got '$JOB'"
# Pretraining's default config; other jobs take theirs on the command line.
if [ -z "$CONFIG" ] && [ "$JOB" = detco_jax.main ]; then
  CONFIG=configs/detco.py
fi

# JAX preallocates 75% of each GPU by default. Nothing else shares these GPUs
# (tf.data decodes on the host), so give XLA more room for the ResNet-50
# activations of 20 images per sample; keep what the caller set.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# The XLA flags JAX's GPU performance tips (docs.jax.dev) recommend for
# training: the latency-hiding scheduler overlaps the gradient all-reduce
# with the backward pass; Triton GEMMs join the autotuner's candidates. Each
# is added unless the caller's XLA_FLAGS names it. detco_jax.benchmark.suite
# records XLA_FLAGS and checks for these (its GPU_XLA_FLAGS; a test keeps
# the two lists equal).
GPU_XLA_FLAGS=(--xla_gpu_enable_latency_hiding_scheduler=true
               --xla_gpu_triton_gemm_any=true)
for flag in "${GPU_XLA_FLAGS[@]}"; do
  case " ${XLA_FLAGS:-} " in
    *" ${flag%%=*}="* | *" ${flag%%=*} "*) ;;
    *) XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" ;;
  esac
done
export XLA_FLAGS
# NCCL settings the same tips give for several GPUs of one host.
export NCCL_PROTO=${NCCL_PROTO:-SIMPLE,LL,LL128}
export NCCL_LL_BUFFSIZE=${NCCL_LL_BUFFSIZE:--2}
export NCCL_LL128_BUFFSIZE=${NCCL_LL128_BUFFSIZE:--2}

# --distributed=off: one process owns all local GPUs, even inside a SLURM
# allocation whose task count would make --distributed=auto start a cluster.
CMD=("$PYTHON" -m "$JOB" --distributed=off)
if [ -n "$CONFIG" ]; then
  CMD+=("--config=$CONFIG")
fi
CMD+=("--workdir=$WORKDIR" ${FLAGS[@]+"${FLAGS[@]}"})

if [ "$DRY_RUN" = 1 ]; then
  line=""
  for name in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS NCCL_PROTO \
      NCCL_LL_BUFFSIZE NCCL_LL128_BUFFSIZE CUDA_VISIBLE_DEVICES; do
    if [ -n "${!name:-}" ]; then
      line="$line${line:+ }$name=$(quote "${!name}")"
    fi
  done
  for word in "${CMD[@]}"; do
    line="$line $(quote "$word")"
  done
  printf '%s\n' "$line"
  exit 0
fi
# exec: the job is this process, so a SIGTERM (from a scheduler, `kill`,
# `timeout`) reaches it directly and it checkpoints before exiting.
exec "${CMD[@]}"
