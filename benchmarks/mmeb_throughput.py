"""Is an MMEB run embedding-bound? ``megapairs eval --benchmark mmeb`` against the bare encoder.

Builds an MMEB-shaped folder from the bundled corpus (four datasets in the published layout:
classification-like rows whose candidates are 100 shared label texts, text-to-image and
image-to-image retrieval rows over a shared image pool, and grounding-like rows with image
candidates that carry an instruction), then times, on the same distinct items and with the same
compute (one actor of one CPU; the bare loop on one thread):
- **ours**: ``run_mmeb`` end to end: reading the parquets, one Ray Data actor pool for every
  dataset, scoring and the report;
- **bare**: ``RetrieverEncoder`` over the same distinct (text, image) items in this process,
  reading and decoding included, no Ray, no scoring.

    python benchmarks/mmeb_throughput.py --rows 200 \
        --out benchmarks/results/cpu-2core/mmeb_throughput.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

IMG = "<|image_1|>\n"


def corpus_images(n: int) -> list[bytes]:
    """``n`` JPEGs from the bundled corpus (``make demo`` builds it), or generated ones."""
    out: list[bytes] = []
    for tar in sorted(Path("data/corpus").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".jpg"):
                    out.append(t.extractfile(m).read())  # type: ignore[union-attr]
                    if len(out) == n:
                        return out
    rng = np.random.default_rng(0)
    while len(out) < n:
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def build(root: Path, rows: int) -> int:
    """Four datasets of ``rows`` rows each; returns the number of distinct items."""
    pool = corpus_images(rows * 2)
    images = root / "eval_images"
    paths = []
    for i, data in enumerate(pool):
        p = f"pool/{i}.jpg"
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        (images / p).write_bytes(data)
        paths.append(p)
    labels = [f"a picture of class {k}" for k in range(100)]
    rng = np.random.default_rng(0)
    sets: dict[str, list[dict[str, Any]]] = {
        "ImageNet-1K": [{"qry_text": f"{IMG}Represent the given image for classification",
                         "qry_img_path": paths[i], "tgt_text": list(rng.permutation(labels)),
                         "tgt_img_path": [""] * len(labels)} for i in range(rows)],
        "MSCOCO_t2i": [{"qry_text": f"Find me an everyday image that matches: caption {i}",
                        "qry_img_path": "",
                        "tgt_text": [f"{IMG}Represent the given image."] * 10,
                        "tgt_img_path": [paths[(i + j) % len(paths)] for j in range(10)]}
                       for i in range(rows)],
        "NIGHTS": [{"qry_text": IMG, "qry_img_path": paths[rows + i], "tgt_text": [""] * 10,
                    "tgt_img_path": [paths[(i + 7 * j) % len(paths)] for j in range(10)]}
                   for i in range(rows)],
        "RefCOCO": [{"qry_text": f"{IMG}Select the object: thing {i}",
                     "qry_img_path": paths[i], "tgt_text": [f"{IMG}Represent the object"] * 5,
                     "tgt_img_path": [paths[(3 * i + j) % len(paths)] for j in range(5)]}
                    for i in range(rows)],
    }
    items = set()
    for name, rs in sets.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rs), root / name / "test-00000-of-00001.parquet")
        for r in rs:
            items.add((r["qry_text"], r["qry_img_path"]))
            items.update(zip(r["tgt_text"], r["tgt_img_path"]))
    return len(items)


def bare(checkpoint: str, root: Path, batch_size: int) -> tuple[float, int]:
    """Seconds to embed every distinct item in-process, one thread."""
    from megapairs_ray.models.retriever import RetrieverEncoder
    from megapairs_ray.train.mmeb import dataset_folders, query_text, read_subset

    torch.set_num_threads(1)
    enc = RetrieverEncoder(checkpoint, batch_size=batch_size, threads=1)
    items = [it for d in dataset_folders(str(root)) for it in read_subset(str(root), d).items]
    start = time.perf_counter()
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        raw = [(root / "eval_images" / p).read_bytes() if p else None for _, p in chunk]
        decoded = enc.decode([r for r in raw if r is not None])
        it = iter(decoded)
        enc.queries_of_decoded([next(it) if r is not None else None for r in raw],
                               [query_text(t) for t, _ in chunk])
    return time.perf_counter() - start, len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200, help="rows per dataset")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import ray
    from transformers import AutoTokenizer

    from megapairs_ray.models.towers import MMRetTowers
    from megapairs_ray.train.config import TowersSpec
    from megapairs_ray.train.mmeb import EncoderSettings, run_mmeb

    work = Path(tempfile.mkdtemp(prefix="mmeb-bench-"))
    checkpoint = work / "towers"
    model = MMRetTowers.from_towers(**TowersSpec().model_dump(), seed=0)
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(model.tokenizer_source).save_pretrained(checkpoint)
    root = work / "mmeb"
    distinct = build(root, args.rows)

    bare_s, n = bare(str(checkpoint), root, args.batch_size)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    enc = EncoderSettings(batch_size=args.batch_size, threads=1, num_cpus=1)
    start = time.perf_counter()
    report = run_mmeb(str(checkpoint), str(root), encoder=enc, log=lambda *_: None)
    ours_s = time.perf_counter() - start
    ray.shutdown()
    doc = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count(), "torch": torch.__version__},
        "model": "towers family (EfficientNet-Lite0 160 px + all-MiniLM-L6-v2), fresh "
                 "projections",
        "datasets": report["datasets"], "rows": args.rows * report["datasets"],
        "distinct_items": distinct, "items_embedded": n,
        "bare_s": bare_s, "bare_items_per_s": n / bare_s,
        "ours_s": ours_s, "ours_items_per_s": n / ours_s,
        "ours_vs_bare": bare_s / ours_s,
        "note": "ours includes Ray start of the actor pool, parquet reading, scoring and the "
                "report; bare is the encoder alone on the same items (one thread each)",
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
