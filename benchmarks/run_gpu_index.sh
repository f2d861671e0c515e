#!/usr/bin/env bash
# GPU machine: the stage's exact GPU search vs bare GEMM + top-k (1 M x 768 fp16, top-32).
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
for shards in ${SHARDS:-1 4}; do
  python3 benchmarks/index_search.py --gpu --n 1000000 --dim 768 --k 32 --queries 20000 \
    --batch 2000 --shards "$shards" --out "$out/index_gpu_${shards}shards.json"
done
