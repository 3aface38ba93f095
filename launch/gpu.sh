#!/usr/bin/env bash
# nfjax on one machine with one or more NVIDIA GPUs: make sure JAX sees the GPUs (installing
# nfjax[cuda12], i.e. nfjax with jax[cuda12] in the project's jax range, into the virtualenv when
# it does not), set the XLA flags that matter, run the launcher. One process drives every local GPU: the mesh's data axis (-1) fills them, so no
# --distributed is needed. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [OPTIONS] [-- EXTRA LAUNCHER FLAGS]

Options (each has an environment variable; flags win):
  --config SPEC        NFJAX_CONFIG         default configs/mnist.py:parity
  --workdir DIR        NFJAX_WORKDIR        default workdirs/<preset>; a local path, or
                                            gs://BUCKET/PATH (installs nfjax[cuda12,gcs])
  --stages LIST        NFJAX_STAGES         default all
  --venv DIR           NFJAX_VENV           virtualenv to use, created when missing (default .venv);
                                            --venv=none uses the python3 on PATH as it is
  --no-install         NFJAX_NO_INSTALL=1   never pip install; fail if JAX sees no GPU or
                                            nfjax is not installed
  --gpus LIST          NFJAX_GPUS           e.g. 0,1: the GPUs to use (CUDA_VISIBLE_DEVICES);
                                            default: every GPU JAX sees
  --mem-fraction F     NFJAX_MEM_FRACTION   share of each GPU's memory JAX preallocates
                                            (XLA_CLIENT_MEM_FRACTION; default: its value in the
                                            environment, else 0.90; JAX's own default is 0.75)
  --no-xla-flags       NFJAX_NO_XLA_FLAGS=1 leave XLA_FLAGS as they are
  --bucket gs://B/P    NFJAX_BUCKET         with a local workdir: after the run, gcloud storage
                                            rsync it to gs://B/P/<run>
  --dry-run            NFJAX_DRY_RUN=1      print the environment and commands, run nothing
  -h, --help

XLA flags added to XLA_FLAGS (unless already set there):
  --xla_gpu_enable_latency_hiding_scheduler=true  overlap collectives (the train step's gradient
                                                  all-reduce across GPUs) with compute
  --xla_gpu_triton_gemm_any=true                  Triton GEMMs for every matmul they support,
                                                  fused with their neighbours (the fit stage is
                                                  thousands of 16x16 matmuls)

Anything after `--` goes to nfjax.main, e.g. -- --config.train.steps=1000
Example: launch/gpu.sh --config=configs/mnist.py:parity --workdir=/scratch/parity
It runs in the foreground; to survive a dropped ssh connection start it under tmux/screen or
  nohup launch/gpu.sh ... > gpu.log 2>&1 &     (the same command again resumes the run)
EOF
}

CONFIG=${NFJAX_CONFIG:-configs/mnist.py:parity}
WORKDIR=${NFJAX_WORKDIR:-}
STAGES=${NFJAX_STAGES:-all}
VENV=${NFJAX_VENV:-$NFJAX_ROOT/.venv}
NO_INSTALL=${NFJAX_NO_INSTALL:-0}
GPUS=${NFJAX_GPUS:-}
MEM_FRACTION=${NFJAX_MEM_FRACTION:-${XLA_CLIENT_MEM_FRACTION:-0.90}}
NO_XLA_FLAGS=${NFJAX_NO_XLA_FLAGS:-0}
BUCKET=${NFJAX_BUCKET:-}
DRY_RUN=${NFJAX_DRY_RUN:-0}
EXTRA=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --*=*) flag=${1%%=*}; val=${1#*=}; shift; set -- "$flag" "$val" "$@"; continue;;
  esac
  case $1 in
    --config) need "$@"; CONFIG=$2; shift 2;;
    --workdir) need "$@"; WORKDIR=$2; shift 2;;
    --stages) need "$@"; STAGES=$2; shift 2;;
    --venv) need "$@"; VENV=$2; shift 2;;
    --no-install) NO_INSTALL=1; shift;;
    --gpus) need "$@"; GPUS=$2; shift 2;;
    --mem-fraction) need "$@"; MEM_FRACTION=$2; shift 2;;
    --no-xla-flags) NO_XLA_FLAGS=1; shift;;
    --bucket) need "$@"; BUCKET=${2%/}; shift 2;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; EXTRA=("$@"); break;;
    *) usage >&2; die "unknown argument $1";;
  esac
