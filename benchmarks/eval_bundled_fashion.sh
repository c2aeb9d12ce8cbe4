#!/usr/bin/env bash
# How pretrained/fashion-mnist was made and measured: export the trained pipeline in fp32 and bf16, score 1,000
# samples of each (100 per class prompt, the pipeline's defaults) with the same fp32 evaluation classifier, and run
# the evaluation commands its model card quotes. Usage: benchmarks/eval_bundled_fashion.sh TRAINED_PIPELINE_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-runs/fashion-mnist}
L=.venv/bin/ldmkit
work=runs/eval-bundled
mkdir -p "$work"
prompts=()
for c in "t-shirt" "trouser" "pullover" "dress" "coat" "sandal" "shirt" "sneaker" "bag" "ankle boot"; do
  article=a; [ "$c" = "ankle boot" ] && article=an
  prompts+=(--prompt "a photo of $article $c")
done
for dtype in fp32 bf16; do
  $L export "$src" --out "$work/$dtype" --dtype "$dtype" --overwrite
  $L sample "$work/$dtype" "${prompts[@]}" --num 100 --seed 1 --micro-batch 64 --out "$work/samples-$dtype.npz" --no-progress
  $L eval "$work/samples-$dtype.npz" --classifier "$work/fp32" --out "$work/samples-$dtype.eval.json" > /dev/null
  $L autoencoder eval "$work/$dtype" --eval-classifier "$work/fp32" --out-json "$work/autoencoder-$dtype.json" > /dev/null
done
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
for d in ("fp32", "bf16"):
    s = json.load(open(f"{w}/samples-{d}.eval.json"))
    a = json.load(open(f"{w}/autoencoder-{d}.json"))
    print(d, {k: s[k] for k in ("accuracy", "fd", "precision", "recall")},
          {k: a.get(k) for k in ("psnr", "ssim", "lpips", "eval_classifier_acc_orig", "eval_classifier_acc_recon")})
PY
