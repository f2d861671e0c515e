#!/usr/bin/env bash
# GPU machine: mining fidelity and cost with the exact mode (flat shards on the GPU, fp16, exact
# re-scoring) beside refined IVF-PQ on the CPU, 1 M vectors per space, 2 % queries (20 k).
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
python3 benchmarks/mining_fidelity.py --device cuda --n "${N:-1000000}" --kinds "${KINDS:-flat}" \
  --out "$out/mining_fidelity_gpu.json"
