#!/usr/bin/env bash
# The main job: `ldmkit demo` walks the lecture through the bundled pipelines (pretrained/) and writes
# runs/demo/report.html and runs/demo/report.json (about 1-2 minutes on 2 cores). Extra arguments go to it,
# e.g. `make demo DEMO_ARGS=--train` retrains both pipelines from scratch first.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/ldmkit demo "$@"
