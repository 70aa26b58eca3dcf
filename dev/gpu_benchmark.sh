#!/usr/bin/env bash
# Everything the GPU speed work needs measured, in one call on one GPU, writing JSON to $OUT (default results/),
# most important first (a run cut short still leaves what it wrote):
#   1. the GPU-only tests;
#   2. ops / bytes / saved activations of a training step and of inference, ours vs the reference (issue #23);
#   3. MPViT-S with a stage's paths as one batch vs path by path (the 'per-path' form), eager, compiled, and
#      compiled with CUDA graphs (mode reduce-overhead), at classification batch 128 and the two dense shapes;
#   4. the batch-128 224x224 table (eager fp32 / bf16 / bf16 channels-last / compiled, and the bf16 AdamW training
#      step) for the given models and for Swin-T / ConvNeXt-T / CoaT-Lite-S measured in the same run, a profile
#      (top kernels) of MPViT-S, and the dense-task backbone shapes with all three formulations side by side.
#
#   REFERENCE_FILE=/path/to/authors/mpvit.py bash dev/gpu_benchmark.sh      # default models: all four MPViTs
#
# With REFERENCE_FILE (youngwanLEE/MPViT's mpvit.py, which needs einops; not shipped here) the reference
# implementation is counted, timed and profiled in the same run and every ratio is to it; without it, the only
# ratios to the reference are to its H100 figures recorded in dev/benchmark.py, printed on an H100 only.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(mpvit_tiny mpvit_xsmall mpvit_small mpvit_base)
reference=()
[ -z "${REFERENCE_FILE:-}" ] || reference=(--reference-file "$REFERENCE_FILE")
python3 -c "import torch; assert torch.cuda.is_available(), 'needs a CUDA GPU'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
python3 -m pytest -q -m gpu tests/test_fast_paths.py
python3 dev/count_ops.py --models mpvit_tiny mpvit_small "${reference[@]}" --impl all --device cuda \
  --json "$out/ops.json"
shapes=("--batch-size 128 --img-size 224" "--features --batch-size 2 --img-size 800 1216"
        "--features --batch-size 8 --img-size 512 512")
names=(classification detectron2_shape upernet_shape)
runs=(eager compiled cudagraphs)
run_flags=("" "--compile" "--compile --compile-mode reduce-overhead")
for i in "${!shapes[@]}"; do
  for j in "${!runs[@]}"; do
    # shellcheck disable=SC2086  # the settings are words
    python3 dev/benchmark.py --models mpvit_small --impl paths --amp bf16 --channels-last ${shapes[$i]} \
      ${run_flags[$j]} --iters 20 --json "$out/paths_${names[$i]}_${runs[$j]}.json"
  done
done
python3 dev/benchmark.py --preset reference-table --models swin_tiny_patch4_window7_224 convnext_tiny \
  coat_lite_small --json "$out/table_peers.json"
python3 dev/benchmark.py --models mpvit_small "${reference[@]}" --amp bf16 --profile 25 --iters 20 \
  --json "$out/profile_mpvit_small.json"
for model in "${models[@]}"; do
  python3 dev/benchmark.py --preset reference-table --models "$model" "${reference[@]}" \
    --json "$out/table_$model.json"
  python3 dev/benchmark.py --models "$model" --impl all --features --mode train --img-size 800 1216 \
    --batch-size 2 --json "$out/detectron2_shape_$model.json"
  python3 dev/benchmark.py --models "$model" --impl all --features --mode train --img-size 512 512 \
    --batch-size 8 --json "$out/upernet_shape_$model.json"
done
