"""Mining fidelity: how close each index setting's mined pairs come to exact mining, at what cost.

Three spaces of clustered vectors (768, 1024 and 768 dimensions, as CLIP image, DINOv2-L and CLIP
text), each built and searched through the index stage's own code (``train_index`` ->
``build_shard`` -> ``IndexShard`` -> ``merge_topk``), then mined with the paper profile's rules
(``mine_batch``: k 32, windows (0.8, 0.96), 3 targets, 5-10 hard negatives) for a seeded 2 %
query sample, as ``mine.query_fraction`` 0.02 draws it. Exact flat search is the reference.

Reported per setting: recall@k of the neighbour lists; the share of exact mining's pairs it
mines; the share of its own pairs whose true similarity (float64 inner product of the stored fp16
vectors) lies outside their window; the largest error of a recorded similarity; build time,
search time and queries/s; bytes on disk (the unrefined setting searches the refined file's PQ
part, so its figure is that file's), and a memory-mapped shard's resident memory and touched
file-backed pages, measured in a fresh process after it searches every query.

The vectors: real embeddings cluster at many scales, and mining lives at the top of each
neighbour list, so each cluster draws its own spread (within-cluster cosines from ~0.65 to
~0.95) and 2 % of the images are near-copies of another (cosine > 0.97: the near-duplicates the
window's upper edge cuts). The bundled corpus (~1,000 real images, embedded by the packaged
encoders) is too small for this question; ``benchmarks/space_windows.py`` measures it.

    python benchmarks/mining_fidelity.py --n 200000 \
        --out benchmarks/results/cpu-2core/mining_fidelity.json
    python benchmarks/mining_fidelity.py --n 1000000 --device cuda   # a GPU machine: exact mode
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from megapairs_ray.config import IndexConfig, MineConfig
from megapairs_ray.stages.index import (
    IndexShard,
    ShardMeta,
    build_shard,
    merge_topk,
    save_shard,
    shard_uri,
    train_index,
)
from megapairs_ray.stages.mine import is_query, mine_batch

SPACES = {"clip_image": 768, "dino_image": 1024, "clip_text": 768}
RULES = {"k": 32, "targets_per_query": 3, "min_hard_negatives": 5, "max_hard_negatives": 10}
WINDOW = (0.8, 0.96)
NPROBE = 64  # the paper profile's


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors, stored fp16 as the embed stage writes them, from a hierarchy: a mean
    direction every image shares (random pairs at cosine ~0.2, as CLIP's are), 20 themes of
    20 topics, each of groups of ~20 images around a group centre (group mates at cosine ~0.7
    to ~0.95, each group its own spread), and 2 % near-copies of another image (> 0.97)."""
    rng = np.random.default_rng(seed)

    def noise(rows: int) -> np.ndarray:
        return rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)

    mean = noise(1)[0] / np.linalg.norm(noise(1)[0]) * np.sqrt(0.2)
    themes = mean + np.sqrt(0.25) * noise(20)
    topics = themes[rng.integers(0, 20, 400)] + np.sqrt(0.25) * noise(400)
    groups = max(1, n // 20)
    centres = topics[rng.integers(0, 400, groups)] + np.sqrt(0.15) * noise(groups)
    label = rng.integers(0, groups, n)
    spread = np.sqrt(rng.uniform(0.03, 0.3, groups)).astype(np.float32)[label]
    x = centres[label] + spread[:, None] * noise(n)
    copies = rng.random(n) < 0.02
    x[copies] = x[rng.integers(0, n, int(copies.sum()))] + 0.1 * noise(int(copies.sum()))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


SETTINGS: dict[str, dict[str, Any]] = {
    "flat (exact)": {"kind": "flat"},
    "ivf_pq, no refine (the paper profile before)": {"kind": "ivf_pq", "pq_refine": False},
    "ivf_pq + fp16 refine x4": {"kind": "ivf_pq", "pq_refine": True, "pq_refine_k_factor": 4},
    "ivf_pq + fp16 refine x8": {"kind": "ivf_pq", "pq_refine": True, "pq_refine_k_factor": 8},
    "ivf_flat": {"kind": "ivf_flat"},
    "hnsw": {"kind": "hnsw"},
    # Only with --device cuda: exact search on the GPU (fp16 vectors, exact re-scoring).
    "flat on cuda (the exact mode)": {"kind": "flat", "device": "cuda"},
}
# Built once per space; the others are the same index searched another way.
BUILDS = {"flat": "flat (exact)", "ivf_pq": "ivf_pq + fp16 refine x8", "ivf_flat": "ivf_flat",
          "hnsw": "hnsw"}


def index_config(setting: dict[str, Any]) -> IndexConfig:
    cfg = {"shards": 1, "nprobe": NPROBE, "pq_m": 64, "pq_nbits": 8, **setting}
    if cfg["kind"] == "ivf_pq":
        cfg["pq_refine"] = True  # one build: the unrefined setting searches its PQ part alone
    if cfg.get("device") == "cuda":
        cfg["shard_num_gpus"] = 1
    return IndexConfig(**cfg)


def build(cfg: IndexConfig, ids: np.ndarray, x: np.ndarray, folder: str) -> float:
    t0 = time.perf_counter()
    sample = x[np.random.default_rng(0).permutation(len(x))[: cfg.train_sample]]
    index = build_shard(train_index(cfg, sample, len(x)), ids, x)
    save_shard(folder, index, ShardMeta("bench", 0, 1, cfg.kind, "", x.shape[1], len(ids),
                                        int(ids.min()), int(ids.max())))
    return time.perf_counter() - t0


class PQOnly:
    """A refined IVF-PQ shard searched by its PQ codes alone (no re-scoring): the scores a miner
    saw with ``pq_refine: false``, on the same trained quantizer, codebooks and codes."""

    def __init__(self, refined: Any) -> None:
        import faiss

        self.refined = refined  # owns the base index
        self.base = faiss.downcast_index(refined.index).base_index
        self.ids = faiss.vector_to_array(refined.id_map)

    def search(self, q: np.ndarray, m: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.base.search(q, m)
        return scores, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)


def search(shard: IndexShard, q: np.ndarray, k: int, batch: int = 256,
           ) -> tuple[np.ndarray, np.ndarray, float]:
    s_out, i_out = [], []
    t0 = time.perf_counter()
    for lo in range(0, len(q), batch):
        s, i = merge_topk([shard.search(q[lo : lo + batch], k)], k)
        s_out.append(s)
        i_out.append(i)
    return np.concatenate(s_out), np.concatenate(i_out), time.perf_counter() - t0


RESIDENT = """
import json, sys, numpy as np, psutil
from megapairs_ray.config import IndexConfig
from megapairs_ray.stages.index import IndexShard
folder, cfg, queries = sys.argv[1], IndexConfig(**json.loads(sys.argv[2])), np.load(sys.argv[3])
p = psutil.Process()
before = p.memory_info()
shard = IndexShard(folder, 0, cfg, mmap=True)
for lo in range(0, len(queries), 256):
    shard.search(queries[lo : lo + 256], 32)
m = p.memory_info()
print(json.dumps({"resident_bytes": (m.rss - m.shared) - (before.rss - before.shared),
                  "mapped_pages_touched_bytes": m.shared - before.shared}))
"""


def resident(folder: str, cfg: IndexConfig, queries_file: str) -> dict[str, int]:
    """A mapped shard's own memory after searching, in a fresh process (file-backed pages the
    OS can drop are counted apart); nothing where psutil is not installed (GPU machines)."""
    if importlib.util.find_spec("psutil") is None:
        return {}
    out = subprocess.run([sys.executable, "-c", RESIDENT, folder, cfg.model_dump_json(),
                          queries_file], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mine(query_ids: np.ndarray, neighbours: dict[str, tuple[np.ndarray, np.ndarray]],
         ) -> list[dict[str, Any]]:
    cfg = MineConfig(windows=dict.fromkeys(SPACES, WINDOW), **RULES)
    pairs, _ = mine_batch(query_ids.tolist(), neighbours, cfg)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--query-fraction", type=float, default=0.02)
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="FAISS threads (0: its default)")
    ap.add_argument("--kinds", default=",".join(BUILDS),
                    help="index kinds to build and compare (flat, the reference, always runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    kinds = ["flat", *(k for k in args.kinds.split(",") if k != "flat")]
    unknown = sorted(set(kinds) - set(BUILDS))
    if unknown:
        ap.error(f"--kinds: unknown {unknown}; known: {sorted(BUILDS)}")
    settings = [name for name, s in SETTINGS.items()
                if s["kind"] in kinds and s.get("device", "cpu") in ("cpu", args.device)]
    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    ids = np.random.default_rng(7).integers(-(2**63), 2**63 - 1, args.n, dtype=np.int64)
    is_q = is_query(ids, args.query_fraction, seed=0)
    query_ids = ids[is_q]
    k = RULES["k"]
    runs: dict[str, dict[str, Any]] = {name: {"spaces": {}} for name in settings}
    neighbours: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {n: {} for n in settings}
    stored: dict[str, np.ndarray] = {}
    work = tempfile.mkdtemp(prefix="mining-fidelity-")
    for seed, (space, dim) in enumerate(SPACES.items()):
        x = vectors(args.n, dim, seed)
        stored[space] = x
        q = x[is_q]
        qfile = os.path.join(work, f"{space}-queries.npy")
        np.save(qfile, q)
        for kind in kinds:
            owner = BUILDS[kind]
            cfg = index_config({**SETTINGS[owner], "train_sample": args.train_sample})
            folder = os.path.join(work, space, kind)
            built = build(cfg, ids, x, folder)
            print(f"{space} {kind}: built in {built:.1f} s", flush=True)
            for name in settings:
                setting = SETTINGS[name]
                if setting["kind"] != kind:
                    continue
                scfg = index_config(setting)
                shard = IndexShard(folder, 0, scfg)
                if kind == "ivf_pq" and not setting["pq_refine"]:
                    shard.index = PQOnly(shard.index)
                scores, nbrs, secs = search(shard, q, k)
                neighbours[name][space] = (scores, nbrs)
                row = {"build_s": round(built, 2), "search_s": round(secs, 2),
                       "queries_per_s": round(len(q) / secs, 1),
                       "disk_bytes": os.path.getsize(shard_uri(folder, 0))}
                if setting.get("pq_refine", True) and setting.get("device") != "cuda":
                    row.update(resident(folder, scfg, qfile))
                runs[name]["spaces"][space] = row
                print(f"  {name}: {json.dumps(row)}", flush=True)
                del shard
    exact_name = "flat (exact)"
    exact_pairs = mine(query_ids, neighbours[exact_name])
    exact_keys = {(p["query_id"], p["target_id"]) for p in exact_pairs}
    exact_full = {(p["query_id"], p["target_id"]): p["hard_negatives"] for p in exact_pairs}
    pos = {int(i): r for r, i in enumerate(ids)}
    for name in settings:
        got = neighbours[name]
        rec = {s: float(np.mean([len(set(a) & set(b)) / k for a, b in
                                 zip(got[s][1], neighbours[exact_name][s][1])]))
               for s in SPACES}
        pairs = mine(query_ids, got)
        keys = {(p["query_id"], p["target_id"]) for p in pairs}
        errors, outside = [], 0
        for p in pairs:
            for space, sim in zip(p["spaces"], p["similarities"]):
                v = stored[space]
                true = float(v[pos[p["query_id"]]].astype(np.float64)
                             @ v[pos[p["target_id"]]].astype(np.float64))
                errors.append(abs(sim - true))
                outside += not WINDOW[0] < true < WINDOW[1]
        sims = sum(len(p["spaces"]) for p in pairs)
        runs[name].update({
            "recall_at_k": {s: round(v, 4) for s, v in rec.items()},
            "pairs": len(pairs),
            "share_of_exact_pairs_mined": round(len(keys & exact_keys) / len(exact_keys), 4),
            # ... with the same hard negatives, in the same order, too
            "share_of_exact_pairs_mined_identically": round(sum(
                exact_full.get((p["query_id"], p["target_id"])) == p["hard_negatives"]
                for p in pairs) / len(exact_keys), 4),
            "same_pairs_as_exact": round(len(keys & exact_keys) / max(1, len(keys | exact_keys)),
                                         4),
            "similarities_outside_window": outside,
            "share_outside_window": round(outside / max(1, sims), 4),
            "max_similarity_error": float(f"{max(errors, default=0.0):.3g}")})
        print(name, json.dumps({k: v for k, v in runs[name].items() if k != "spaces"}),
              flush=True)
    doc = {"benchmark": "mining_fidelity", "machine": {
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "processor": platform.processor(), "faiss_threads": faiss.omp_get_max_threads(),
        "device": args.device},
        "versions": {"faiss": faiss.__version__, "numpy": np.__version__},
        "data": {"n": args.n, "spaces": SPACES, "queries": int(is_q.sum()),
                 "query_fraction": args.query_fraction, "vectors": vectors.__doc__.strip()},
        "rules": {**RULES, "window": WINDOW},
        "index": {"nlist": "4·√n", "nprobe": NPROBE, "pq_m": 64, "pq_nbits": 8,
                  "train_sample": args.train_sample, "hnsw_m": IndexConfig().hnsw_m,
                  "hnsw_ef_search": IndexConfig().hnsw_ef_search, "shards": 1},
        "reference": exact_name, "exact_pairs": len(exact_pairs), "settings": runs}
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
