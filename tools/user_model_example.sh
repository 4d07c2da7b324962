#!/usr/bin/env bash
# The README's "your model, your data" example, end to end, as a user runs it: a timm ViT that
# is not the reference (no class token, average pool + fc_norm, 32 x 32 input, RGB) with its
# checkpoint and a folder of its images, made by tools/user_model_example.py; then exit heads,
# two calibrated policies, conversion and evaluation on held-out test images -- all through
# the pyruntime command line. Prints every command and its output (results/user_model/log.txt
# holds the last run's).
#
#   bash tools/user_model_example.sh [DIR]     # DIR default: build/user_model (~10 min on 2 cores)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/build/user_model}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
cd "$DIR"
[ -f model.safetensors ] || $PY "$ROOT/tools/user_model_example.py" --out "$DIR"
M=vit_tiny_patch16_224
K=$(cat model_kwargs.json)
run() { echo; echo "\$ $*"; "$@"; }
py() { run pyruntime "$@"; }
pyruntime() { $PY -m pyruntime "$@"; }

py exits fit $M --checkpoint model.safetensors --model-kwargs "$K" --data images/train --blocks 1,3 \
   --out heads.safetensors --no-progress
py calibrate --method maqee --model $M --checkpoint model.safetensors --model-kwargs "$K" --exits heads.safetensors \
   --exit-blocks 1,3 --data images/val --budget-bops 0.85x --max-drop 2 --out maqee.json --report --no-progress
py calibrate --method quee --model $M --checkpoint model.safetensors --model-kwargs "$K" --exits heads.safetensors \
   --exit-blocks 1,3 --data images/val --budget-bops 0.85x --out quee.json --report --no-progress
for policy in fp32 w8a8 maqee.json quee.json; do  # shorthands, then the calibrated policies
  py convert $M "${policy%.json}.pyrt" --checkpoint model.safetensors --model-kwargs "$K" --exits heads.safetensors \
     --policy "$policy"
done
for p in fp32 w8a8 maqee quee; do
  py eval $p.pyrt --data images/test --json eval_$p.json --threads 1 --batch 1 --no-progress
done
