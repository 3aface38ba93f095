# Shared helpers for launch/tpu.sh and launch/gpu.sh. Sourced, not run.
# shellcheck shell=bash

NFJAX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
note() { echo "[$(basename "$0" .sh)] $*" >&2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }   # need FLAG VALUE: a flag's value is there

# Quote one word for a POSIX shell only when it needs it, so printed commands stay readable
# and can be pasted back into a shell.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s == *\'* && $s != *[\$\`\"\\\!]* ]]; then    # has ' but nothing double quotes expand
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# One word of a command line: like shquote, but --flag=value quotes only the value.
shword() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--?[A-Za-z0-9_.-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shquote "${BASH_REMATCH[2]}"
  else
    shquote "$1"
  fi
}

# The command line as one printable string.
cmdline() {
  local out='' w
  for w in "$@"; do out+="${out:+ }$(shword "$w")"; done
  printf '%s' "$out"
}

# Run a command, or print it when DRY_RUN=1. Every external command of the scripts goes through
# here, so --dry-run shows exactly what would be executed (and needs neither gcloud nor a GPU).
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "$(cmdline "$@")"
  else
    echo "+ $(cmdline "$@")" >&2
    "$@"
  fi
}

# "configs/mnist.py:parity" -> "parity" (the default preset of configs/mnist.py is "quick").
preset_of() {
  local spec=$1
  if [[ $spec == *:* ]]; then printf '%s' "${spec##*:}"; else printf 'quick'; fi
}

# nfjax itself writes gs:// workdirs (nfjax[gcs]), but these scripts keep the workdir on the VM: they
# mkdir it, tee launch.log into it, put the compile cache in it and fetch it with rsync/scp. Refuse a
# URL here; --bucket syncs the results, or run `python -m nfjax.main --workdir=gs://...` directly.
check_local_workdir() {
  case $1 in
    gs://*|s3://*|*://*) die "--workdir=$1: the launch scripts keep the workdir on the VM (they create it, tee
  launch.log and the compile cache into it and fetch it from there), so it must be a local (or mounted)
  path. Use a local --workdir and --bucket=gs://... to copy the results there after the run, or run
  python -m nfjax.main --workdir=gs://... yourself (see launch/README.md, 'Workdirs and buckets').";;
  esac
}

check_bucket() {
  [[ -z $1 || $1 == gs://* ]] || die "--bucket=$1 must start with gs://"
}
