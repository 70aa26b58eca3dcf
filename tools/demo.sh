#!/usr/bin/env bash
# Installs whatever is missing, then the main job on built-in demo data (CPU, about a minute):
# writes a small coloured-shapes ImageFolder, trains MPViT-T on it with classification/main.py,
# and evaluates the checkpoint that the run saved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
PY=${PYTHON:-python3}
data=output/demo/shapes
out=output/demo/classification
[ -d "$data/val" ] || "$PY" -m mpvit.demo_data "$data" --train-per-class 100 --val-per-class 25
rm -rf "$out"
"$PY" classification/main.py -c configs/classification/demo_shapes.yaml --data-path "$data" --output-dir "$out"
echo "[demo] evaluating the saved checkpoint"
"$PY" classification/main.py -c configs/classification/demo_shapes.yaml --data-path "$data" --output-dir "$out" \
    --eval --resume "$out/checkpoint.pth"
echo "[demo] metrics: $out/eval_metrics.json, training log: $out/log.csv"
