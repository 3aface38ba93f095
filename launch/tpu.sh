#!/usr/bin/env bash
# nfjax on a Cloud TPU VM: create it, set up every worker, run the pipeline on all of them with
# --distributed, copy the results back, delete it. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [OPTIONS] COMMAND [-- EXTRA LAUNCHER FLAGS]

Commands:
  create      create the TPU VM: on-demand, spot, or through a queued resource (--mode);
              a VM (or queued resource) of that name that exists already is reused
  bootstrap   set up every worker (--worker=all), idempotently: Python >= 3.11 virtualenv,
              this checkout (or --repo), pip install -e ~/nfjax[tpu] (the tpu extra: jax[tpu]
              within pyproject.toml's jax range)
  run         run `python -m nfjax.main ... --distributed` on every worker at once
  fetch       copy worker 0's workdir back: to --bucket (gcloud storage rsync) and to --local-dir
  delete      delete the TPU VM (with --mode=queued: the queued resource and its VM)
  status      describe the TPU VM (or queued resource)
  all         create, bootstrap, run, fetch, delete. The VM is deleted however the steps end
              (a failed step, Ctrl-C, kill), unless --keep is given.

Options (each has an environment variable; flags win):
  --project ID            NFJAX_PROJECT           GCP project (default: gcloud's configured one)
  --zone ZONE             NFJAX_ZONE              default us-central2-b
  --accelerator-type T    NFJAX_ACCELERATOR_TYPE  default v4-8 (one host, 4 chips)
  --version V             NFJAX_RUNTIME_VERSION   TPU software version; default tpu-ubuntu2204-base
                                                  (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                                                  v6e: v2-alpha-tpuv6e)
  --name NAME             NFJAX_TPU_NAME          TPU VM name; default nfjax-$USER
  --mode MODE             NFJAX_MODE              on-demand (default) | spot | queued
  --spot                                          with --mode=queued: ask for spot capacity
  --valid-until DURATION  NFJAX_VALID_UNTIL       with --mode=queued: give up after e.g. 6h
  --queue-timeout SECS    NFJAX_QUEUE_TIMEOUT     with --mode=queued: how long `create` waits for
                                                  ACTIVE (default 21600)
  --repo URL              NFJAX_REPO              clone this git repository on the workers instead
                                                  of copying this checkout
  --ref REF               NFJAX_REF               branch/tag/commit of --repo (default HEAD)
  --config SPEC           NFJAX_CONFIG            default configs/mnist.py:parity
  --workdir DIR           NFJAX_WORKDIR           on the workers; a local path (default
                                                  ~/nfjax_runs/RUN). Not gs:// -- see --bucket.
  --stages LIST           NFJAX_STAGES            default all
  --run-name RUN          NFJAX_RUN               default <preset>
  --bucket gs://B/PATH    NFJAX_BUCKET            after the run, worker 0 syncs the workdir to
                                                  gs://B/PATH/RUN and fetch reads it from there
  --local-dir DIR         NFJAX_LOCAL_DIR         where fetch puts the results (default workdirs/tpu)
  --keep                                          `all`: do not delete the VM at the end
  --dry-run               NFJAX_DRY_RUN=1         print the commands instead of running them
  -h, --help

Anything after `--` goes to nfjax.main, e.g. -- --config.train.steps=1000

Examples:
  launch/tpu.sh --project=my-proj --bucket=gs://my-bucket/nfjax all
  launch/tpu.sh --mode=queued --spot --accelerator-type=v5litepod-8 \
      --version=v2-alpha-tpuv5-lite --zone=us-west4-a create
  launch/tpu.sh --dry-run all          # show every gcloud command, run nothing
EOF
}

PROJECT=${NFJAX_PROJECT:-}
ZONE=${NFJAX_ZONE:-us-central2-b}
ACCEL=${NFJAX_ACCELERATOR_TYPE:-v4-8}
RUNTIME=${NFJAX_RUNTIME_VERSION:-tpu-ubuntu2204-base}
NAME=${NFJAX_TPU_NAME:-nfjax-${USER:-user}}
MODE=${NFJAX_MODE:-on-demand}
QUEUED_SPOT=0
VALID_UNTIL=${NFJAX_VALID_UNTIL:-}
QUEUE_TIMEOUT=${NFJAX_QUEUE_TIMEOUT:-21600}
REPO=${NFJAX_REPO:-}
REF=${NFJAX_REF:-HEAD}
CONFIG=${NFJAX_CONFIG:-configs/mnist.py:parity}
WORKDIR=${NFJAX_WORKDIR:-}
STAGES=${NFJAX_STAGES:-all}
RUN_NAME=${NFJAX_RUN:-}
BUCKET=${NFJAX_BUCKET:-}
LOCAL_DIR=${NFJAX_LOCAL_DIR:-workdirs/tpu}
KEEP=0
DRY_RUN=${NFJAX_DRY_RUN:-0}
COMMAND=''
EXTRA=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --*=*) flag=${1%%=*}; val=${1#*=}; shift; set -- "$flag" "$val" "$@"; continue;;
  esac
  case $1 in
    --project) need "$@"; PROJECT=$2; shift 2;;
    --zone) need "$@"; ZONE=$2; shift 2;;
    --accelerator-type) need "$@"; ACCEL=$2; shift 2;;
    --version|--runtime-version) need "$@"; RUNTIME=$2; shift 2;;
    --name) need "$@"; NAME=$2; shift 2;;
    --mode) need "$@"; MODE=$2; shift 2;;
    --spot) QUEUED_SPOT=1; shift;;
    --valid-until) need "$@"; VALID_UNTIL=$2; shift 2;;
    --queue-timeout) need "$@"; QUEUE_TIMEOUT=$2; shift 2;;
    --repo) need "$@"; REPO=$2; shift 2;;
    --ref) need "$@"; REF=$2; shift 2;;
    --config) need "$@"; CONFIG=$2; shift 2;;
    --workdir) need "$@"; WORKDIR=$2; shift 2;;
    --stages) need "$@"; STAGES=$2; shift 2;;
    --run-name) need "$@"; RUN_NAME=$2; shift 2;;
    --bucket) need "$@"; BUCKET=${2%/}; shift 2;;
    --local-dir) need "$@"; LOCAL_DIR=$2; shift 2;;
    --keep) KEEP=1; shift;;
    --dry-run) DRY_RUN=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; EXTRA=("$@"); break;;
    -*) usage >&2; die "unknown option $1";;
    *) [[ -z $COMMAND ]] || die "one command at a time (got $COMMAND and $1)"; COMMAND=$1; shift;;
  esac
