#!/usr/bin/env bash
# Everything the GPU speed work needs measured, in one call on one GPU, writing JSON to $OUT (default results/):
# the GPU-only tests; the batch-128 224x224 table (eager fp32 / bf16 / bf16 channels-last / compiled, and the
# bf16 AdamW training step) for the given models and for Swin-T / ConvNeXt-T measured in the same run; a
# profile (top kernels) of MPViT-S's training step and eager inference; and the dense-task backbone shapes
# with the optimised and the textbook ops side by side.
#
#   REFERENCE_FILE=/path/to/authors/mpvit.py bash tools/gpu_benchmark.sh      # default models: all four MPViTs
#
# With REFERENCE_FILE (youngwanLEE/MPViT's mpvit.py, which needs einops; not shipped here) the reference
# implementation is timed and profiled in the same run and every ratio is to it; without it, ratios are to
# the reference's H100 figures recorded in tools/benchmark.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mpvit_tiny mpvit_xsmall mpvit_small mpvit_base)
reference=()
[ -z "${REFERENCE_FILE:-}" ] || reference=(--reference-file "$REFERENCE_FILE")
python -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA GPU'; print(torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests/test_fast_paths.py
python tools/benchmark.py --preset reference-table --models swin_tiny_patch4_window7_224 convnext_tiny \
  coat_lite_small --json "$out/table_peers.json"
python tools/benchmark.py --models mpvit_small "${reference[@]}" --amp bf16 --profile 25 --iters 20 \
  --json "$out/profile_mpvit_small.json"
for model in "${models[@]}"; do
  python tools/benchmark.py --preset reference-table --models "$model" "${reference[@]}" --json "$out/table_$model.json"
  python tools/benchmark.py --models "$model" --impl both --features --mode train --img-size 800 1216 \
    --batch-size 2 --json "$out/detectron2_shape_$model.json"
  python tools/benchmark.py --models "$model" --impl both --features --mode train --img-size 512 512 \
    --batch-size 8 --json "$out/upernet_shape_$model.json"
done
