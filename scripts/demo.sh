#!/usr/bin/env bash
# The main job, for now a short end-to-end smoke run: train every stage of a tiny text-to-image pipeline on the
# generated shapes (about a minute on 2 cores), then sample a grid from prompts. Output in runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DEMO_OUT:-runs/demo}
ldm=.venv/bin/ldmkit
rm -rf "$out"
$ldm data preview shapes --out "$out/data.png" --num 32
$ldm train pipeline --preset tiny --out "$out" --no-progress
$ldm sample "$out" --prompt "a red circle" --prompt "a blue square" --prompt "" --num 8 --steps 8 \
  --out "$out/samples.png" --no-progress
$ldm sample "$out" --prompt "a red circle" --num 4 --steps 8 --out "$out/samples.npz" --no-progress
echo "demo: pipeline in $out, dataset preview $out/data.png, samples $out/samples.png"
