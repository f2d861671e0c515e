"""The Ray Data embed pipeline vs a plain in-process loop over the same shards, on this CPU.

Both run the same three pieces — ``read_accepted_images`` -> ``EmbedStage`` -> ``write_embeddings``
— on the same ingested shards with the same models (the config's spaces) and the same batch
size; the loop just calls them one after another in one process. Both are timed from "start"
to "every embedding is written", model construction included (the loop builds its stage
once; Ray starts its actor).
Ray's own start-up (``ray.init``) is outside the timing, as on a cluster that is already up.

Two costs are reported: end to end (what a user of a small run sees: Ray's worker and actor
start-up, ~10 s on 2 cores, included), and marginal — each path runs on half the shards and on all
of them, and the extra images over the extra time is its steady throughput, with every fixed cost
cancelled out. Runs alternate, ``--repeats`` rounds after one discarded warm-up round; medians.

    python benchmarks/embed_cpu.py --images 2000 --repeats 3 --out benchmarks/results/cpu/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import ray

from megapairs_ray.config import load_config
from megapairs_ray.corpus import build_corpus
from megapairs_ray.io.shards import list_shards
from megapairs_ray.pipeline.embed import build_embed_dataset
from megapairs_ray.pipeline.engine import run_stage
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import read_accepted_images, write_embeddings

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg) -> int:
    """Read -> embed -> write, one batch after another, in this process."""
    stage = EmbedStage(cfg.embed)
    n = 0
    pending: list[dict] = []
    for shard in list_shards(cfg.input):
        row = {k: [v] for k, v in shard.to_row().items()}
        for batch in read_accepted_images(row, cfg.run_dir, cfg.input):
            pending.append(batch)
            while sum(len(b["image_id"]) for b in pending) >= cfg.embed.batch_size:
                head, pending = _split(pending, cfg.embed.batch_size)
                n += _embed_and_write(stage, head, cfg)
    if pending:
        n += _embed_and_write(stage, pending, cfg)
    return n


def _split(batches: list[dict], rows: int) -> tuple[list[dict], list[dict]]:
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return ([{k: v[:rows] for k, v in merged.items()}],
            [{k: v[rows:] for k, v in merged.items()}])


def _embed_and_write(stage: EmbedStage, batches: list[dict], cfg) -> int:
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    write_embeddings(stage(merged), cfg.run_dir, stage.image_spaces, stage.text_spaces)
    return len(merged["image_id"])


def ray_pipeline(cfg) -> int:
    """The production path: ``run_embed``'s dataset, its summaries consumed by this driver."""
    return sum(int(s["rows"]) for s in build_embed_dataset(cfg, list_shards(cfg.input)).iter_rows())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--work", default=str(ROOT / "data" / "bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    corpus = work / f"corpus-{args.images}-{args.shard_size}"
    build_corpus(corpus, n_images=args.images, shard_size=args.shard_size)
    run_dir = work / "run"
    overrides = [f"run_dir={run_dir}", f"input.uris=[{corpus}]",
                 # The two cores split as the tiny profile does: one for the encoder actor,
                 # one for the shard readers and writers around it.
                 "embed.num_cpus=1", "embed.reader_num_cpus=0.5",
                 "embed.writer_num_cpus=0.5"]
    cfg = load_config(args.config, overrides)
    ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shutil.rmtree(run_dir, ignore_errors=True)
    run_stage(INGEST, cfg)

    def clear_embeddings() -> None:
        shutil.rmtree(run_dir / "embeddings", ignore_errors=True)
        shutil.rmtree(run_dir / "rejects" / "embed", ignore_errors=True)

    import torch

    torch.set_num_threads(2)
    shards = sorted(corpus.glob("*.tar"))
    first_half = ", ".join(str(s) for s in shards[: len(shards) // 2])
    half = load_config(args.config, [*overrides[2:], f"run_dir={run_dir}",
                                     f"input.uris=[{first_half}]"])
    runs = {("loop", "half"): [], ("loop", "full"): [], ("ray", "half"): [], ("ray", "full"): []}
    rows: dict[str, int] = {}
    for rep in range(args.repeats + 1):  # the first round warms caches and is discarded
        for name, fn in (("loop", plain_loop), ("ray", ray_pipeline)):
            for size, c in (("half", half), ("full", cfg)):
                clear_embeddings()
                t0 = time.perf_counter()
                n = fn(c)
                elapsed = time.perf_counter() - t0
                assert rows.setdefault(size, n) == n, (size, n, rows)
                if rep:
                    runs[(name, size)].append(elapsed)
    med = {k: statistics.median(v) for k, v in runs.items()}
    extra = rows["full"] - rows["half"]
    loop_marginal = extra / (med[("loop", "full")] - med[("loop", "half")])
    ray_marginal = extra / (med[("ray", "full")] - med[("ray", "half")])
    best = {k: min(v) for k, v in runs.items()}
    best_loop = extra / (best[("loop", "full")] - best[("loop", "half")])
    best_ray = extra / (best[("ray", "full")] - best[("ray", "half")])
    loop_rate = rows["full"] / med[("loop", "full")]
    ray_rate = rows["full"] / med[("ray", "full")]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "profile": cfg.profile, "images": rows, "batch_size": cfg.embed.batch_size,
        "repeats": args.repeats,
        "seconds": {f"{a}_{b}": [round(x, 2) for x in v] for (a, b), v in runs.items()},
        "end_to_end_loop_img_per_s": round(loop_rate, 1),
        "end_to_end_ray_img_per_s": round(ray_rate, 1),
        "end_to_end_ray_cost": round(1 - ray_rate / loop_rate, 3),
        # Marginal throughput: the extra images over the extra time between the half and the
        # full corpus. Fixed costs (process and actor start-up, model build) cancel out.
        "marginal_loop_img_per_s": round(loop_marginal, 1),
        "marginal_ray_img_per_s": round(ray_marginal, 1),
        "marginal_ray_cost": round(1 - ray_marginal / loop_marginal, 3),
        # The same from the fastest run of each: on a shared, noisy machine the least disturbed
        # run is the better estimate of what the code itself costs.
        "best_marginal_loop_img_per_s": round(best_loop, 1),
        "best_marginal_ray_img_per_s": round(best_ray, 1),
        "best_marginal_ray_cost": round(1 - best_ray / best_loop, 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
