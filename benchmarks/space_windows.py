"""How the demo's mining windows are chosen: each space's similarity scale, measured on the
bundled corpus without looking at any label.

A window (lo, hi) keeps a neighbour as a target when lo < similarity < hi. Models differ in their
scales (EfficientNet's pooled features are non-negative, so even unrelated images score ~0.3;
MiniLM's unrelated captions score ~0.05), so one number cannot serve every space. The rule,
applied to each space's own similarities:

- ``hi``: the 5th percentile of the similarity between an image and a near-duplicate of it (the
  image shrunk to 3/4 and saved again as a JPEG at quality 70; a caption with its punctuation
  and capitals removed): above it, a neighbour is most likely the same picture (or words) again,
  which the paper's upper bound keeps out of the targets.
- ``lo``: the 99th percentile of the similarity between random pairs of distinct corpus images
  (captions) that are not near-duplicates (below ``hi``): a target is closer to its query than
  99 in 100 random images are. (Near-duplicates are left out because this corpus has many: 171
  of its 1,000 images are stars, and many captions are the same words.)

Both are rounded down to 0.01. The script also prints what the window leaves each query: the
share of queries with a candidate among their top-k neighbours.

    python benchmarks/space_windows.py --out benchmarks/results/cpu-2core/space_windows.json
    python benchmarks/space_windows.py --set embed.spaces.minilm_text.encoder.pretrained=false
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from megapairs_ray.config import RunConfig, load_config
from megapairs_ray.stages.embed import EmbedStage

ROOT = Path(__file__).resolve().parents[1]
RANDOM_PAIR_PERCENTILE = 99.0
DUPLICATE_PERCENTILE = 5.0


def read_corpus(folder: Path) -> list[dict[str, Any]]:
    """Every sample of the bundled corpus's tars: key, image bytes, caption, source path."""
    rows = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                key = name[:-5]
                meta = json.load(tar.extractfile(m))  # type: ignore[arg-type]
                image = members.get(f"{key}.jpg") or members[f"{key}.png"]
                rows.append({"key": key, "image": tar.extractfile(image).read(),  # type: ignore[union-attr]
                             "caption": meta["caption"], "source": meta["source"],
                             "format": "JPEG" if image.name.endswith(".jpg") else "PNG"})
    return rows


def near_duplicate_image(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGBA")  # on white, as the pipeline decodes it
    im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("RGB")
    im = im.resize((max(1, im.width * 3 // 4), max(1, im.height * 3 // 4)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def near_duplicate_caption(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text).lower().split())


def embed_rows(stage: EmbedStage, rows: list[dict[str, Any]], batch: int = 64,
               ) -> dict[str, np.ndarray]:
    """Every space's vectors for ``rows`` (NaN rows where a space has none)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in stage.encoders}
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        n = len(part)
        res = stage({"image_id": np.arange(n, dtype=np.int64),
                     "shard": np.array(["corpus"] * n, dtype=object),
                     "image": np.array([r["image"] for r in part], dtype=object),
                     "caption": np.array([r["caption"] for r in part], dtype=object),
                     "format": np.array([r["format"] for r in part], dtype=object),
                     "mode": np.array(["RGB"] * n, dtype=object)})
        for name in stage.encoders:
            v = res[name].astype(np.float32)
            if name in stage.text_spaces:
                v[~res["has_text"]] = np.nan
            v[res["status"] != ""] = np.nan
            out[name].append(v)
    return {name: np.concatenate(v) for name, v in out.items()}


def floor2(x: float) -> float:
    return math.floor(x * 100) / 100


def space_stats(vectors: np.ndarray, duplicates: np.ndarray, k: int) -> dict[str, Any]:
    ok = np.isfinite(vectors).all(1) & np.isfinite(duplicates).all(1)
    v, d = vectors[ok], duplicates[ok]
    sims = v @ v.T
    off = sims[~np.eye(len(v), dtype=bool)]
    dup = (v * d).sum(1)
    hi = floor2(float(np.percentile(dup, DUPLICATE_PERCENTILE)))
    lo = floor2(float(np.percentile(off[off < hi], RANDOM_PAIR_PERCENTILE)))
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :k]
    in_window = (top > lo) & (top < hi)
    return {
        "vectors": int(ok.sum()),
        "random_pair_percentiles": {str(p): round(float(np.percentile(off, p)), 4)
                                    for p in (50, 90, 99, 99.5, 99.9)},
        "random_pairs_above_hi": round(float((off >= hi).mean()), 4),
        "random_pair_percentiles_below_hi": {
            str(p): round(float(np.percentile(off[off < hi], p)), 4) for p in (90, 99, 99.9)},
        "near_duplicate_percentiles": {str(p): round(float(np.percentile(dup, p)), 4)
                                       for p in (1, 5, 50)},
        "window": [lo, hi] if lo < hi else None,
        "queries_with_a_candidate_in_top_k": round(float(in_window.any(1).mean()), 3),
        "candidates_in_top_k_mean": round(float(in_window.sum(1).mean()), 2),
    }


def windows_for(cfg: RunConfig, corpus: Path, k: int, cache: Path | None = None,
                ) -> dict[str, Any]:
    rows = read_corpus(corpus)
    stage = EmbedStage(cfg.embed)
    t0 = time.perf_counter()
    base = embed_rows(stage, rows)
    dups = embed_rows(stage, [{**r, "image": near_duplicate_image(r["image"]), "format": "JPEG",
                               "caption": near_duplicate_caption(r["caption"])} for r in rows])
    seconds = time.perf_counter() - t0
    if cache is not None:
        np.savez(cache, **{f"base_{k}": v for k, v in base.items()},
                 **{f"dup_{k}": v for k, v in dups.items()})
    return {"images": len(rows), "embed_seconds_both_passes": round(seconds, 1),
            "spaces": {s.name: {"encoder": s.encoder.label(),
                                **space_stats(base[s.name], dups[s.name], k)}
                       for s in cfg.embed.spaces}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", default=None, help="also save the vectors here (.npz)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores "
                         f"({platform.processor() or 'cpu'})",
              "config": args.config, "overrides": args.overrides,
              "rule": {"lo": f"p{RANDOM_PAIR_PERCENTILE} of random-pair similarity",
                       "hi": f"p{DUPLICATE_PERCENTILE} of near-duplicate similarity"},
              "k": cfg.mine.k,
              **windows_for(cfg, Path(args.corpus), cfg.mine.k,
                            Path(args.cache) if args.cache else None)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
