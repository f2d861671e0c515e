"""The Ray Data embed pipeline vs a plain in-process loop over the same shards, on this CPU.

Both run the same three pieces — ``read_accepted_images`` -> ``EmbedStage`` -> ``write_embeddings``
— on the same ingested shards with the same tiny models and the same batch size; the loop just
calls them one after another in one process. Both are timed from "start" to "every embedding is
written", model construction included (the loop builds its stage once; Ray starts its actor).
The cost of Ray is 1 - ray_img_per_s / loop_img_per_s. Ray's own start-up (``ray.init``) is
outside the timing, as on a cluster that is already up. The two runs alternate, ``--repeats``
times, and the medians are reported.

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
from megapairs_ray.pipeline.ingest import run_ingest
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import read_accepted_images, write_embeddings

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg, marks: list[tuple[float, int]]) -> int:
    """Read -> embed -> write in one process; ``marks`` gets (time, rows) after each write."""
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
                marks.append((time.perf_counter(), n))
    if pending:
        n += _embed_and_write(stage, pending, cfg)
        marks.append((time.perf_counter(), n))
    return n


def _split(batches: list[dict], rows: int) -> tuple[list[dict], list[dict]]:
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return ([{k: v[:rows] for k, v in merged.items()}],
            [{k: v[rows:] for k, v in merged.items()}])


def _embed_and_write(stage: EmbedStage, batches: list[dict], cfg) -> int:
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    write_embeddings(stage(merged), cfg.run_dir)
    return len(merged["image_id"])


def ray_pipeline(cfg, marks: list[tuple[float, int]]) -> int:
    """The production path (``run_embed``'s dataset), with a mark per writer summary."""
    n = 0
    for summary in build_embed_dataset(cfg, list_shards(cfg.input)).iter_rows():
        n += int(summary["rows"])
        marks.append((time.perf_counter(), n))
    return n


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Rows/s from the first output to the last: start-up (model build, actor start) excluded."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "data" / "bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    corpus = work / f"corpus-{args.images}"
    build_corpus(corpus, n_images=args.images, shard_size=100)
    run_dir = work / "run"
    overrides = [f"run_dir={run_dir}", f"input.uris=[{corpus}]",
                 # Same cores for both: the actor's torch gets 2 threads like the loop's.
                 "embed.num_cpus=1.5", "embed.reader_num_cpus=0.25",
                 "embed.writer_num_cpus=0.25",
                 # One write per embed batch in both runs, and a progress mark per write.
                 "embed.writer_batch_rows=64"]
    cfg = load_config(args.config, overrides)
    ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
             include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shutil.rmtree(run_dir, ignore_errors=True)
    run_ingest(cfg)

    def clear_embeddings() -> None:
        shutil.rmtree(run_dir / "embeddings", ignore_errors=True)
        shutil.rmtree(run_dir / "rejects" / "embed", ignore_errors=True)

    import torch

    torch.set_num_threads(2)
    loop_s, ray_s, loop_steady, ray_steady, counts = [], [], [], [], []
    for _ in range(args.repeats):
        for name, fn, total, steady in (("loop", plain_loop, loop_s, loop_steady),
                                        ("ray", ray_pipeline, ray_s, ray_steady)):
            clear_embeddings()
            marks: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            counts.append((name, fn(cfg, marks)))
            total.append(time.perf_counter() - t0)
            steady.append(steady_rate(marks))
    assert len({c for _, c in counts}) == 1, counts
    n = counts[0][1]
    loop_rate = n / statistics.median(loop_s)
    ray_rate = n / statistics.median(ray_s)
    loop_ss, ray_ss = statistics.median(loop_steady), statistics.median(ray_steady)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores ({platform.processor() or 'cpu'})",
        "profile": cfg.profile, "images": n, "batch_size": cfg.embed.batch_size,
        "repeats": args.repeats,
        "loop_seconds": [round(s, 2) for s in loop_s],
        "ray_seconds": [round(s, 2) for s in ray_s],
        "loop_img_per_s": round(loop_rate, 1),
        "ray_img_per_s": round(ray_rate, 1),
        "ray_over_loop": round(ray_rate / loop_rate, 3),
        "ray_cost": round(1 - ray_rate / loop_rate, 3),
        "steady_loop_img_per_s": round(loop_ss, 1),
        "steady_ray_img_per_s": round(ray_ss, 1),
        "steady_ray_cost": round(1 - ray_ss / loop_ss, 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
