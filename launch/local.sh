#!/usr/bin/env bash
# Start N nfjax processes on this machine as one multi-process run, the way a TPU pod runs one per
# worker: each is `python -m nfjax.main --distributed` with its own --process_id, a coordinator on
# 127.0.0.1 and CPU collectives (gloo) on loopback. For debugging multi-host logic without a pod;
# the tests use it too.
#
#   launch/local.sh [--num_processes=2] [--devices_per_process=1] [--port=P] [--log_dir=DIR]
#                   [--python=PY] [--dry-run] -- <launcher flags: --config=... --workdir=... ...>
#
# Process 0's output is shown here and every process's is in LOG_DIR/process-<i>.log (default: a
# new temporary directory, named at the start). The script waits for all of them; when one fails it
# stops the others (SIGTERM, then SIGKILL after --grace seconds) and exits with the failed one's
# code; it exits 0 only when every process did. A SIGTERM or Ctrl-C to this script is passed on to
# every process (nfjax saves at a safe point and exits 143), then it waits for them.
set -uo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NUM=2
DEVICES=1
PORT=''
LOG_DIR=''
PY=${NFJAX_PYTHON:-python3}
GRACE=10
DRY_RUN=0
FLAGS=()

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --num_processes=*) NUM=${1#*=} ;;
    --devices_per_process=*) DEVICES=${1#*=} ;;
    --port=*) PORT=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --python=*) PY=${1#*=} ;;
    --grace=*) GRACE=${1#*=} ;;
    --dry-run|--dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; FLAGS=("$@"); break ;;
    *) die "unknown option $1 (launcher flags go after --; see --help)" ;;
  esac
  shift
done
[[ $NUM =~ ^[1-9][0-9]*$ ]] || die "--num_processes=$NUM must be a positive integer"
[[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process=$DEVICES must be a positive integer"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace=$GRACE must be a number of seconds"
[[ ${#FLAGS[@]} -gt 0 ]] || die "no launcher flags: give them after --, e.g. -- --config=mnist:smoke --workdir=DIR"
for f in "${FLAGS[@]}"; do
  case $f in
    --distributed|--coordinator_address=*|--num_processes=*|--process_id=*)
      die "$f is set by local.sh for every process; leave it out of the launcher flags" ;;
  esac
done

if [[ -z $PORT ]]; then
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die "could not find a free port with $PY (pass --port=P)"
fi
[[ -n $LOG_DIR ]] || LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nfjax-local.XXXXXX")
mkdir -p "$LOG_DIR" || die "cannot create --log_dir=$LOG_DIR"

command_of() {   # the command line of process $1
  printf '%s\n' "$PY" -m nfjax.main --distributed --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$NUM" --process_id="$1" "${FLAGS[@]}"
}

export JAX_PLATFORMS=cpu
export JAX_COORDINATOR_BIND_ADDRESS="127.0.0.1:$PORT"   # not [::]: loopback only
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES"
export PYTHONUNBUFFERED=1

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < NUM; i++)); do
    mapfile -t cmd < <(command_of "$i")
    echo "$(cmdline "${cmd[@]}") > $(shquote "$LOG_DIR/process-$i.log") 2>&1 &"
  done
  exit 0
fi

note "$NUM processes x $DEVICES CPU device(s), coordinator 127.0.0.1:$PORT, logs in $LOG_DIR"
declare -A PIDS=()   # pid -> process id
for ((i = 0; i < NUM; i++)); do
  mapfile -t cmd < <(command_of "$i")
  if [[ $i == 0 ]]; then
    "${cmd[@]}" > >(tee "$LOG_DIR/process-0.log") 2>&1 &
  else
    "${cmd[@]}" > "$LOG_DIR/process-$i.log" 2>&1 &
  fi
  PIDS[$!]=$i
done

stop_all() {   # SIGTERM every process still running, SIGKILL after the grace period
  local sig=$1 pid waited=0
  for pid in "${!PIDS[@]}"; do kill "-$sig" "$pid" 2>/dev/null; done
  while (( waited < GRACE * 10 )); do
    local alive=0
    for pid in "${!PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 0.1; waited=$((waited + 1))
  done
  for pid in "${!PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'note "signal received: passing SIGTERM to every process"; stop_all TERM; wait; exit 143' TERM INT

status=0
while (( ${#PIDS[@]} > 0 )); do
  done_pid=''
  wait -n -p done_pid "${!PIDS[@]}"
  rc=$?
  [[ -n $done_pid ]] || continue
  i=${PIDS[$done_pid]}
  unset "PIDS[$done_pid]"
  if [[ $rc != 0 ]]; then
    status=$rc
    note "process $i exited with $rc: stopping the other ${#PIDS[@]} (log: $LOG_DIR/process-$i.log)"
    [[ $i == 0 ]] || tail -n 20 "$LOG_DIR/process-$i.log" | sed "s/^/[process $i] /" >&2
    stop_all TERM
    wait 2>/dev/null
    break
  fi
done
(( status == 0 )) && note "all $NUM processes finished (logs in $LOG_DIR)"
exit "$status"
