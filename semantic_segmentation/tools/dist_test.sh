#!/usr/bin/env bash
# bash semantic_segmentation/tools/dist_test.sh CONFIG CHECKPOINT GPUS [more test.py arguments]
set -euo pipefail
CONFIG=$1; CHECKPOINT=$2; shift; GPUS=$2; shift 2
# One NCCL process per GPU: refuse more GPUs than this machine has before torchrun spawns anything.
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then echo "error: $(basename "$0"): GPUS must be a positive number, got '$GPUS'" >&2; exit 2; fi
python3 -c 'import sys, torch; n = torch.cuda.device_count(); asked = int(sys.argv[1])
sys.exit(0 if asked <= n else f"error: {sys.argv[2]}: {asked} GPUs asked for, this machine has {n} CUDA devices")' \
    "$GPUS" "$(basename "$0")"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${PORT:-29500}" --nproc_per_node "$GPUS" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
