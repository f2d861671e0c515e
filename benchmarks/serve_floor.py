"""Lowering the service's floor: the query encoder's per-query cost, eager vs compiled, fp32 vs
bf16, with the rankings each gives against the eager fp32 model's.

The floor is what a replica does per query: ``RetrieverEncoder.queries`` (decode, preprocess,
image and text towers, fuse) then ``GallerySearcher.search``. Each variant runs the
``serve_load`` mix (composed, image-only, text-only) at batch 1 (per-query latency) and at
batch 16 (throughput), on ``serve_load``'s model (a random CLIP of a realistic CPU size) and
gallery (the bundled corpus). ``torch.compile`` wraps the two tower functions
(``dynamic=True``: serving batches vary in size); its compile time is reported. A variant is
worth keeping when it is faster and its query embeddings stay at cosine >= 0.999 to eager fp32
(and the top-10 hits agree).

    .venv/bin/python benchmarks/serve_floor.py --out benchmarks/results/cpu-2core/serve_floor.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_load  # noqa: E402  (the model, gallery, queries)

VARIANTS = [("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16")]


def run_variant(mode: str, precision: str, checkpoint: str, gallery: str,
                queries: list[dict[str, Any]], repeats: int) -> tuple[dict[str, Any], np.ndarray,
                                                                      list[list[int]]]:
    import torch

    from megapairs_ray.models.retriever import RetrieverEncoder
    from megapairs_ray.serve.search import GallerySearcher

    enc = RetrieverEncoder(checkpoint, batch_size=16, threads=4, precision=precision)
    searcher = GallerySearcher(gallery)
    t0 = time.perf_counter()
    if mode == "compiled":
        enc.model.image_features = torch.compile(enc.model.image_features, dynamic=True)
        enc.model.text_features = torch.compile(enc.model.text_features, dynamic=True)
    for b in (1, 16, 5):  # warm-up, and the compile of each shape family
        g = queries[:b]
        enc.queries([q["image"] for q in g], [q["text"] for q in g])
    warm_s = time.perf_counter() - t0
    lat = []
    for _ in range(repeats):
        for q in queries:
            a = time.perf_counter()
            searcher.search(enc.queries([q["image"]], [q["text"]]), serve_load.TOP_K)
            lat.append((time.perf_counter() - a) * 1e3)
    groups = [queries[i : i + 16] for i in range(0, len(queries) - 15, 16)]
    a = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for g in groups:
            searcher.search(enc.queries([q["image"] for q in g], [q["text"] for q in g]),
                            serve_load.TOP_K)
            n += len(g)
    batch16_qps = n / (time.perf_counter() - a)
    vecs = enc.queries([q["image"] for q in queries], [q["text"] for q in queries])
    hits = [[h["id"] for h in row] for row in searcher.search(vecs, serve_load.TOP_K)]
    out = {"mode": mode, "precision": precision, "warmup_and_compile_s": round(warm_s, 1),
           "batch_1": serve_load.latency_summary(lat),
           "batch_16_queries_per_s": round(batch16_qps, 1)}
    print(f"{mode:>8} {precision}: batch 1 p50 {out['batch_1']['p50_ms']} ms, batch 16 "
          f"{out['batch_16_queries_per_s']} q/s (warm-up {out['warmup_and_compile_s']} s)",
          flush=True)
    return out, vecs, hits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(HERE.parent / "data" / "bench" / "serve"))
    ap.add_argument("--out", default=str(HERE / "results" / "cpu-2core" / "serve_floor.json"))
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.torch_threads)
    checkpoint, gallery = serve_load.prepare_once(Path(args.cache).resolve())
    queries = serve_load.make_queries(args.queries)
    results: dict[str, Any] = {
        "benchmark": "serve_floor", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": serve_load.machine(),
        "setup": {"model": "serve_load.CLIP_CFG, random weights (torch seed 0)",
                  "queries": f"{len(queries)} (serve_load's mix), {args.repeats} passes",
                  "torch_threads": args.torch_threads,
                  "command": " ".join([Path(sys.executable).name, *sys.argv])},
        "variants": []}
    base_vecs, base_hits = None, None
    for mode, precision in VARIANTS:
        row, vecs, hits = run_variant(mode, precision, checkpoint, gallery, queries,
                                      args.repeats)
        if base_vecs is None:
            base_vecs, base_hits = vecs, hits
        cos = (vecs * base_vecs).sum(axis=1)
        row["min_cosine_vs_eager_fp32"] = round(float(cos.min()), 6)
        row["top10_equal_fraction"] = round(float(np.mean(
            [h == b for h, b in zip(hits, base_hits)])), 3)
        row["top10_overlap_mean"] = round(float(np.mean(
            [len(set(h) & set(b)) / len(b) for h, b in zip(hits, base_hits)])), 3)
        results["variants"].append(row)
    eager = results["variants"][0]["batch_1"]["p50_ms"]
    results["summary"] = {f"{v['mode']}_{v['precision']}_batch_1_speedup": round(
        eager / v["batch_1"]["p50_ms"], 2) for v in results["variants"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
