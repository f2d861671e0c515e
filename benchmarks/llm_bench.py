"""What the LLM-step benchmarks share: marginal throughput, and the side-by-side report.

Each path runs on N and on 2N rows; the extra rows over the extra time is its steady throughput,
with fixed costs (engine start-up for Ray's stage; none for a warm bare engine) cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# rows -> (seconds, generated tokens)
Run = Callable[[int], tuple[float, int]]


def marginal(run: Run, n_small: int, n_large: int) -> dict[str, float]:
    (t1, k1), (t2, k2) = run(n_small), run(n_large)
    return {"rows_per_s": (n_large - n_small) / (t2 - t1), "tokens_per_s": (k2 - k1) / (t2 - t1),
            "seconds_small": t1, "seconds_large": t2, "end_to_end_rows_per_s": n_large / t2}


def ray_data_marginal(make_rows: Callable[[int], list[dict[str, Any]]],
                      make_processor: Callable[[], Any], n_small: int,
                      n_large: int) -> dict[str, float]:
    """``marginal`` of a ``ray.data.llm`` processor on a local 2-CPU Ray; rows are made before
    the clock starts, the processor (whose engines start on first use) after."""
    import ray

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def run(n: int) -> tuple[float, int]:
        ds = ray.data.from_items(make_rows(n))
        t0 = time.perf_counter()
        out = make_processor()(ds).take_all()
        return time.perf_counter() - t0, sum(r["generated_tokens"] for r in out)

    try:
        return marginal(run, n_small, n_large)
    finally:
        ray.shutdown()


def arguments(doc: str | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="ray.data.llm batch size")
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def report(args: argparse.Namespace, baseline_name: str, baseline: dict[str, float],
           ours: dict[str, float]) -> None:
    import vllm

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "vllm": vllm.__version__},
              "rows": [args.rows, 2 * args.rows], "batch_size": args.batch,
              baseline_name: baseline, "ray_data_llm": ours,
              "ratio_rows": ours["rows_per_s"] / baseline["rows_per_s"],
              "ratio_tokens": ours["tokens_per_s"] / baseline["tokens_per_s"]}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


def compare(doc: str | None, config: Callable[[str, int], Any],
            bare: Callable[[Any, int, int], dict[str, float]],
            through_ray: Callable[[Any, int, int], dict[str, float]],
            baseline_name: str, model_dir: str) -> None:
    """Both paths on N and 2N rows with one tiny model built in a temporary folder."""
    args = arguments(doc)
    with tempfile.TemporaryDirectory() as d:
        cfg = config(str(Path(d) / model_dir), args.batch)
        baseline = bare(cfg, args.rows, 2 * args.rows)
        ours = through_ray(cfg, args.rows, 2 * args.rows)
    report(args, baseline_name, baseline, ours)
