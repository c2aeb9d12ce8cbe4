#!/usr/bin/env bash
# Create or reuse .venv and install what is missing. Usage: scripts/setup.sh [base|test]
#  - keeps any torch >= 2.4 already in .venv (GPU users: install your CUDA/ROCm torch into .venv first);
#    otherwise installs torch==2.13.0 (a CPU build here); every later pip call is pinned to the installed torch
#    through .venv/constraints.txt, so nothing can swap it for a multi-GB CUDA build.
#  - installs Fashion-MNIST from Debian's dataset-fashion-mnist when possible (root + apt-get), and for the test
#    suite Debian's chromium (the web UI's browser tests drive it; no browser is downloaded).
#  - quick when nothing changed (a stamp keyed by pyproject.toml and the extras).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-base}
PY=${PYTHON:-python3}
VENV=.venv
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { log "Python >= 3.10 is required (found $("$PY" --version 2>&1)); set PYTHON=python3.x"; exit 1; }
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

torch_version() { "$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }
tv=$(torch_version)
if [ -n "$tv" ] && "$VENV/bin/python" - "$tv" <<'PY'
import sys
major, minor = (int(x) for x in sys.argv[1].split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
PY
then :; else
  log "installing torch==2.13.0 (to use a GPU build, install it into $VENV first and rerun)"
  pip install "torch==2.13.0"
  tv=$(torch_version)
fi
echo "torch==$tv" > "$VENV/constraints.txt"

extras=""
[ "$mode" = test ] && extras="[test,minilm,serve]"
stamp="$VENV/.ldmkit-setup-$mode"
want="$(cat pyproject.toml "$VENV/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import ldmkit' 2>/dev/null; then
  log "installing ldmkit$extras (torch pinned to $tv)"
  pip install -c "$VENV/constraints.txt" -e ".$extras"
  echo "$want" > "$stamp"
fi

fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }) \
      || log "could not install dataset-fashion-mnist"
  fi
  [ -f "$fm/train-images-idx3-ubyte.gz" ] || log "Fashion-MNIST not installed: put train-images-idx3-ubyte.gz, \
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a folder and pass \
--data-dir FOLDER (or set LDMKIT_FASHION_MNIST=FOLDER); the generated shapes dataset works without files"
fi

if [ "$mode" = test ] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium (browser tests of the web UI)"
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }) \
      || log "could not install chromium"
  fi
  command -v chromium >/dev/null || log "chromium not installed: the web UI's browser tests skip (fail under CI=true)"
fi
