#!/usr/bin/env bash
# Set up one TPU VM worker for nfjax. `launch/tpu.sh bootstrap` copies this file to every worker
# and runs it there (gcloud ... ssh --worker=all); it can also be run by hand on a worker.
#
# Idempotent: each step checks whether its result is already in place and skips itself, so a
# second run on a finished worker installs nothing and changes nothing.
#   1. source   ~/nfjax from the tarball tpu.sh copied (re-extracted only when its checksum
#               changed) or from a git repository (fetch + checkout of the requested ref)
#   2. python   a virtualenv ~/nfjax-venv on Python >= 3.11 (jax 0.10 needs it; the TPU
#               images are Ubuntu 22.04 with Python 3.10, so a newer interpreter is fetched
#               with uv when none is installed)
#   3. packages `pip install -e ~/nfjax[tpu]` (tpu.sh asks for [tpu,gcs]): nfjax and, through
#               its `tpu` extra, jax[tpu] within the project's jax range (it brings libtpu), in
#               one pip call; skipped when the stamp file (extras + pyproject.toml hash + python)
#               matches
# Nothing is changed while a job that tpu.sh run started (~/nfjax_jobs/*/pid) is running here.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu_worker_setup.sh (--tarball FILE | --repo URL [--ref REF]) [--extras NAME]
                           [--src DIR] [--venv DIR] [--python-version X.Y]

  --tarball FILE       source tarball (what launch/tpu.sh copies to each worker)
  --repo URL           git repository to clone instead; --ref picks a branch/tag/commit (default HEAD)
  --extras NAME        extras of nfjax to install with it: pip install -e DIR[NAME]
                       (default tpu: jax[tpu] in pyproject.toml's jax range; '' for none)
  --src DIR            where the source goes (default ~/nfjax)
  --venv DIR           the virtualenv (default ~/nfjax-venv)
  --python-version V   minimum Python for the virtualenv (default 3.11)
EOF
}

TARBALL='' REPO='' REF='HEAD' EXTRAS='tpu'
SRC="$HOME/nfjax"
VENV="$HOME/nfjax-venv"
PYVER='3.11'
while [[ $# -gt 0 ]]; do
  case $1 in
    --tarball) TARBALL=$2; shift 2;;
    --repo) REPO=$2; shift 2;;
    --ref) REF=$2; shift 2;;
    --extras) EXTRAS=$2; shift 2;;
    --src) SRC=$2; shift 2;;
    --venv) VENV=$2; shift 2;;
    --python-version) PYVER=$2; shift 2;;
    -h|--help) usage; exit 0;;
    *) echo "tpu_worker_setup.sh: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
done
[[ -n $TARBALL || -n $REPO ]] || { echo "tpu_worker_setup.sh: give --tarball or --repo" >&2; exit 2; }
say() { echo "[setup $(hostname)] $*"; }

# A job that launch/tpu.sh run started here is still running (`all` run again after a dropped
# connection): leave the source and packages it runs on as they are.
busy=''
for p in "$HOME"/nfjax_jobs/*/pid; do
  if [[ -f $p ]] && pid=$(<"$p") && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    busy+="${busy:+, }$(basename "$(dirname "$p")") (pid $pid)"
  fi
done
if [[ -n $busy ]]; then
  say "a job is running here: $busy; source and packages left as they are"
  exit 0
fi

# 1. source ------------------------------------------------------------------------------------
if [[ -n $TARBALL ]]; then
  sum=$(gzip -dc "$TARBALL" | sha256sum | cut -c1-64)   # of the tar stream: a gzip header's timestamp is no change
  if [[ -f $SRC/.nfjax-source && $(cat "$SRC/.nfjax-source") == "$sum" ]]; then
    say "source: $SRC is already this tarball"
  else
    rm -rf "$SRC.new"
    mkdir -p "$SRC.new"
    tar -xzf "$TARBALL" -C "$SRC.new"
    echo "$sum" > "$SRC.new/.nfjax-source"
    rm -rf "$SRC"
    mv "$SRC.new" "$SRC"     # same path: an editable install keeps pointing at it
    say "source: extracted into $SRC"
  fi
else
  if [[ ! -d $SRC/.git ]]; then
    git clone --quiet "$REPO" "$SRC"
  fi
  before=$(git -C "$SRC" rev-parse HEAD)
  git -C "$SRC" fetch --quiet origin "$REF"
  git -C "$SRC" checkout --quiet --detach FETCH_HEAD
  after=$(git -C "$SRC" rev-parse HEAD)
  if [[ $before == "$after" ]]; then say "source: $SRC already at $after"; else say "source: $SRC now at $after"; fi
fi

# 2. python ------------------------------------------------------------------------------------
py_ok() { "$1" -c "import sys; sys.exit(0 if sys.version_info >= tuple(map(int, '$PYVER'.split('.'))) else 1)" 2>/dev/null; }
if [[ -x $VENV/bin/python ]] && py_ok "$VENV/bin/python"; then
  say "python: $VENV exists ($("$VENV/bin/python" -V 2>&1))"
else
  rm -rf "$VENV"
  interp=''
  for c in "${NFJAX_PYTHON_BIN:-}" python3.13 python3.12 python3.11 python3; do
    if [[ -n $c ]] && command -v "$c" >/dev/null && py_ok "$c"; then interp=$c; break; fi
  done
  if [[ -n $interp ]]; then
    "$interp" -m venv "$VENV"
  else
    # No Python >= $PYVER on the image: uv downloads a standalone interpreter.
    if [[ ! -x $HOME/.local/bin/uv ]]; then
      python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
    fi
    "$HOME/.local/bin/uv" venv --quiet --seed --python "$PYVER" "$VENV"
  fi
  say "python: created $VENV ($("$VENV/bin/python" -V 2>&1))"
fi

# 3. packages ----------------------------------------------------------------------------------
target="$SRC${EXTRAS:+[$EXTRAS]}"     # e.g. ~/nfjax[tpu]
stamp="extras=$EXTRAS|$(sha256sum "$SRC/pyproject.toml" | cut -c1-64)|$("$VENV/bin/python" -V 2>&1)"
if [[ -f $VENV/.nfjax-setup && $(cat "$VENV/.nfjax-setup") == "$stamp" ]] \
    && "$VENV/bin/python" -c 'import jax, nfjax' 2>/dev/null; then
  say "packages: already installed (nfjax -e $target)"
else
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$target"
  echo "$stamp" > "$VENV/.nfjax-setup"
  say "packages: installed nfjax -e $target"
fi
say "ready: $("$VENV/bin/python" -c 'import jax, nfjax; print("jax", jax.__version__)')"
