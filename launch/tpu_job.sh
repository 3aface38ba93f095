#!/usr/bin/env bash
# One detached nfjax job on a TPU VM worker. `launch/tpu.sh bootstrap` copies this file to every
# worker as ~/nfjax_job.sh; `tpu.sh run / status / logs / stop` call it there over ssh. It needs
# nothing but bash, coreutils (GNU tail) and, for a gs:// --copy-log-to, gcloud; it runs the same on
# any Linux machine (the tests run it locally).
#
#   start --run=RUN [--copy-log-to=DEST] -- COMMAND...
#         run COMMAND detached (setsid nohup, stdin /dev/null: it survives the ssh session that
#         started it), in the current directory, its output in ~/nfjax_jobs/RUN/worker-N-<time>[-k].log
#         (worker-N.log links to the latest). Refuses, exit 3, when RUN is already running here.
#         With DEST (a directory or gs:// URL) the log is copied to DEST/ every
#         $NFJAX_LOG_COPY_SECS (60) seconds and when the job ends. When COMMAND ends, its exit code
#         goes to ~/nfjax_jobs/RUN/exit_code.
#   logs --run=RUN [--lines=N|all] [--follow]
#         the last N (default 50) lines of the log; --follow: and the rest as it comes until the job
#         ends, then exit with the job's exit code (1 when it left none: killed, or the VM restarted)
#   status --run=RUN
#         one line (running / exited with CODE / never started here) and the log's last progress line
#   stop --run=RUN
#         SIGTERM to the job's command (nfjax saves at a safe point and exits 143; starting the same
#         command again resumes). The wrapper itself ignores SIGTERM, so a shutdown that signals
#         every process sends the command one SIGTERM, not two (nfjax's second SIGTERM kills at once).
#
# N is this worker's index: $NFJAX_WORKER, else $TPU_WORKER_ID, else the TPU metadata server's
# agent-worker-number (what jax.distributed reads), else the -w-N suffix of the hostname, else 0.
# The state of a run is in $NFJAX_JOBS_DIR (default ~/nfjax_jobs)/RUN: pid (the wrapper),
# child_pid (COMMAND), exit_code, the logs.
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
JOBS=${NFJAX_JOBS_DIR:-$HOME/nfjax_jobs}
COPY_SECS=${NFJAX_LOG_COPY_SECS:-60}

die() { local code=$1; shift; echo "nfjax_job.sh: error: $*" >&2; exit "$code"; }

worker_index() {
  local n=${NFJAX_WORKER:-${TPU_WORKER_ID:-}}
  if [[ -z $n ]] && command -v curl >/dev/null; then
    n=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' \
        http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null) || n=''
  fi
  if [[ ! $n =~ ^[0-9]+$ ]]; then
    if [[ $(hostname) =~ -w-([0-9]+)$ ]]; then n=${BASH_REMATCH[1]}; else n=0; fi
  fi
  printf '%s' "$n"
}

ACTION=${1:-}
[[ -n $ACTION ]] || die 2 "usage: nfjax_job.sh start|logs|status|stop --run=RUN ... (see the top of this file)"
shift
RUN='' DEST='' LINES=50 FOLLOW=0 LOG='' W=''
while [[ $# -gt 0 ]]; do
  case $1 in
    --run=*) RUN=${1#*=};;
    --copy-log-to=*) DEST=${1#*=}; DEST=${DEST%/};;
    --lines=*) LINES=${1#*=};;
    --follow) FOLLOW=1;;
    --log=*) LOG=${1#*=};;          # _job: its log file
    --worker=*) W=${1#*=};;         # _job: the worker index start found
    --) shift; break;;
    *) die 2 "unknown argument $1";;
  esac
  shift
done
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die 2 "--run=$RUN: give a run name of letters, digits, _ . -"
[[ $LINES == all || $LINES =~ ^[0-9]+$ ]] || die 2 "--lines=$LINES: a number or all"
DIR=$JOBS/$RUN
[[ -n $W ]] || W=$(worker_index)

# The wrapper's pid when the job of RUN is running here (its pid file names a live process that is
# this script's wrapper for RUN: a pid reused after a reboot does not count).
running_pid() {
  local pid
  [[ -f $DIR/pid ]] && pid=$(<"$DIR/pid") && [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -r /proc/$pid/cmdline ]] || return 0
  [[ $(tr '\0' ' ' < "/proc/$pid/cmdline") == *" _job --run=$RUN "* ]] || return 1
  printf '%s' "$pid"
}

current_log() { [[ -e $DIR/worker-$W.log ]] && readlink -f "$DIR/worker-$W.log"; }

# The job's exit code once it ended: 1 when it left none (killed, or the machine restarted).
job_code() { if [[ -f $DIR/exit_code ]]; then cat "$DIR/exit_code"; else echo 1; fi; }

# How the job ended, in words.
ended() {
  if [[ -f $DIR/exit_code ]]; then
    case $(job_code) in
      0) echo "finished (exit code 0)";;
      143) echo "stopped by SIGTERM (exit code 143: stopped or preempted; the same run command resumes it)";;
      130) echo "interrupted by SIGINT (exit code 130: Ctrl-C or kill -INT; the same run command resumes it)";;
      *) echo "failed (exit code $(job_code))";;
    esac
  else
    echo "not running, and it left no exit code (killed, or the machine restarted)"
  fi
}

copy_log() {   # the log to DEST/, quietly (errors to DIR/copy-log.err)
  [[ -n $DEST && -f $LOG ]] || return 0
  {
    case $DEST in
      gs://*) gcloud storage cp --quiet "$LOG" "$DEST/$(basename "$LOG")";;
      *) mkdir -p "$DEST" && cp "$LOG" "$DEST/";;
    esac
  } >> "$DIR/copy-log.err" 2>&1 || true
}

