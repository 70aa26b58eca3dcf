#!/usr/bin/env bash
# Everything issue #7 needs measured on one GPU, writing JSON to $OUT (default results/):
# the GPU-only tests, issue #7's reference table for the given models, and the dense-task
# backbone shapes with the optimised and the textbook ops side by side.
#
#   bash tools/gpu_benchmark.sh mpvit_small coat_lite_small     # default: all MPViT variants + CoaT-Lite-S
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mpvit_tiny mpvit_xsmall mpvit_small mpvit_base coat_lite_small)
python -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA GPU'; print(torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests/test_fast_paths.py
for model in "${models[@]}"; do
  python tools/benchmark.py --preset reference-table --models "$model" --json "$out/table_$model.json"
  if [[ $model == mpvit_* ]]; then
    python tools/benchmark.py --models "$model" --impl both --features --mode train --img-size 800 1216 \
      --batch-size 2 --json "$out/detectron2_shape_$model.json"
    python tools/benchmark.py --models "$model" --impl both --features --mode train --img-size 512 512 \
      --batch-size 8 --json "$out/upernet_shape_$model.json"
  fi
done
