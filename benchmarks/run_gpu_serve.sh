#!/usr/bin/env bash
# GPU machine: the query encoder's serving batch vs the bare towers (benchmarks/serve_encoder.py),
# CLIP ViT-B/16 in bf16 at the batch sizes a replica sees: 1 (one query), 16 and 64
# (configs/serve-paper.yaml's max_batch_size). No Ray needed. Results land in $OUT (or
# benchmarks/results/ when OUT is unset).
#   OUT=benchmarks/results/h100 bash benchmarks/run_gpu_serve.sh
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for batch in ${BATCHES:-1 16 64}; do
  python3 benchmarks/serve_encoder.py --model vit-b16 --device cuda --precision bf16 \
    --batch "$batch" --repeats "${REPEATS:-20}" --out "$out/serve_encoder_b${batch}.json"
done
