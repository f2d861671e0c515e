"""autofaiss 2.18 vs our index stage: build time and recall@10 at equal index memory.

Same vectors on both sides: ``--n`` x ``--dim`` float32, clustered on the unit sphere
(``index_search.clustered``: real embeddings cluster), written once to ``emb/emb.npy``; 2,000
held-out queries from the same mixture. Exact top-10 (FAISS ``IndexFlatIP``) is the truth.

Ours: the index stage's own code path (``train_index`` on the config's training sample ->
``build_shard`` -> ``save_shard``; searched through ``IndexShard.search``, which completes exact
ties, the mining path) with the paper profile's kind and search settings (``configs/paper.yaml``:
IVF-PQ, ``pq_m`` 64, no re-ranking, ``nprobe`` 64; ``nlist`` is the config's default for this
size, 4 sqrt(n)), one shard. Its size is the shard file's bytes.

Peer: autofaiss's ``build_index`` in the peers venv (``--peers-venv`` or ``$PEERS_VENV``, default
``data/bench/peers-venv``; see peer_clip_inference.py for how it is made) on the same ``.npy``,
with ``max_index_memory_usage`` set to our index's size in bytes, ``metric_type`` ip, 2 cores; it
picks the index kind and tunes its search parameters itself (``max_index_query_time_ms``, default
10 ms), and its build time includes that tuning, as a user of it gets. One shim: autofaiss
2.18 builds its OPQ indexes with ``faiss.OPQMatrix(d, M=..., d2=...)``, which FAISS 1.15's
bindings refuse (keyword arguments); the driver makes the same call positionally. Its index
file is then searched in this process with the same FAISS version (1.15.1 on both sides) and
the queries used for ours: once with the parameters autofaiss chose, and once with ``nprobe``
equal to ours (the same search effort), each with recall@10 and queries/s.

Both are timed in one run, one after the other; each build is one process's wall time (ours
in this process, theirs inside its own process around ``build_index``; that process's start and
imports are reported apart).

    .venv/bin/python benchmarks/peer_autofaiss.py --n 200000 --dim 768 \\
        --out benchmarks/results/cpu-2core/peer_autofaiss.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from index_search import clustered, recall  # noqa: E402  (the shared data and metric)

THEIRS = r"""
import json, sys, time
t_start = time.perf_counter()
import faiss
# autofaiss 2.18 calls faiss.OPQMatrix(d, M=..., d2=...); FAISS 1.15's bindings take these
# positionally only (TypeError: unexpected keyword argument 'M'). The same call, positional:
_OPQMatrix = faiss.OPQMatrix
faiss.OPQMatrix = lambda d=0, M=1, d2=-1: _OPQMatrix(d, M, d2)
from autofaiss import build_index
t_imported = time.perf_counter()
emb, index_path, infos_path, memory = sys.argv[1:5]
t0 = time.perf_counter()
index, infos = build_index(embeddings=emb, index_path=index_path, index_infos_path=infos_path,
                           max_index_memory_usage=memory, current_memory_available="16G",
                           metric_type="ip", nb_cores=2, save_on_disk=True)
built = time.perf_counter() - t0
print("RESULT " + json.dumps({"build_s": built, "import_s": t_imported - t_start,
                              "infos": infos}))
