"""Driver peak memory and time per stage as the corpus grows: the driver must keep books only.

For each size, a synthetic webdataset corpus (small JPEGs of random shapes, a caption each, 500
images a shard) goes through ``megapairs run`` with the tiny profile, its embedding spaces
swapped for the paper's three with tiny random encoders (the books are what is measured, not
the encoders), ingest to mine, then
describe → instruct → export on a sample of queries (``mine.query_fraction``, so the LLM steps see
a few hundred pairs at every size). The driver is the ``megapairs`` process itself: its resident
memory is sampled every 0.1 s (Ray's workers, raylet and GCS are other processes and are not
counted); each stage's seconds come from the run's manifest.

    python benchmarks/driver_books.py --sizes 2000 10000 50000 \
        --out benchmarks/results/cpu-2core/driver_books.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"model": "mp-tiny-clip", "pretrained": None}
# The paper's three spaces with tiny random encoders; windows wide enough that random weights
# still give pairs to synthesize.
SPACES = [
    {"name": "clip_image", "encoder": {"kind": "open_clip_image", **TINY_CLIP},
     "window": [0.5, 0.99]},
    {"name": "dino_image", "window": [0.5, 0.99], "encoder": {
        "kind": "transformers_image", "model": "mp-tiny-dinov2", "pretrained": False,
        "image_size": 56, "config_overrides": {
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 128, "patch_size": 14, "image_size": 56}}},
    {"name": "clip_text", "encoder": {"kind": "open_clip_text", **TINY_CLIP},
     "window": [0.5, 0.99]},
]
WORDS = ("red", "blue", "green", "circle", "square", "star", "small", "large", "bright", "dark")


def build(out: Path, n: int, shard_size: int = 500, seed: int = 0) -> None:
    if (out / "_done").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(0, n, shard_size):
        with tarfile.open(out / f"shard-{s // shard_size:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + shard_size)):
                im = Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 255, 3)))
                d = ImageDraw.Draw(im)
                for _ in range(3):
                    x, y = (int(v) for v in rng.integers(0, 48, 2))
                    d.ellipse((x, y, x + 16, y + 16),
                              fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                caption = " ".join(rng.choice(WORDS, 5)).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / "_done").touch()


def run_one(n: int, work: Path, synth_pairs: int) -> dict:
    corpus, run_dir = work / f"corpus-{n}", work / f"run-{n}"
    build(corpus, n)
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    # About ``synth_pairs`` pairs reach the LLM steps at every size (3 targets a query).
    fraction = min(1.0, synth_pairs / 3 / n)
    # ``-m`` from the repository root: the tree this script is in, whatever is installed.
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["embed"]["spaces"] = SPACES
    cfg_file = work / "books.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "megapairs_ray.cli", "run", "-c", str(cfg_file),
           "-s", f"run_dir={run_dir}", "-s", f"input.uris=[{corpus}]",
           "-s", f"mine.query_fraction={fraction}",
           "-s", "describe.retries=0", "-s", "instruct.retries=0"]
    peak, samples = 0, []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    me = psutil.Process(proc.pid)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            rss = me.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        samples.append(round(rss / 2**20))
        time.sleep(0.1)
    reader.join(5)
    if proc.returncode != 0:
        raise SystemExit(f"run on {n} images failed:\n{b''.join(err).decode()[-3000:]}")
    doc = json.loads((run_dir / "manifest.json").read_text())
    return {"images": n, "wall_s": round(time.perf_counter() - t0, 1),
            "driver_peak_rss_mib": round(peak / 2**20, 1),
            "stage_seconds": {k: v["seconds"] for k, v in doc["stages"].items()},
            "pairs": doc["stages"]["mine"]["counts"].get("pairs", 0),
            "triplets": doc["stages"].get("export", {}).get("counts", {}).get("triplets", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "bench" / "books")
    ap.add_argument("--synth-pairs", type=int, default=300)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    results: list[dict] = []
    for n in args.sizes:  # the file is rewritten after every size: a long run keeps what it has
        results.append(run_one(n, args.work, args.synth_pairs))
        print(json.dumps(results[-1]), flush=True)
        base = results[0]
        for r in results:
            r["peak_vs_smallest"] = round(r["driver_peak_rss_mib"] / base["driver_peak_rss_mib"],
                                          3)
            r["wall_per_image_ms"] = round(1000 * r["wall_s"] / r["images"], 2)
        doc = {"machine": {"cpus": os.cpu_count(),
                           "processor": platform.processor() or platform.machine(),
                           "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
               "command": " ".join(sys.argv), "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")

if __name__ == "__main__":
    main()
