#!/usr/bin/env bash
# GPU machine: the MMRet training step vs the bare forward+backward (benchmarks/train_gpu.py).
# Results land in $OUT (or benchmarks/results/ when OUT is unset).
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/train_gpu.py --model b16 --batch "${B16_BATCH:-64}" --out "$out/train_gpu_b16.json"
python3 benchmarks/train_gpu.py --model l14 --batch "${L14_BATCH:-24}" --out "$out/train_gpu_l14.json"