"""


def our_build(cfg: Any, ids: np.ndarray, x: np.ndarray, folder: Path) -> dict[str, Any]:
    from megapairs_ray.stages.index import (
        ShardMeta,
        build_shard,
        factory_string,
        id_range,
        save_shard,
        shard_uri,
        train_index,
    )

    t0 = time.perf_counter()
    sample = x[np.random.default_rng(0).permutation(len(x))[: cfg.train_sample]]
    trained = train_index(cfg, sample, len(x))
    t_train = time.perf_counter()
    index = build_shard(trained, ids, x)
    t_add = time.perf_counter()
    lo, hi = id_range(0, 1)
    factory = factory_string(cfg, x.shape[1], len(x))
    save_shard(str(folder), index, ShardMeta("bench", 0, 1, cfg.kind, factory, x.shape[1],
                                             len(x), lo, hi))
    t_end = time.perf_counter()
    return {"factory": factory, "build_s": round(t_end - t0, 2),
            "train_s": round(t_train - t0, 2), "add_s": round(t_add - t_train, 2),
            "save_s": round(t_end - t_add, 2),
            "index_bytes": os.path.getsize(shard_uri(str(folder), 0))}


def timed_search(fn: Any, q: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, float]:
    fn(q[:batch])  # warm-up
    out, t0 = [], time.perf_counter()
    for i in range(0, len(q), batch):
        out.append(fn(q[i : i + batch]))
    return np.concatenate(out), len(q) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.6)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--peers-venv",
                    default=os.environ.get("PEERS_VENV", str(ROOT / "data" / "bench" /
                                                             "peers-venv")))
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "peer-autofaiss"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core" /
                                         "peer_autofaiss.json"))
    args = ap.parse_args()
    import faiss

    from megapairs_ray.config import IndexConfig
    from megapairs_ray.stages.index import IndexShard

    venv, work = Path(args.peers_venv).resolve(), Path(args.work).resolve()
    (work / "emb").mkdir(parents=True, exist_ok=True)
    (work / "ours").mkdir(exist_ok=True)
    x = clustered(args.n, args.dim, args.clusters, args.spread, seed=1)
    q = clustered(args.queries, args.dim, args.clusters, args.spread, seed=3)
    np.save(work / "emb" / "emb.npy", x)
    ids = np.arange(args.n, dtype=np.int64)  # positions: autofaiss numbers vectors this way

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    truth = flat.search(q, args.k)[1]
    del flat

    cfg = IndexConfig(kind="ivf_pq", shards=1, pq_m=args.pq_m, pq_refine=False,
                      nprobe=args.nprobe)
    print("ours: build", flush=True)
    ours = our_build(cfg, ids, x, work / "ours")
    memory = f"{ours['index_bytes']}B"
    shard = IndexShard(str(work / "ours"), 0, cfg)
    got, qps = timed_search(lambda b: shard.search(b, args.k)[1], q)
    ours.update({"config": {"kind": cfg.kind, "pq_m": cfg.pq_m, "pq_nbits": cfg.pq_nbits,
                            "pq_refine": cfg.pq_refine, "nprobe": cfg.nprobe,
                            "train_sample": cfg.train_sample, "shards": 1},
                 f"recall@{args.k}": round(recall(got, truth, args.k), 4),
                 "queries_per_s": round(qps, 1)})
    print(f"ours: {ours}", flush=True)

    index_path, infos_path = work / "theirs.index", work / "theirs_infos.json"
    cmd = [str(venv / "bin" / "python"), "-c", THEIRS, str(work / "emb"), str(index_path),
           str(infos_path), memory]
    print(f"theirs: autofaiss build_index, max_index_memory_usage={memory}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"autofaiss failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    infos = res["infos"]
    index = faiss.read_index(str(index_path))
    faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    got_t, qps_t = timed_search(lambda b: index.search(b, args.k)[1], q)
    ivf = faiss.try_extract_index_ivf(index)
    theirs: dict[str, Any] = {
        "index_key": infos["index_key"], "index_param": infos["index_param"],
        "build_s": round(res["build_s"], 2), "process_wall_s": round(wall, 2),
        "import_s": round(res["import_s"], 2), "index_bytes": index_path.stat().st_size,
        "max_index_memory_usage": memory, f"recall@{args.k}": round(recall(got_t, truth,
                                                                          args.k), 4),
        "queries_per_s": round(qps_t, 1), "infos": infos,
        # autofaiss's own timers: where its build time goes
        "log_timings": [ln.split("[INFO]: ", 1)[-1].strip() for ln in r.stderr.splitlines()
                        if '>>> Finished "' in ln]}
    if ivf is not None:
        theirs["nprobe_chosen"] = ivf.nprobe
        ivf.nprobe = args.nprobe
        got_m, qps_m = timed_search(lambda b: index.search(b, args.k)[1], q)
        theirs[f"at_our_nprobe_{args.nprobe}"] = {
            f"recall@{args.k}": round(recall(got_m, truth, args.k), 4),
            "queries_per_s": round(qps_m, 1)}
    print(f"theirs: {theirs}", flush=True)

    probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
             "['autofaiss', 'faiss-cpu', 'numpy']}))")
    their_versions = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe],
                                               capture_output=True, text=True).stdout)
    import importlib.metadata as md

    result = {
        "what": "autofaiss 2.18 build_index vs megapairs-ray's index stage (IVF-PQ as the paper "
                "profile), same vectors, autofaiss given our index's size as its memory budget",
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
                    "shared": "yes: another engineer's Ray tests ran on the machine at the same "
                              "time"},
        "versions": {"ours": {p: md.version(p) for p in ("megapairs-ray", "faiss-cpu", "numpy")},
                     "theirs": their_versions},
        "data": {"n": args.n, "dim": args.dim, "clusters": args.clusters,
                 "spread": args.spread, "queries": args.queries, "k": args.k,
                 "truth": "exact IndexFlatIP"},
        "commands": {"this": "python benchmarks/peer_autofaiss.py " + " ".join(sys.argv[1:])
                     .replace(str(venv), "$PEERS_VENV").replace(str(work), "WORK"),
                     "theirs": f"$PEERS_VENV/bin/python -c <THEIRS in this file> WORK/emb "
                               f"WORK/theirs.index WORK/theirs_infos.json {memory}"},
        "order": ["ours", "theirs"],
        "ours": ours,
        "theirs": theirs,
        "ratio_build_time_ours_over_theirs": round(ours["build_s"] / theirs["build_s"], 3),
        "ratio_theirs_build_over_ours": round(theirs["build_s"] / ours["build_s"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # autofaiss reports its index path: the work folder is named, not spelled out
    Path(args.out).write_text(json.dumps(result, indent=1).replace(str(work), "WORK") + "\n")
    print(json.dumps({k: result[k] for k in ("ours", "theirs")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
