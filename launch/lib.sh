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

# A workdir the scripts can use: a local (or mounted) path, or a gs:// URL, which nfjax writes
# through its gcs extra (gcsfs; the scripts install it). Other URL schemes are refused.
check_workdir() {
  case $1 in
    gs://?*) ;;
    *://*) die "--workdir=$1: give a local path or a gs://BUCKET/PATH URL (nfjax writes Google Cloud Storage; no other object store)";;
  esac
}

is_gs() { [[ $1 == gs://* ]]; }

# check_bucket BUCKET WORKDIR: --bucket is a gs:// URL, and only for a local workdir.
check_bucket() {
  [[ -z $1 || $1 == gs://* ]] || die "--bucket=$1 must start with gs://"
  [[ -z $1 ]] || ! is_gs "$2" || die "--bucket=$1 is for a local --workdir; --workdir=$2 is in Cloud Storage already (leave --bucket out)"
}
