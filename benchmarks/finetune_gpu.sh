#!/usr/bin/env bash
# End-to-end fine-tuning on one GPU: the runs quoted in the book's results chapter.
# Usage: FASHLIB_DATA=/path/to/data bash benchmarks/finetune_gpu.sh [OUT_DIR] [EPOCHS]
# Each run trains on the CC0 training contributors, is monitored on the validation
# contributors and is evaluated once on the validation and test protocols.
set -euo pipefail
out=${1:-runs/finetune-gpu}
epochs=${2:-15}
workers=${WORKERS:-12}
mkdir -p "$out"
# SPECS: "backbone:loss" pairs separated by spaces.
specs=${SPECS:-"tf_efficientnet_lite0:multi_similarity tf_efficientnet_lite2:multi_similarity tf_efficientnet_lite2:normalized_softmax"}
for spec in $specs; do
  set -- ${spec/:/ }
  echo "== $1 / $2 ($epochs epochs)"
  python3 -m fashlib.finetune --backbone "$1" --loss "$2" --epochs "$epochs" --device cuda \
    --num-workers "$workers" --out "$out/$1-$2" | tee "$out/$1-$2.json" | tail -n 40
done
