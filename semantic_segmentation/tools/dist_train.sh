#!/usr/bin/env bash
# bash semantic_segmentation/tools/dist_train.sh CONFIG GPUS [more train.py arguments]
set -euo pipefail
CONFIG=$1; GPUS=$2; shift 2
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${PORT:-29500}" --nproc_per_node "$GPUS" \
    "$(dirname "$0")/train.py" "$CONFIG" --launcher pytorch "$@"
