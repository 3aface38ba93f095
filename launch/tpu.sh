#!/usr/bin/env bash
# nfjax on a Cloud TPU VM: create it, set up every worker, run the pipeline on all of them with
# --distributed (detached: it survives a dropped ssh connection), follow it, copy the results back,
# delete it. See launch/README.md.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [OPTIONS] COMMAND [-- EXTRA LAUNCHER FLAGS]

Commands:
  create      create the TPU VM: on-demand, spot, or through a queued resource (--mode);
              a VM (or queued resource) of that name that exists already is reused
              (re-created when it was preempted: a PREEMPTED/TERMINATED VM, a FAILED/SUSPENDED
              queued resource is deleted first)
  bootstrap   set up every worker (--worker=all), idempotently: Python >= 3.11 virtualenv,
              this checkout (or --repo), pip install -e ~/nfjax[tpu,gcs] (jax[tpu] within
              pyproject.toml's jax range, gcsfs for gs:// workdirs); copies launch/tpu_job.sh
              there as ~/nfjax_job.sh. Left alone on a worker where a job is running.
  run         start `python -m nfjax.main ... --distributed` on every worker at once, detached
              (setsid nohup: a dropped ssh connection does not stop it), its output in
              ~/nfjax_jobs/RUN/worker-N-<time>.log on each worker, copied to WORKDIR/logs/;
              then follow worker 0's log until the job ends and exit with its exit code
              (Ctrl-C stops following, not the job; --detach returns at once). Refused, exit 3,
              where RUN is already running (`all` follows that job instead).
  status      the VM's (and queued resource's) state; per worker: the job running or its exit
              code, and the last progress line of its log
  logs        worker --worker's (default 0) log of the run: the last --lines (default 50);
              --follow: until the job ends, then exit with its exit code
  stop        SIGTERM the job on every worker: nfjax saves at a safe point and exits 143;
              `run` again resumes
  fetch       copy the workdir back to --local-dir: a gs:// workdir from the bucket; else worker
              0's, through --bucket (gcloud storage rsync) or scp
  delete      delete the TPU VM (with --mode=queued: the queued resource and its VM)
  all         create, bootstrap, run, fetch, delete. The VM is deleted however the steps end
              (a failed step, Ctrl-C, kill), unless --keep is given. After a preemption, the
              same command again resumes the run (with a gs:// workdir).

Options (each has an environment variable; flags win):
  --project ID            NFJAX_PROJECT           GCP project (default: gcloud's configured one)
  --zone ZONE             NFJAX_ZONE              default us-central2-b
  --accelerator-type T    NFJAX_ACCELERATOR_TYPE  default v4-8 (one host, 4 chips)
  --version V             NFJAX_RUNTIME_VERSION   TPU software version; default tpu-ubuntu2204-base
                                                  (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                                                  v6e: v2-alpha-tpuv6e)
  --name NAME             NFJAX_TPU_NAME          TPU VM name; default nfjax-$USER
  --mode MODE             NFJAX_MODE              on-demand (default) | spot | queued; spot
                                                  and queued need a gs:// --workdir
  --spot                                          with --mode=queued: ask for spot capacity
  --valid-until DURATION  NFJAX_VALID_UNTIL       with --mode=queued: give up after e.g. 6h
  --queue-timeout SECS    NFJAX_QUEUE_TIMEOUT     with --mode=queued: how long `create` waits for
                                                  ACTIVE (default 21600)
  --repo URL              NFJAX_REPO              clone this git repository on the workers instead
                                                  of copying this checkout
  --ref REF               NFJAX_REF               branch/tag/commit of --repo (default HEAD)
  --config SPEC           NFJAX_CONFIG            default configs/mnist.py:parity
  --workdir DIR|gs://B/P  NFJAX_WORKDIR           gs://BUCKET/PATH (every worker writes
                                                  there; survives the VM), or a path on the
                                                  workers (default ~/nfjax_runs/RUN)
  --allow-local-workdir   NFJAX_ALLOW_LOCAL_WORKDIR=1  let spot/queued use a workdir on the VM's
                                                  disk (lost with the VM when it is preempted)
  --stages LIST           NFJAX_STAGES            default all
  --run-name RUN          NFJAX_RUN               default <preset>
  --bucket gs://B/PATH    NFJAX_BUCKET            with a local workdir: fetch first syncs
                                                  worker 0's workdir to gs://B/PATH/RUN
  --local-dir DIR         NFJAX_LOCAL_DIR         where fetch puts the results (default workdirs/tpu)
  --keep                                          `all`: do not delete the VM at the end
  --detach                NFJAX_DETACH=1          `run`: start the job and return (no following)
  --worker N                                      `logs`: which worker (default 0)
  --lines N                                       `logs`: how many last lines (default 50, or all)
  --follow                                        `logs`: follow until the job ends
  --dry-run               NFJAX_DRY_RUN=1         print the commands instead of running them
  -h, --help

Anything after `--` goes to nfjax.main, e.g. -- --config.train.steps=1000

Examples:
  launch/tpu.sh --project=my-proj --workdir=gs://my-bucket/nfjax/parity all
  launch/tpu.sh --mode=queued --spot --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite \
      --zone=us-west4-a --workdir=gs://my-bucket/nfjax/parity all     # again after a preemption
  launch/tpu.sh --detach run; launch/tpu.sh status; launch/tpu.sh logs --follow
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
ALLOW_LOCAL=${NFJAX_ALLOW_LOCAL_WORKDIR:-0}
DETACH=${NFJAX_DETACH:-0}
WORKER=0
LINES=50
FOLLOW=0
DRY_RUN=${NFJAX_DRY_RUN:-0}
FOLLOW_RETRY_SECS=${NFJAX_FOLLOW_RETRY_SECS:-30}   # wait before following again after a dropped connection
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
    --allow-local-workdir) ALLOW_LOCAL=1; shift;;
    --detach) DETACH=1; shift;;
    --worker) need "$@"; WORKER=$2; shift 2;;
    --lines) need "$@"; LINES=$2; shift 2;;
    --follow) FOLLOW=1; shift;;
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
[[ $DETACH == 0 || $COMMAND == run ]] || die "--detach goes with run (\`all\` follows the job to fetch its results before it deletes the VM)"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker=$WORKER: a worker index (0, 1, ...)"
[[ $LINES == all || $LINES =~ ^[0-9]+$ ]] || die "--lines=$LINES: a number or all"
RUN_NAME=${RUN_NAME:-$(preset_of "$CONFIG")}
[[ $RUN_NAME =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name=$RUN_NAME: letters, digits, _ . - only"
WORKDIR=${WORKDIR%/}
check_workdir "$WORKDIR"
check_bucket "$BUCKET" "$WORKDIR"
# A spot or queued VM can be preempted, and its disk goes with it: the workdir must be in the bucket.
case $COMMAND in create|run|all)
  if [[ $MODE != on-demand && $ALLOW_LOCAL == 0 ]] && ! is_gs "$WORKDIR"; then
    die "--mode=$MODE needs a gs:// workdir (a preempted VM loses its disk, and a local workdir with it): pass --workdir=gs://BUCKET/nfjax/$RUN_NAME, or --allow-local-workdir to keep it on the VM anyway"
  fi;;
esac
WORKDIR=${WORKDIR:-"~/nfjax_runs/$RUN_NAME"}
QR_NAME="$NAME-qr"
export DRY_RUN

LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")
DESCRIBE_VM=(gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}")
DESCRIBE_QR=(gcloud compute tpus queued-resources describe "$QR_NAME" "${LOC[@]}")
# With --bucket or a gs:// workdir the workers write to Cloud Storage with the VM's service account.
SCOPES=https://www.googleapis.com/auth/cloud-platform
[[ -n $BUCKET ]] || is_gs "$WORKDIR" || SCOPES=''
# The worker-side job script (launch/tpu_job.sh, copied there by bootstrap).
JOB="bash ~/nfjax_job.sh"

# A workdir on the workers as the remote shell should see it: ~ and relative paths are in the
# worker's home directory ($HOME), also after the launch command's `cd ~/nfjax`.
remote_path() {
  local p=$1
  if [[ $p == gs://* ]]; then shquote "$p"
  elif [[ $p == '~' ]]; then printf '"$HOME"'
  elif [[ $p == '~/'* ]]; then printf '"$HOME"/%s' "$(shquote "${p#\~/}")"
  elif [[ $p == /* ]]; then shquote "$p"
  else printf '"$HOME"/%s' "$(shquote "$p")"; fi
}
# The same path for scp, whose relative paths are relative to the remote home.
scp_path() { local p=$1; [[ $p == '~/'* ]] && p=${p#\~/}; printf '%s' "$p"; }

ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
ssh_to() { run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"; }
ssh_0() { ssh_to 0 "$1"; }

cmd_create() {
  note "create: $MODE TPU VM $NAME ($ACCEL, $RUNTIME) in $ZONE"
  # Idempotent: a VM (or queued resource) of this name that already exists is reused as it is,
  # unless it was preempted or failed: then it is deleted and created again (the workdir is in the
  # bucket, so the run resumes there).
  if [[ $MODE == queued ]]; then
    local args=(gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$NAME" "${LOC[@]}"
                --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    [[ $QUEUED_SPOT == 0 ]] || args+=(--spot)
    [[ -z $VALID_UNTIL ]] || args+=(--valid-until-duration="$VALID_UNTIL")
    [[ -z $SCOPES ]] || args+=(--scopes="$SCOPES")
    delete_if_dead "queued resource $QR_NAME" 'FAILED SUSPENDING SUSPENDED' \
      "${DESCRIBE_QR[@]}" --format='value(state.state)' -- \
      gcloud compute tpus queued-resources delete "$QR_NAME" "${LOC[@]}" --force --quiet
    unless_exists "${DESCRIBE_QR[@]}" -- "${args[@]}"
    wait_active
  else
    local args=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
                --accelerator-type="$ACCEL" --version="$RUNTIME")
    [[ $MODE != spot ]] || args+=(--spot)
    [[ -z $SCOPES ]] || args+=(--scopes="$SCOPES")
    delete_if_dead "TPU VM $NAME" 'PREEMPTED TERMINATED' "${DESCRIBE_VM[@]}" --format='value(state)' -- \
      gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
    unless_exists "${DESCRIBE_VM[@]}" -- "${args[@]}"
  fi
}

# delete_if_dead WHAT 'STATE...' DESCRIBE... -- DELETE...: run DELETE when DESCRIBE (which prints
# the state) names one of STATES; a resource that does not exist is left to create.
delete_if_dead() {
  local what=$1 dead=$2 describe=() state s
  shift 2
  while [[ $1 != -- ]]; do describe+=("$1"); shift; done
  shift
  if [[ $DRY_RUN == 1 ]]; then
    local grep_args=(grep -qx)
    for s in $dead; do grep_args+=(-e "$s"); done
    echo "$(cmdline "${describe[@]}") 2>/dev/null | $(cmdline "${grep_args[@]}") && $(cmdline "$@")"
    return
  fi
  state=$("${describe[@]}" 2>/dev/null) || return 0
  if [[ " $dead " == *" $state "* ]]; then
    note "$what is $state (preempted or failed): deleting it to create it again"
    run "$@"
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
  note "bootstrap: every worker of $NAME (source, Python venv, nfjax[tpu,gcs], the job script); a no-op where done"
  local setup_args remote
  run gcloud compute tpus tpu-vm scp "$NFJAX_ROOT/launch/tpu_worker_setup.sh" "$NAME:nfjax_worker_setup.sh" \
      "${LOC[@]}" --worker=all
  run gcloud compute tpus tpu-vm scp "$NFJAX_ROOT/launch/tpu_job.sh" "$NAME:nfjax_job.sh" "${LOC[@]}" --worker=all
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
  # The gcs extra (gcsfs) always: a gs:// workdir then works whatever --workdir bootstrap was given.
  remote="bash nfjax_worker_setup.sh $(cmdline "${setup_args[@]}" --extras tpu,gcs)"
  ssh_all "$remote"
}

# The worker-side job script's command for this run: job ACTION [ARGS...].
job() { local a=$1; shift; printf '%s %s --run=%s' "$JOB" "$a" "$RUN_NAME"; [[ $# -eq 0 ]] || printf ' %s' "$(cmdline "$@")"; }

# cmd_run [attach]: start the job on every worker (detached), then follow worker 0's log unless
# --detach. With `attach` (from `all`), a job of this run that is already running is followed
# instead of refused.
cmd_run() {
  note "run: nfjax.main --distributed on every worker of $NAME (detached), workdir $WORKDIR"
  local launcher remote rc=0 wd
  wd=$(remote_path "$WORKDIR")
  launcher=(-m nfjax.main --config="$CONFIG" --stages="$STAGES" --distributed)
  # JAX's compilation cache in the workdir (a re-run or resumption skips compiling); after it, the
  # user's flags, so `-- --compile_cache=` turns it off.
  remote="cd ~/nfjax && $(job start) --copy-log-to=$wd/logs -- ~/nfjax-venv/bin/python $(cmdline "${launcher[@]}")"
  remote+=" --compile_cache=$wd/jax_cache"
  [[ ${#EXTRA[@]} -eq 0 ]] || remote+=" $(cmdline "${EXTRA[@]}")"
  remote+=" --workdir=$wd"
  ssh_all "$remote" || rc=$?
  if [[ $rc == 3 && ${1:-} == attach ]]; then
    note "run $RUN_NAME is already running on $NAME: following it instead of starting another"
  elif [[ $rc == 3 ]]; then
    note "not started: run $RUN_NAME is already running on $NAME (above). Follow it: launch/tpu.sh logs --follow; stop it: launch/tpu.sh stop"
    return 3
  elif [[ $rc != 0 ]]; then
    return "$rc"
  fi
  if [[ $DETACH == 1 ]]; then
    note "detached; the job goes on: launch/tpu.sh status, launch/tpu.sh logs --follow, launch/tpu.sh stop"
    return 0
  fi
  [[ $COMMAND != run ]] || trap 'echo >&2; note "stopped following; the job goes on: launch/tpu.sh status, launch/tpu.sh logs --follow"; exit 130' INT
  follow
}

# Worker 0's log from the start of the job until it ends; the job's exit code. A dropped connection
# (ssh exit 255) is retried while the VM is READY, from the last 20 lines on.
follow() {
  local lines=all tries=0 rc state
  while true; do
    rc=0
    ssh_0 "$(job logs --follow --lines="$lines")" || rc=$?
    [[ $rc == 255 && $DRY_RUN != 1 ]] || return "$rc"
    state=$("${DESCRIBE_VM[@]}" --format='value(state)' 2>/dev/null) || state='gone'
    if [[ $state != READY ]]; then
      note "lost worker 0: TPU VM $NAME is $state (preempted?). With a gs:// workdir, the same command again resumes the run"
      return 255
    fi
    if (( ++tries > 5 )); then
      note "lost the ssh connection to worker 0 $tries times; the job may still run there: launch/tpu.sh status"
      return 255
    fi
    note "lost the ssh connection to worker 0 (the job goes on there); following it again in ${FOLLOW_RETRY_SECS}s ($tries/5)"
    sleep "$FOLLOW_RETRY_SECS"
    lines=20
  done
}

cmd_status() {
  local state
  if [[ $DRY_RUN == 1 ]]; then
    [[ $MODE != queued ]] || echo "$(cmdline "${DESCRIBE_QR[@]}" --format='value(state.state)')"
    echo "$(cmdline "${DESCRIBE_VM[@]}" --format='value(state)')"
    ssh_all "$(job status)"
    return
  fi
  if [[ $MODE == queued ]]; then
    state=$("${DESCRIBE_QR[@]}" --format='value(state.state)' 2>/dev/null) || state='none (or gcloud failed)'
    echo "queued resource $QR_NAME: $state"
  fi
  if ! state=$("${DESCRIBE_VM[@]}" --format='value(state)' 2>/dev/null); then
    echo "TPU VM $NAME: none (or gcloud failed: $(cmdline "${DESCRIBE_VM[@]}"))"
    return 1
  fi
  echo "TPU VM $NAME: $state"
  [[ $state == READY ]] || return 0
  ssh_all "$(job status)"
}

cmd_logs() {
  local args=(--lines="$LINES")
  [[ $FOLLOW == 0 ]] || args+=(--follow)
  ssh_to "$WORKER" "$(job logs "${args[@]}")"
}

cmd_stop() {
  note "stop: SIGTERM to run $RUN_NAME on every worker of $NAME (it saves and exits 143; run resumes it)"
  ssh_all "$(job stop)"
}

cmd_fetch() {
  mkdir_local() { if [[ $DRY_RUN == 1 ]]; then echo "$(cmdline mkdir -p "$1")"; else mkdir -p "$1"; fi; }
  if is_gs "$WORKDIR"; then
    note "fetch: $WORKDIR -> $LOCAL_DIR/$RUN_NAME"
    mkdir_local "$LOCAL_DIR/$RUN_NAME"
    run gcloud storage rsync --recursive "$WORKDIR" "$LOCAL_DIR/$RUN_NAME"
    return
  fi
  note "fetch: worker 0's $WORKDIR -> ${BUCKET:+$BUCKET/$RUN_NAME -> }$LOCAL_DIR/$RUN_NAME"
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
  cmd_run attach || rc=$?
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
  status) cmd_status;;
  logs) cmd_logs;;
  stop) cmd_stop;;
  fetch) cmd_fetch;;
  delete) cmd_delete;;
  all) cmd_all;;
  *) usage >&2; die "unknown command $COMMAND";;
esac
