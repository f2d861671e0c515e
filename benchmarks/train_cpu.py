"""Ray Train MMRet training vs a plain single-process PyTorch loop, side by side, on this CPU.

Both paths run the same ``TrainStep`` (normalise, forward, gathered InfoNCE, backward, AdamW) on
the same model size, batch size and number of hard negatives, with one compute thread each:

- **Ray Train**: ``run_training`` with one worker; the triplets stream through Ray Data's
  ``TripletLoader`` actor (reading tars, decoding, resizing) into ``iter_torch_batches``.
  Steady throughput is the median of the job's own log windows, leaving out the first window
  (start-up) and any window in which a new pass over the data began (pipeline restart).
- **Plain loop**: the same ``TripletLoader`` makes every batch up front, in memory; then the loop
  only trains. It is the bare cost of the training step, so the ratio is everything Ray adds:
  streaming, the loader competing for the machine, reports and checkpoints.

    python benchmarks/train_cpu.py --steps 150 --out benchmarks/results/cpu-2core/train.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from megapairs_ray.models.mmret import MMRetCLIP
from megapairs_ray.train.config import TrainConfig
from megapairs_ray.train.data import TripletLoader
from megapairs_ray.train.entry import read_metrics
from megapairs_ray.train.step import TrainStep
from megapairs_ray.train.toy_triplets import write_toy_dataset
from megapairs_ray.train.trainer import model_input_for, run_training

MODEL = {
    "projection_dim": 128,
    "text_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": 32,
                    "vocab_size": 49408},
    "vision_config": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
}


def config(ann: Path, store: Path, steps: int, batch: int) -> TrainConfig:
    return TrainConfig.model_validate({
        "profile": "bench",
        "data": {"annotations": [str(ann)], "loader_num_cpus": 0.5, "loader_batch_rows": batch,
                 "decode_threads": 1},
        "model": {"init": None, "config_overrides": MODEL},
        "optim": {"lr": 1e-4, "max_steps": steps, "batch_size": batch, "warmup_steps": 5},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "checkpoint": {"storage_path": str(store), "name": "bench", "every_steps": steps,
                       "log_every_steps": 10, "max_failures": 0},
        "ray": {"num_cpus": 2, "object_store_memory": 512 * 1024**2},
    })


def ray_train(cfg: TrainConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    run_training(cfg)
    total = time.perf_counter() - t0
    rows = read_metrics(str(Path(cfg.checkpoint.storage_path) / "bench" / "metrics.jsonl"))
    steady = [r["samples_per_s"] for prev, r in itertools.pairwise(rows[1:])
              if r["passes"] == prev["passes"]]
    return {"steady_samples_per_s": statistics.median(steady), "windows": len(steady),
            "end_to_end_s": total,
            "end_to_end_samples_per_s": cfg.optim.max_steps * cfg.optim.batch_size / total}


def plain_loop(cfg: TrainConfig, ann: Path, steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model_input = model_input_for(cfg)
    loader = TripletLoader(cfg.data, model_input, None)
    records = [json.loads(line) for line in ann.read_text().splitlines()]
    b = cfg.optim.batch_size
    batches = []
    for i in range(steps):
        rows = [records[(i * b + j) % len(records)] for j in range(b)]
        out = loader({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
        batches.append({k: torch.from_numpy(v) for k, v in out.items()})
    torch.manual_seed(0)
    model = MMRetCLIP.from_config(**MODEL)
    step = TrainStep(model, model, cfg.optim, cfg.data.num_hard_negatives, model_input,
                     torch.device("cpu"))
    warm = 10
    for batch in batches[:warm]:
        step(batch)
    t0 = time.perf_counter()
    for batch in batches[warm:]:
        step(batch)
    dt = time.perf_counter() - t0
    return {"steady_samples_per_s": (steps - warm) * b / dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ann = write_toy_dataset(Path(d) / "ds", repeats=20)
        cfg = config(ann, Path(d) / "store", args.steps, args.batch)
        plain = plain_loop(cfg, ann, args.steps)
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ours = ray_train(cfg)
        ray.shutdown()
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__},
        "model": MODEL, "batch": args.batch, "hard_negatives": 4, "steps": args.steps,
        "plain_loop": plain, "ray_train": ours,
        "ratio_steady": ours["steady_samples_per_s"] / plain["steady_samples_per_s"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
