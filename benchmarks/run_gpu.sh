#!/usr/bin/env bash
# GPU machine: install the carried wheels (open_clip, pydantic, ...) and run the embed benchmark.
# Results land in $OUT (or benchmarks/results/ when OUT is unset).
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for arch in ${ARCHS:-vit-l vit-b}; do
  python3 benchmarks/embed_gpu.py --arch "$arch" --batch "${BATCH:-512}" --iters "${ITERS:-6}" \
    --decode-threads 16 --out "$out/embed_gpu_${arch}.json" 2>&1 | grep -v "No pretrained"
done
