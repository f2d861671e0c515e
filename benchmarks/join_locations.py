"""Image locations joined to pairs, the two ways ``pipeline/locations.py`` has: against one
broadcast copy of the images table (small runs) and through Ray Data's hash join (large ones),
side by side on the same synthetic run directory, at several sizes.

For each size: an images table of N rows (ids and locations, in parts of 10,000 rows, as ingest
writes them) and N/2 pairs (as mine writes them), on local disk. Each way is timed end to end
(``Locations.of`` plus the join, materialized), ``--repeats`` times on one Ray instance; the
first repeat of each way carries its start-up (worker processes, the hash join's aggregator
actors) and is reported apart. Both ways' rows are checked equal.

    python benchmarks/join_locations.py --sizes 1000 100000 --repeats 3 \
        --out benchmarks/results/cpu-2core/join_locations.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
PART_ROWS = 10_000


def build(run_dir: Path, n: int, seed: int = 0) -> None:
    """``RUN/images`` with n rows and ``RUN/pairs`` with n // 2 pairs naming them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(-2**62, 2**62, n)
    for sub in ("images", "pairs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(range(0, n, PART_ROWS)):
        part = ids[s:s + PART_ROWS]
        pq.write_table(pa.table({
            "image_id": part, "format_kind": ["tar"] * len(part),
            "file_uri": [f"/data/corpus/shard-{(s + i) // 1000:05d}.tar"
                         for i in range(len(part))],
            "offset": np.arange(len(part), dtype=np.int64) * 4096,
            "length": np.full(len(part), 4000, np.int64),
            "row": pa.nulls(len(part), pa.int64())}), run_dir / "images" / f"{k:05d}.parquet")
    m = n // 2
    q, t = rng.choice(ids, m), rng.choice(ids, m)
    for k, s in enumerate(range(0, m, PART_ROWS)):
        sl = slice(s, s + PART_ROWS)
        size = len(q[sl])
        pq.write_table(pa.table({
            "pair_id": np.arange(s, s + size, dtype=np.int64), "query_id": q[sl],
            "target_id": t[sl], "spaces": [["clip_image"]] * size,
            "similarities": [[0.9]] * size,
            "hard_negatives": [list(rng.choice(ids, 5))] * size}),
            run_dir / "pairs" / f"{k:05d}.parquet")


def _timed(run_dir: str, broadcast: bool) -> tuple[float, pa.Table]:
    from megapairs_ray.pipeline import locations
    from megapairs_ray.pipeline.datasets import read_parquet_files
    from megapairs_ray.pipeline.synth import PAIR_COLUMNS

    limit = locations.BROADCAST_MAX_BYTES
    locations.BROADCAST_MAX_BYTES = limit if broadcast else 0
    try:
        t0 = time.perf_counter()
        loc = locations.Locations.of(run_dir)
        assert (loc.copy is not None) == broadcast
        pairs = read_parquet_files(f"{run_dir}/pairs", PAIR_COLUMNS)
        assert pairs is not None
        out = pa.concat_tables(list(loc.locate_pairs(pairs).iter_batches(
            batch_format="pyarrow", batch_size=None)))
        return time.perf_counter() - t0, out
    finally:
        locations.BROADCAST_MAX_BYTES = limit


def main() -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "join_locations")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for n in args.sizes:
        run_dir = args.work / f"run-{n}"
        if not (run_dir / "images").exists():
            build(run_dir, n)
        row: dict = {"images": n, "pairs": n // 2}
        tables = {}
        for way, broadcast in (("broadcast", True), ("hash_join", False)):
            times = []
            for _ in range(args.repeats):
                seconds, tables[way] = _timed(str(run_dir), broadcast)
                times.append(seconds)
            row[way] = {"first_s": round(times[0], 3),
                        "median_after_first_s": round(statistics.median(times[1:]), 3)
                        if len(times) > 1 else None}
        a, b = (tables[w].sort_by("pair_id") for w in ("broadcast", "hash_join"))
        # Values, not types: the hash join hands strings back as large_string.
        assert a.select(b.column_names).to_pylist() == b.to_pylist(), \
            f"the two ways disagree at {n} images"
        row["rows_equal"] = True
        row["hash_join_over_broadcast"] = round(
            row["hash_join"]["median_after_first_s"] / row["broadcast"]["median_after_first_s"],
            2) if args.repeats > 1 else None
        print(json.dumps(row), flush=True)
        results.append(row)
    doc = {"benchmark": "join_locations", "machine": {
        "platform": platform.platform(), "cpus_given_to_ray": args.cpus,
        "cpu_count": os.cpu_count(), "processor": platform.processor()},
        "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
