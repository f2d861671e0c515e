"""IVF-PQ training, side by side: the index stage's ``train_index`` (no polysemous training, the
``np`` suffix) against the same factory string with FAISS's default polysemous training, which
reorders each sub-quantizer's codes so that Hamming distances between codes approximate real
distances. Only a polysemous search (``polysemous_ht``) reads that order; ours never sets it.

Both train on the same clustered sample, one after the other in this process; then each index
gets the same vectors and answers the same queries, and the neighbours are compared.

    python benchmarks/index_train.py --out benchmarks/results/cpu-2core/index_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from megapairs_ray.config import IndexConfig
from megapairs_ray.stages.index import factory_string, train_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_search import clustered  # the shared data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--train-sample", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import faiss

    x = clustered(args.n, args.dim, 1000, 0.6, seed=0)
    sample = x[np.random.default_rng(0).permutation(args.n)[: args.train_sample]]
    q = x[: args.queries]
    cfg = IndexConfig(kind="ivf_pq", pq_m=args.pq_m, pq_nbits=8, nprobe=args.nprobe,
                      train_sample=args.train_sample)
    ours = factory_string(cfg, args.dim, args.n)
    polysemous = ours.replace("np", "", 1)
    result: dict = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
                    "data": {"n": args.n, "dim": args.dim, "train_sample": args.train_sample,
                             "clusters": 1000, "spread": 0.6, "queries": args.queries},
                    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "faiss": faiss.__version__},
                    "command": " ".join(sys.argv)}
    built = {}
    for name, spec in (("ours", ours), ("polysemous", polysemous)):
        t0 = time.perf_counter()
        if name == "ours":
            index = faiss.deserialize_index(np.frombuffer(train_index(cfg, sample, args.n),
                                                          dtype=np.uint8))
        else:
            index = faiss.IndexIDMap2(faiss.index_factory(args.dim, spec,
                                                          faiss.METRIC_INNER_PRODUCT))
            index.train(sample)
        train_s = time.perf_counter() - t0
        index.add_with_ids(x, np.arange(args.n, dtype=np.int64))
        faiss.extract_index_ivf(index).nprobe = args.nprobe
        _, neighbours = index.search(q, 10)
        built[name] = neighbours
        result[name] = {"factory": spec, "train_s": round(train_s, 2)}
        print(name, spec, f"train {train_s:.1f} s", flush=True)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(built["ours"],
                                                                 built["polysemous"])])
    result["neighbours_in_common_at_10"] = round(float(same), 4)
    result["ratio_train_polysemous_over_ours"] = round(
        result["polysemous"]["train_s"] / result["ours"]["train_s"], 1)
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