case $ACTION in
  start)
    [[ $# -gt 0 ]] || die 2 "start: give the command after --"
    [[ -z $DEST || $DEST == gs://* || $DEST == /* ]] || die 2 "--copy-log-to=$DEST: an absolute path or gs:// URL"
    mkdir -p "$DIR"
    if pid=$(running_pid); then
      die 3 "run $RUN is already running on worker $W (pid $pid, log $(current_log)); follow it with" \
        "launch/tpu.sh logs --follow, stop it with launch/tpu.sh stop"
    fi
    log="$DIR/worker-$W-$(date -u +%Y%m%d-%H%M%S).log"
    k=1; base=${log%.log}
    while [[ -e $log ]]; do k=$((k + 1)); log="$base-$k.log"; done   # a second start within the second keeps the first's log
    rm -f "$DIR/pid" "$DIR/child_pid" "$DIR/exit_code"
    ln -sfn "$(basename "$log")" "$DIR/worker-$W.log"
    setsid nohup bash "$SELF" _job --run="$RUN" --worker="$W" --log="$log" ${DEST:+--copy-log-to="$DEST"} \
      -- "$@" > "$log" 2>&1 < /dev/null &
    for _ in $(seq 100); do [[ -f $DIR/pid ]] && break; sleep 0.1; done   # the wrapper writes its own pid
    [[ -f $DIR/pid ]] || die 1 "the job of run $RUN did not start on worker $W; see $log"
    echo "[worker $W] run $RUN started on $(hostname): pid $(<"$DIR/pid"), log $log"
    ;;

  _job)   # the detached wrapper (start runs it)
    set +e
    echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
    echo "==== nfjax_job.sh: run $RUN on $(hostname) (worker $W), started $(date -u '+%Y-%m-%d %H:%M:%S') UTC in $PWD"
    echo "==== command:$(printf ' %q' "$@")"
    # The wrapper ignores SIGTERM and lives on to record the exit code; the command gets its own
    # SIGTERM (from `stop`, or from a shutdown that signals every process), not a second one passed
    # on. `env --default-signal` gives the command back the default disposition an ignored signal
    # would otherwise pass on; where env lacks it (coreutils < 8.31) the wrapper traps SIGTERM
    # instead (a trapped signal is reset in the command).
    if env --default-signal=TERM true 2>/dev/null; then
      trap '' TERM
      launch=(env --default-signal=TERM)
    else
      trap 'echo "==== nfjax_job.sh: the wrapper got SIGTERM; waiting for the command"' TERM
      launch=()
    fi
    export PYTHONUNBUFFERED=1
    ${launch[@]+"${launch[@]}"} "$@" &
    child=$!
    echo "$child" > "$DIR/child_pid"
    copier=''
    if [[ -n $DEST ]]; then
      (while sleep "$COPY_SECS"; do copy_log; done) &
      copier=$!
      disown "$copier"      # killed at the end, without a "Killed" line in the log
    fi
    rc=0
    while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done   # again if a trap interrupted it
    wait "$child" 2>/dev/null; r=$?        # the status, where a trap interrupted the last wait
    (( r < 0 || r > 255 || r == 127 )) || rc=$r
    [[ -z $copier ]] || kill -KILL "$copier" 2>/dev/null
    echo "==== nfjax_job.sh: run $RUN ended $(date -u '+%Y-%m-%d %H:%M:%S') UTC with exit code $rc"
    echo "$rc" > "$DIR/exit_code.tmp" && mv "$DIR/exit_code.tmp" "$DIR/exit_code"
    copy_log
    exit "$rc"
    ;;

  logs)
    log=$(current_log) || die 4 "no log of run $RUN on worker $W ($DIR/worker-$W.log)"
    n=$LINES; [[ $n != all ]] || n=+1
    if [[ $FOLLOW == 1 ]] && pid=$(running_pid); then
      tail -n "$n" -F --pid="$pid" "$log" 2>/dev/null
      while kill -0 "$pid" 2>/dev/null; do sleep 1; done
    else
      tail -n "$n" "$log"
    fi
    if [[ $FOLLOW == 1 ]]; then
      echo "[worker $W] run $RUN: $(ended)" >&2
      exit "$(job_code)"
    fi
    ;;

  status)
    if pid=$(running_pid); then
      since=$(( $(date +%s) - $(stat -c %Y "$DIR/pid") ))
      state="running for $((since / 3600))h$(printf %02d $((since % 3600 / 60)))m (pid $pid)"
    elif [[ -f $DIR/pid || -f $DIR/exit_code ]]; then
      state=$(ended)
    else
      echo "[worker $W] $(hostname): run $RUN never started here"
      exit 0
    fi
    log=$(current_log) || log=''
    echo "[worker $W] $(hostname): run $RUN $state; log $log"
    if [[ -n $log ]]; then
      # The last line nfjax logged ("<date> <time> [stage] ..."), else the last line there is.
      last=$(tr '\r' '\n' < "$log" | grep -E '^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{8} \[' | tail -n 1) || true
      [[ -n $last ]] || last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1) || true
      echo "[worker $W]   last: ${last:-(empty log)}"
    fi
    ;;

  stop)
    if pid=$(running_pid); then
      child=$(<"$DIR/child_pid")
      kill -TERM "$child"
      echo "[worker $W] run $RUN: sent SIGTERM to $child (it saves and exits 143; follow: launch/tpu.sh logs --follow)"
    else
      echo "[worker $W] run $RUN is not running here"
    fi
    ;;

  *) die 2 "unknown action $ACTION (start, logs, status, stop)";;
esac
