"""Is what the demo serves related to the query? Measured over loopback HTTP, as a user meets it.

The bundled corpus is OpenClipArt, whose images sit in a category tree; ``data/corpus/labels.json``
(written by ``megapairs corpus build``) gives each image's top-level category, a label that no
encoder, miner or trainer ever sees. For a sample of gallery images this sends
- an **image-only query** (the image itself): the share of its top ``k`` hits, itself left out,
  from the same category;
- a **text-only query** (the image's own caption): the same share, the captioned image left out;
and divides each share by chance: the probability that two distinct gallery images share a
category. For reference, the same share for the image tower's own nearest neighbours (the embed
stage's EfficientNet-Lite0 vectors of the demo run, exact cosine, in process).

It serves the gallery itself (``--serve-config``, a Serve config file, on a local Ray), or
queries a service already running (``--url``). Only addresses on this machine are queried.

    python benchmarks/serve_relatedness.py --serve-config configs/serve-tiny.yaml \
        --run runs/tiny --queries 200 --out benchmarks/results/cpu-2core/serve_relatedness.json
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pyarrow.parquet as pq

from megapairs_ray.train.probe import base_rate

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def gallery_rows(gallery_dir: Path) -> list[dict[str, Any]]:
    """The gallery's images: id, key, caption and where the bytes are."""
    doc = json.loads((gallery_dir / "gallery.json").read_text())
    return [r for t in doc["images_tables"] for r in pq.read_table(t).to_pylist()]


def read_image(row: dict[str, Any]) -> bytes:
    with open(row["file_uri"], "rb") as f:
        if row["offset"] is not None:
            f.seek(row["offset"])
            return f.read(row["length"])
        return f.read()


def share(hits: list[list[str]], own: list[str], label_of: dict[str, str], k: int) -> float:
    same = [label_of[h] == label_of[o] for hs, o in zip(hits, own)
            for h in [x for x in hs if x != o][:k]]
    return float(np.mean(same))


def tower_neighbours(run: Path, space: str, ids: list[str], sample: list[str], k: int,
                     ) -> list[list[str]]:
    """Exact cosine neighbours in one of the run's embedding spaces (the towers' own view)."""
    table = pq.read_table(run / "embeddings" / space)
    vid = [str(v) for v in table.column("image_id").to_pylist()]
    vec = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    keep = [i for i, v in enumerate(vid) if v in set(ids)]
    vid, vec = [vid[i] for i in keep], vec[keep]
    pos = {v: i for i, v in enumerate(vid)}
    q = vec[[pos[s] for s in sample]]
    order = np.argsort(-(q @ vec.T), axis=1)[:, : k + 1]
    return [[vid[j] for j in row] for row in order]


def screenshot(url: str, image: bytes, text: str, out: Path) -> None:
    """The search page in Debian's Chromium, answering a query made through its own form."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.NamedTemporaryFile(suffix=".png") as f, sync_playwright() as p:
        f.write(image)
        f.flush()
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            page.goto(url)
            page.set_input_files("#image", f.name)
            if text:
                page.fill("#text", text)
            page.select_option("#top_k", "12")
            page.click("#go")
            page.wait_for_function("document.body.dataset.searches === '1'", timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('#results img')].every("
                                   "i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve-config", type=Path, help="Serve config to deploy on a local Ray.")
    p.add_argument("--url", help="A running service's base URL (this machine only).")
    p.add_argument("--run", type=Path, default=Path("runs/tiny"),
                   help="The demo run (its images and the image tower's vectors).")
    p.add_argument("--labels", type=Path, default=Path("data/corpus/labels.json"))
    p.add_argument("--space", default="efficientnet_image")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--screenshot", type=Path,
                   help="Also save the search page answering one image query (Chromium).")
    p.add_argument("--screenshot-text", default="",
                   help="An instruction to compose with the screenshot's query image.")
    p.add_argument("--screenshot-caption", default="",
                   help="The screenshot queries the first gallery image whose caption has this.")
    args = p.parse_args()

    served = None
    if args.serve_config is not None:
        import ray
        import yaml

        from megapairs_ray.serve.deploy import deploy

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        url = deploy(args.serve_config)[0]
        served = yaml.safe_load(args.serve_config.read_text())["applications"][0]["args"]
    else:
        url = args.url
    if urlparse(url).hostname not in LOOPBACK:
        raise SystemExit(f"--url {url}: only this machine's loopback addresses are queried")
    rows = (gallery_rows(Path(served["gallery_dir"])) if served
            else pq.read_table(args.run / "images").to_pylist())
    by_key = json.loads(args.labels.read_text())
    label_of = {str(r["image_id"]): by_key[r["key"]] for r in rows}
    ids = sorted(label_of)
    rng = np.random.default_rng(args.seed)
    sample_rows = [rows[i] for i in rng.choice(len(rows), min(args.queries, len(rows)),
                                               replace=False)]
    sample = [str(r["image_id"]) for r in sample_rows]
    chance = base_rate([label_of[i] for i in ids])

    image_hits, text_hits, latencies = [], [], []
    with httpx.Client(base_url=url.rstrip("/"), timeout=60) as client:
        for r in sample_rows:
            for body, out in (({"image_base64": base64.b64encode(read_image(r)).decode()},
                               image_hits), ({"text": r["caption"]}, text_hits)):
                t0 = time.perf_counter()
                resp = client.post("/search", json={**body, "top_k": args.top_k + 1})
                latencies.append(time.perf_counter() - t0)
                resp.raise_for_status()
                out.append([h["id"] for h in resp.json()["hits"]])
    own = tower_neighbours(args.run, args.space, ids, sample, args.top_k)
    result = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "url": url, "gallery_images": len(ids), "queries": len(sample), "top_k": args.top_k,
        "categories": len(set(label_of.values())), "chance": round(chance, 4),
        "image_query_same_category": round(share(image_hits, sample, label_of, args.top_k), 4),
        "text_query_same_category": round(share(text_hits, sample, label_of, args.top_k), 4),
        "tower_neighbours_same_category": round(share(own, sample, label_of, args.top_k), 4),
        "median_latency_ms": round(1000 * float(np.median(latencies)), 1),
    }
    for k in ("image_query", "text_query", "tower_neighbours"):
        result[f"{k}_x_chance"] = round(result[f"{k}_same_category"] / chance, 2)
    if args.screenshot:
        shown = next(r for r in rows if args.screenshot_caption in (r["caption"] or ""))
        result["screenshot"] = {"image_key": shown["key"], "caption": shown["caption"],
                                "text": args.screenshot_text, "path": str(args.screenshot)}
        screenshot(url, read_image(shown), args.screenshot_text, args.screenshot)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
