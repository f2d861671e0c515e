"""Index search: recall@k of each index kind against exact search, and queries/s.

CPU (default): clustered vectors (mixtures of Gaussians on the unit sphere — real embeddings
cluster; uniform random vectors make every approximate index look bad and every exact one look
good), every ``IndexConfig.kind`` at the settings given, through the stage's own code path
(``train_index`` -> ``build_shard`` -> ``IndexShard.search`` -> ``merge_topk``) with the vectors
split over ``--shards`` id-range shards.

GPU (``--gpu``): the stage's exact GPU search (``IndexShard`` with ``device: cuda``: fp16 GEMM +
top-k in torch) over ``--n`` vectors vs the bare GEMM + top-k on the same tensors, same card, one
run; docs/method.md §6 measured the bare figure at 96,700 queries/s for 1 M x 768 fp16, top-32.

    python benchmarks/index_search.py --n 200000 --dim 128 \
        --out benchmarks/results/cpu-2core/index_recall.json
    python benchmarks/index_search.py --gpu --n 1000000 --dim 768 --k 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from megapairs_ray.config import IndexConfig
from megapairs_ray.stages.index import (
    IndexShard,
    ShardMeta,
    build_shard,
    id_range,
    merge_topk,
    save_shard,
    shard_of,
    train_index,
)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)]
    x += spread * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def build(cfg: IndexConfig, ids: np.ndarray, x: np.ndarray, folder: str) -> tuple[list, float]:
    t0 = time.perf_counter()
    sample = x[np.random.default_rng(0).permutation(len(x))[: cfg.train_sample]]
    trained = train_index(cfg, sample, len(x))
    owner = shard_of(ids, cfg.shards)
    for s in range(cfg.shards):
        sel = owner == s
        lo, hi = id_range(s, cfg.shards)
        save_shard(folder, build_shard(trained, ids[sel], x[sel]),
                   ShardMeta("bench", s, cfg.shards, cfg.kind, "", x.shape[1], int(sel.sum()),
                             lo, hi))
    built = time.perf_counter() - t0
    return [IndexShard(folder, s, cfg) for s in range(cfg.shards)], built


def search(shards: list, q: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float]:
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(q), batch):
        out.append(merge_topk([s.search(q[i : i + batch], k) for s in shards], k)[1])
    return np.concatenate(out), time.perf_counter() - t0


def recall(got: np.ndarray, want: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(w[:k])) / k for g, w in zip(got, want)]))


def cpu(args: argparse.Namespace) -> dict:
    x = clustered(args.n, args.dim, args.clusters, args.spread, seed=1)
    ids = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, args.n, dtype=np.int64)
    q = clustered(args.queries, args.dim, args.clusters, args.spread, seed=3)
    nlist = args.nlist
    kinds = {
        "flat": {},
        "ivf_flat": {"nlist": nlist, "nprobe": args.nprobe},
        "ivf_pq": {"nlist": nlist, "nprobe": args.nprobe, "pq_m": args.pq_m,
                   "pq_refine_k_factor": 8},
        "hnsw": {"hnsw_m": 32, "hnsw_ef_search": args.ef_search},
    }
    results = {}
    truth = None
    for kind, params in kinds.items():
        cfg = IndexConfig(kind=kind, shards=args.shards, train_sample=min(args.n, 100_000),
                          **params)
        with tempfile.TemporaryDirectory() as d:
            shards, built = build(cfg, ids, x, d)
            got, secs = search(shards, q, args.k, args.batch)
        if kind == "flat":
            truth = got
        results[kind] = {"params": params, "build_s": round(built, 2),
                         "queries_per_s": round(len(q) / secs, 1),
                         f"recall@{args.k}": round(recall(got, truth, args.k), 4),
                         "recall@10": round(recall(got, truth, 10), 4)}
        print(kind, results[kind], flush=True)
    return {"machine": f"{platform.machine()} {os.cpu_count()} cores", "n": args.n,
            "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
            "queries": args.queries, "k": args.k, "shards": args.shards, "kinds": results}


def gpu(args: argparse.Namespace) -> dict:
    import torch

    x = torch.nn.functional.normalize(torch.randn(args.n, args.dim, device="cuda"), dim=1)
    q = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, device="cuda"), dim=1)
    xh, qh = x.half(), q.half()

    def bare() -> None:
        for i in range(0, args.queries, args.batch):
            torch.topk(qh[i : i + args.batch] @ xh.T, args.k, dim=1)
        torch.cuda.synchronize()

    bare()
    t0 = time.perf_counter()
    bare()
    bare_qps = args.queries / (time.perf_counter() - t0)

    cfg = IndexConfig(kind="flat", device="cuda", shard_num_gpus=1, shards=args.shards)
    ids = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, args.n, dtype=np.int64)
    with tempfile.TemporaryDirectory() as d:
        shards, built = build(cfg, ids, x.float().cpu().numpy(), d)
        qn = q.float().cpu().numpy()
        search(shards, qn[: args.batch], args.k, args.batch)  # warm-up
        got, secs = search(shards, qn, args.k, args.batch)
    stage_qps = args.queries / secs
    # Correctness on the card: the stage's ids vs an fp32 exact search of the same data.
    exact = torch.topk(q[:256] @ x.T, args.k, dim=1).indices.cpu().numpy()
    rec = recall(got[:256], ids[exact], args.k)
    return {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": args.n,
            "dim": args.dim, "k": args.k, "queries": args.queries, "batch": args.batch,
            "shards": args.shards, "bare_gemm_topk_qps": round(bare_qps, 1),
            "stage_qps": round(stage_qps, 1), "stage_over_bare": round(stage_qps / bare_qps, 3),
            f"stage_recall@{args.k}_vs_fp32_exact": round(rec, 4), "build_s": round(built, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.6)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--pq-m", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = gpu(args) if args.gpu else cpu(args)
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
