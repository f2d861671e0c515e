#!/usr/bin/env bash
# GPU machine: the mllm family's training step vs the bare GradCache forward+backward
# (benchmarks/mllm_bench.py --part train), on a random LLaVA-NeXT of LLaVA-1.6-Mistral-7B's
# shape in bf16 with LoRA r = 32, GradCache and gradient checkpointing, then on the twin. No Ray.
# Carry the wheels it needs beside torch into .whl/ first, e.g.
#   pip download --no-deps -d .whl transformers==5.19.0 peft==0.21.2 tokenizers safetensors \
#     huggingface_hub accelerate pydantic pydantic_core annotated_types typing_inspection \
#     pyyaml regex
# Results land in $OUT (or benchmarks/results/ when OUT is unset).
set -euo pipefail
out=${OUT:-benchmarks/results}
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/mllm_bench.py --part train --device cuda --shape 7b \
  --batch "${BATCH:-8}" --chunk "${CHUNK:-2}" --negatives 3 --checkpointing \
  --steps "${STEPS:-3}" --repeats 2 --out "$out/mllm_train_7b.json"
python3 benchmarks/mllm_bench.py --part train --device cuda --shape twin --batch 32 --chunk 8 \
  --out "$out/mllm_train_twin.json"
