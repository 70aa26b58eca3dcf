#!/usr/bin/env bash
# bash semantic_segmentation/tools/dist_test.sh CONFIG CHECKPOINT GPUS [more test.py arguments]
set -euo pipefail
CONFIG=$1; CHECKPOINT=$2; shift; GPUS=$2; shift 2
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${PORT:-29500}" --nproc_per_node "$GPUS" \
    "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