done
[[ -n $COMMAND ]] || { usage >&2; die "no command given"; }
case $MODE in on-demand|spot|queued) ;; *) die "--mode=$MODE: use on-demand, spot or queued";; esac
[[ $QUEUED_SPOT == 0 || $MODE == queued ]] || die "--spot goes with --mode=queued (use --mode=spot for a spot VM)"
[[ -z $VALID_UNTIL || $MODE == queued ]] || die "--valid-until goes with --mode=queued"
check_bucket "$BUCKET"
RUN_NAME=${RUN_NAME:-$(preset_of "$CONFIG")}
WORKDIR=${WORKDIR:-"~/nfjax_runs/$RUN_NAME"}
check_local_workdir "$WORKDIR"
QR_NAME="$NAME-qr"
export DRY_RUN

LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")
DESCRIBE_VM=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}")
DESCRIBE_QR=(gcloud compute tpus queued-resources describe "$QR_NAME" "${LOC[@]}")
# With --bucket the workers write to Cloud Storage with the VM's service account.
SCOPES=https://www.googleapis.com/auth/cloud-platform

# A workdir on the workers as the remote shell should see it: ~ and relative paths are in the
# worker's home directory ($HOME), also after the launch command's `cd ~/nfjax`.
remote_path() {
  local p=$1
  if [[ $p == '~' ]]; then printf '"$HOME"'
  elif [[ $p == '~/'* ]]; then printf '"$HOME"/%s' "$(shquote "${p#\~/}")"
  elif [[ $p == /* ]]; then shquote "$p"
  else printf '"$HOME"/%s' "$(shquote "$p")"; fi
}
# The same path for scp, whose relative paths are relative to the remote home.
scp_path() { local p=$1; [[ $p == '~/'* ]] && p=${p#\~/}; printf '%s' "$p"; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
ssh_0() { run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=0 --command="$1"; }

cmd_create() {
  note "create: $MODE TPU VM $NAME ($ACCEL, $RUNTIME) in $ZONE"
  # Idempotent: a VM (or queued resource) of this name that already exists is reused as it is.
  if [[ $MODE == queued ]]; then
    local args=(gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$NAME" "${LOC[@]}"
                --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    [[ $QUEUED_SPOT == 0 ]] || args+=(--spot)
    [[ -z $VALID_UNTIL ]] || args+=(--valid-until-duration="$VALID_UNTIL")
    [[ -z $BUCKET ]] || args+=(--scopes="$SCOPES")
    unless_exists "${DESCRIBE_QR[@]}" -- "${args[@]}"
    wait_active
  else
    local args=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
                --accelerator-type="$ACCEL" --version="$RUNTIME")
    [[ $MODE != spot ]] || args+=(--spot)
    [[ -z $BUCKET ]] || args+=(--scopes="$SCOPES")
    unless_exists "${DESCRIBE_VM[@]}" -- "${args[@]}"
  fi
}

# unless_exists DESCRIBE... -- CREATE...: run CREATE unless DESCRIBE succeeds (the resource exists).
unless_exists() {
  local describe=()
  while [[ $1 != -- ]]; do describe+=("$1"); shift; done
  shift
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(cmdline "${describe[@]}") >/dev/null 2>&1 || $(cmdline "$@")"
  elif "${describe[@]}" >/dev/null 2>&1; then
    note "$NAME already exists: reusing it (delete it first for a fresh one)"
  else
    run "$@"
  fi
}

# Poll the queued resource until it is ACTIVE (the VM exists); fail on FAILED/SUSPENDED.
wait_active() {
  local describe=("${DESCRIBE_QR[@]}" --format='value(state.state)')
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(cmdline "${describe[@]}")    # repeated every 60s until ACTIVE (at most ${QUEUE_TIMEOUT}s)"
    return
  fi
  local waited=0 state
  while true; do
    state=$("${describe[@]}" 2>/dev/null || echo UNKNOWN)
    note "queued resource $QR_NAME: $state (${waited}s)"
    case $state in
      ACTIVE) return 0;;
      FAILED|SUSPENDED|SUSPENDING) die "queued resource $QR_NAME is $state; see: $(cmdline "${DESCRIBE_QR[@]}")";;
    esac
    (( waited < QUEUE_TIMEOUT )) || die "queued resource $QR_NAME not ACTIVE after ${QUEUE_TIMEOUT}s (still queued; delete it with: launch/tpu.sh --mode=queued delete)"
    sleep 60; waited=$((waited + 60))
  done
}

cmd_bootstrap() {
  note "bootstrap: every worker of $NAME (source, Python venv, nfjax[tpu]); a no-op where done"
  local setup_args remote
  run gcloud compute tpus tpu-vm scp "$NFJAX_ROOT/launch/tpu_worker_setup.sh" "$NAME:nfjax_worker_setup.sh" \
      "${LOC[@]}" --worker=all
  if [[ -n $REPO ]]; then
    setup_args=(--repo "$REPO" --ref "$REF")
  else
    # This checkout as it is on disk (uncommitted changes included), without VCS data and builds.
    local tarball="${TMPDIR:-/tmp}/nfjax-src-$NAME.tgz"
    run tar -czf "$tarball" -C "$NFJAX_ROOT" --exclude=./.git --exclude=./.venv --exclude=./workdirs \
        --exclude=./tmp --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=./.benchmarks .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:nfjax-src.tgz" "${LOC[@]}" --worker=all
    setup_args=(--tarball nfjax-src.tgz)
  fi
  remote="bash nfjax_worker_setup.sh $(cmdline "${setup_args[@]}" --extras tpu)"
  ssh_all "$remote"
}

cmd_run() {
  note "run: nfjax.main --distributed on every worker of $NAME, workdir $WORKDIR"
  local launcher remote
  launcher=(-m nfjax.main --config="$CONFIG" --stages="$STAGES" --distributed)
  remote="cd ~/nfjax && mkdir -p $(remote_path "$WORKDIR") && ~/nfjax-venv/bin/python $(cmdline "${launcher[@]}")"
  # JAX's compilation cache in the workdir (a re-run or resumption skips compiling); after it, the
  # user's flags, so `-- --compile_cache=` turns it off.
  remote+=" --compile_cache=$(remote_path "$WORKDIR")/jax_cache"
  [[ ${#EXTRA[@]} -eq 0 ]] || remote+=" $(cmdline "${EXTRA[@]}")"
  remote+=" --workdir=$(remote_path "$WORKDIR") 2>&1 | tee -a $(remote_path "$WORKDIR")/launch.log"
  ssh_all "set -o pipefail; $remote"
}

cmd_fetch() {
  note "fetch: worker 0's $WORKDIR -> ${BUCKET:+$BUCKET/$RUN_NAME -> }$LOCAL_DIR/$RUN_NAME"
  mkdir_local() { if [[ $DRY_RUN == 1 ]]; then echo "$(cmdline mkdir -p "$1")"; else mkdir -p "$1"; fi; }
  mkdir_local "$LOCAL_DIR/$RUN_NAME"
  if [[ -n $BUCKET ]]; then
    # Worker 0 holds what process 0 wrote (logs, metrics, summaries, pictures).
    ssh_0 "gcloud storage rsync --recursive $(remote_path "$WORKDIR") $(shquote "$BUCKET/$RUN_NAME")" || return
    run gcloud storage rsync --recursive "$BUCKET/$RUN_NAME" "$LOCAL_DIR/$RUN_NAME"
  else
    run gcloud compute tpus tpu-vm scp --recurse "$NAME:$(scp_path "$WORKDIR")/*" "$LOCAL_DIR/$RUN_NAME/" \
        "${LOC[@]}" --worker=0
  fi
}

cmd_delete() {
  if [[ $MODE == queued ]]; then note "delete: queued resource $QR_NAME and its VM $NAME"; else note "delete: $NAME"; fi
  if [[ $MODE == queued ]]; then
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

cmd_status() {
  if [[ $MODE == queued ]]; then run "${DESCRIBE_QR[@]}"; else run "${DESCRIBE_VM[@]}"; fi
}

cmd_all() {
  local rc=0
  if [[ $KEEP == 0 ]]; then
    # From the create request on, the VM costs money: delete it however the next steps end
    # (a failed step, Ctrl-C, kill). --keep leaves it for `launch/tpu.sh delete`.
    trap 'rc=$?; trap - EXIT; cmd_delete || note "delete FAILED: delete $NAME by hand"; exit $rc' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
  fi
  cmd_create
  cmd_bootstrap
  cmd_run || rc=$?
  if ! cmd_fetch; then note "fetch failed"; [[ $rc != 0 ]] || rc=1; fi
  [[ $rc == 0 ]] || note "the run exited with status $rc"
  return "$rc"
}

if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); --dry-run prints the commands without it"
fi
case $COMMAND in
  create) cmd_create;;
  bootstrap) cmd_bootstrap;;
  run) cmd_run;;
  fetch) cmd_fetch;;
  delete) cmd_delete;;
  status) cmd_status;;
  all) cmd_all;;
  *) usage >&2; die "unknown command $COMMAND";;
esac
