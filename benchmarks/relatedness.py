"""How related the demo's mined pairs are: packaged real encoders vs random weights.

The measure. The bundled corpus is OpenClipArt, whose files sit in a category tree
(``animals/mammals/...``, ``shapes/stars/...``, ``buildings/...``); the corpus builder records
each image's source path. A mined pair (query, target) counts as related when both images come
from the same top-level category (21 in the corpus), and, stricter, from the same folder (137).
The score of a run is the share of its pairs that are related, beside the same share for two
images drawn at random from the corpus (the base rate: what mining by chance gives), and the
ratio of the two (the lift). A star paired with a church is unrelated on both counts. The
categories are coarse (a star and a heart are both ``shapes``) and some are catch-alls
(``unsorted``), so the numbers understate what a person sees; they are the same yardstick for
every run.

The runs. The same corpus, the same stages (ingest, embed, index, mine through ``megapairs
run``) and the same mining rules (k, targets per query, hard negatives; every image a query),
in turn with:

- ``packaged``: ``configs/tiny.yaml`` as shipped: EfficientNet-Lite0 (ImageNet) on the images,
  all-MiniLM-L6-v2 on the captions, their calibrated windows;
- ``random_same_windows``: the same two architectures with random weights, the same windows;
- ``random_own_windows``: random weights with windows calibrated for them by the same rule
  (``benchmarks/space_windows.py``), since random features have another similarity scale;
- ``before``: the demo before this profile: tiny random CLIP (image and caption towers) and a
  tiny random DINOv2, the paper's window (0.8, 0.96) in every space.

    python benchmarks/relatedness.py --out benchmarks/results/cpu-2core/relatedness.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from space_windows import read_corpus, windows_for  # noqa: E402

from megapairs_ray.train.probe import base_rate  # noqa: E402

# Every image a query (the demo samples 40 % of them to bound its synthesis time): more pairs,
# a tighter estimate of the same shares.
ALL_QUERIES = ["-s", "mine.query_fraction=1.0"]
RANDOM = ["embed.spaces.efficientnet_image.encoder.checkpoint=null",
          "embed.spaces.minilm_text.encoder.pretrained=false"]
TINY_CLIP = {"model": "mp-tiny-clip", "pretrained": None}
BEFORE_SPACES = [  # configs/tiny.yaml's spaces until the packaged encoders replaced them
    {"name": "clip_image", "encoder": {"kind": "open_clip_image", **TINY_CLIP}},
    {"name": "dino_image", "encoder": {
        "kind": "transformers_image", "model": "mp-tiny-dinov2", "pretrained": False,
        "image_size": 56, "config_overrides": {
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "patch_size": 14, "image_size": 56}}},
    {"name": "clip_text", "encoder": {"kind": "open_clip_text", **TINY_CLIP}},
]


def categories(corpus: Path) -> dict[str, tuple[str, str]]:
    """key -> (top-level category, folder) from the corpus's own metadata."""
    out = {}
    for r in read_corpus(corpus):
        parts = r["source"].split("/")  # png/<category>/.../<file>.png
        out[r["key"]] = (parts[1], "/".join(parts[1:-1]))
    return out


def score(run_dir: Path, cats: dict[str, tuple[str, str]]) -> dict[str, Any]:
    images = pq.read_table(run_dir / "images", columns=["image_id", "key"]).to_pylist()
    key_of = {r["image_id"]: r["key"] for r in images}
    pairs = pq.read_table(run_dir / "pairs").to_pylist()
    out: dict[str, Any] = {"pairs": len(pairs),
                           "queries_with_pairs": len({p["query_id"] for p in pairs})}
    if not pairs:
        return out

    def shares(rows: list[dict[str, Any]]) -> dict[str, float]:
        q = [cats[key_of[p["query_id"]]] for p in rows]
        t = [cats[key_of[p["target_id"]]] for p in rows]
        return {"same_category": round(float(np.mean([a[0] == b[0] for a, b in zip(q, t)])), 3),
                "same_folder": round(float(np.mean([a[1] == b[1] for a, b in zip(q, t)])), 3)}

    out.update(shares(pairs))
    by_space: dict[str, list[dict[str, Any]]] = {}
    for p in pairs:
        by_space.setdefault(p["spaces"][0], []).append(p)
    out["by_first_space"] = {s: {"pairs": len(rows), **shares(rows)}
                             for s, rows in sorted(by_space.items())}
    return out


def run_pipeline(run_dir: Path, corpus: Path, overrides: list[str]) -> float:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(ROOT / ".venv" / "bin" / "megapairs"), "run", "-c",
           str(ROOT / "configs" / "tiny.yaml"), "-s", f"run_dir={run_dir}",
           "-s", f"input.uris=[{corpus}]", "--stages", "ingest,embed,index,mine",
           *ALL_QUERIES]
    for o in overrides:
        cmd += ["-s", o]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - t0


def main() -> None:
    from megapairs_ray.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "relatedness"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    corpus, work = Path(args.corpus), Path(args.work)
    cats = categories(corpus)
    top = [c[0] for c in cats.values()]
    folder = [c[1] for c in cats.values()]
    random_cfg = load_config(ROOT / "configs" / "tiny.yaml", RANDOM)
    calibrated = windows_for(random_cfg, corpus, random_cfg.mine.k)["spaces"]
    own = [f"embed.spaces.{name}.window={s['window']}" for name, s in calibrated.items()]
    variants = {
        "packaged": [],
        "random_same_windows": RANDOM,
        "random_own_windows": [*RANDOM, *own],
        "before": [f"embed.spaces={yaml.safe_dump(BEFORE_SPACES, default_flow_style=True)}"
                   .replace("\n", " ")],
    }
    runs = {}
    for name, overrides in variants.items():
        seconds = run_pipeline(work / name, corpus, overrides)
        cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
        runs[name] = {"seconds_ingest_to_mine": round(seconds, 1),
                      "spaces": {s.name: {"encoder": s.encoder.label(), "window": s.window}
                                 for s in cfg.embed.spaces},
                      **score(work / name, cats)}
        print(name, json.dumps(runs[name]), flush=True)
    base = {"same_category": round(base_rate(top), 3), "same_folder": round(base_rate(folder), 3)}
    for r in runs.values():
        if r["pairs"]:
            r["lift"] = {k: round(r[k] / base[k], 2) for k in base}
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores "
                         f"({platform.processor() or 'cpu'})",
              "images": len(cats), "categories": len(set(top)), "folders": len(set(folder)),
              "base_rate": base, "random_own_windows_calibration": calibrated, "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