done
RUN_NAME=$(preset_of "$CONFIG")
WORKDIR=${WORKDIR:-workdirs/$RUN_NAME}
WORKDIR=${WORKDIR%/}
check_workdir "$WORKDIR"
check_bucket "$BUCKET" "$WORKDIR"
export DRY_RUN
cd "$NFJAX_ROOT"

# --- the environment -------------------------------------------------------------------------
setenv() {  # setenv NAME VALUE: export it, and show it in --dry-run
  export "$1=$2"
  if [[ $DRY_RUN == 1 ]]; then echo "export $1=$(shquote "$2")"; else note "$1=$2"; fi
}
if [[ $NO_XLA_FLAGS == 0 ]]; then
  flags=${XLA_FLAGS:-}
  for f in --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_triton_gemm_any=true; do
    [[ $flags == *"${f%%=*}"* ]] || flags="${flags:+$flags }$f"
  done
  setenv XLA_FLAGS "$flags"
fi
# jaxlib 0.10 reads XLA_CLIENT_MEM_FRACTION; the older XLA_PYTHON_CLIENT_MEM_FRACTION still works
# but setting both is an error, so a user's old-style setting wins.
if [[ -z ${XLA_PYTHON_CLIENT_MEM_FRACTION:-} ]]; then
  setenv XLA_CLIENT_MEM_FRACTION "$MEM_FRACTION"
fi
[[ -z $GPUS ]] || setenv CUDA_VISIBLE_DEVICES "$GPUS"
note "one process drives every visible GPU: the mesh's data axis (-1) spreads each step over them"

# --- python and nfjax[cuda12] (and [gcs]) ---------------------------------------------------
if [[ $VENV == none ]]; then
  PY=python3
else
  if [[ ! -x $VENV/bin/python ]]; then
    [[ $NO_INSTALL == 0 ]] || die "no virtualenv at $VENV (and --no-install)"
    run python3 -m venv "$VENV"
  fi
  PY=$VENV/bin/python
fi
has_gpu='import jax, sys; sys.exit(0 if any(d.platform == "gpu" for d in jax.devices()) else 1)'
# Installed (with its dependencies), not merely importable from this directory.
has_nfjax='import importlib.metadata as m; m.version("nfjax")'
# One pip call for both: the cuda12 extra of pyproject.toml is jax[cuda12] within its jax range;
# for a gs:// workdir also the gcs extra (gcsfs).
target='.[cuda12]'
if is_gs "$WORKDIR"; then
  has_nfjax+='; m.version("gcsfs")'
  target='.[cuda12,gcs]'
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "$(cmdline "$PY" -c "$has_gpu") && $(cmdline "$PY" -c "$has_nfjax") || $(cmdline "$PY" -m pip install -e "$target")"
else
  gpu_ok=1 nfjax_ok=1
  "$PY" -c "$has_gpu" 2>/dev/null || gpu_ok=0
  "$PY" -c "$has_nfjax" 2>/dev/null || nfjax_ok=0
  if [[ $gpu_ok == 0 || $nfjax_ok == 0 ]]; then
    if [[ $NO_INSTALL == 1 ]]; then
      fix="cd $(shquote "$NFJAX_ROOT") && $(cmdline "$PY" -m pip install -e "$target")"
      [[ $gpu_ok == 1 ]] || die "JAX in $PY sees no GPU (and --no-install); to install nfjax with JAX for CUDA 12, run: $fix"
      die "nfjax is not installed in $PY (and --no-install); to install it, run: $fix"
    fi
    run "$PY" -m pip install --quiet -e "$target"
    "$PY" -c "$has_gpu" || die "JAX still sees no GPU after installing nfjax${target#.}: check the NVIDIA driver (nvidia-smi)"
  fi
  "$PY" -c 'import jax; print("[gpu] jax", jax.__version__, "devices:", ", ".join(f"{d.device_kind} ({d.id})" for d in jax.devices()))'
fi

# --- run -------------------------------------------------------------------------------------
# JAX's compilation cache in the workdir (a re-run or resumption skips compiling); the user's flags come
# after it, so `-- --compile_cache=` turns it off.
run "$PY" -m nfjax.main --config="$CONFIG" --workdir="$WORKDIR" --stages="$STAGES" \
  --compile_cache="$WORKDIR/jax_cache" ${EXTRA[@]+"${EXTRA[@]}"}
if [[ -n $BUCKET ]]; then
  run gcloud storage rsync --recursive "$WORKDIR" "$BUCKET/$RUN_NAME"
fi
