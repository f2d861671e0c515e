"""Load test of the retriever service (Ray Serve) on this machine, against the in-process floor.

1. The floor: ``RetrieverEncoder.queries`` + ``GallerySearcher.search`` called directly in this
   process on the same queries, at batch 1 (per-query latency: what Serve adds at concurrency 1
   is measured against it) and batch 16 (throughput).
2. The service: deployed with ``megapairs_ray.serve.deploy.deploy`` on a local Ray (2 CPUs),
   on 127.0.0.1 at a free port, once with ``@serve.batch`` batches of up to 16 and once with
   batches of 1 (no batching); redeployed in between. Closed-loop clients at each concurrency
   level send a mix of composed (image + text), image-only and text-only ``POST /search``
   queries (base64 JSON images drawn from the bundled corpus, top_k 10); p50/p99 latency and
   requests/s per level. The client is locust through its library API (``serve_client.py``,
   a subprocess, so its CPU time is measured on its own and reported).
   On each deployment the same levels also run with clip-retrieval's request format on the
   service's ``/knn-service`` facade (image-only and text-only queries: what clip back takes),
   and on the first one, one level with each client (locust, httpx) to compare their CPU cost.
3. Diagnostics: the top level again with the encoder's and search's ``max_ongoing_requests``
   raised to the ingress's (``--ongoing-check-users``), and a no-op deployment of the same
   topology (``noop_app``: Ray Serve's own cost here, no model, no index).
4. Optionally (``--clipback``) clip-retrieval's ``clip back`` on the same images with the same
   client (``serve_clipback.py``); why it did not run, if it did not.

CPU is accounted per level: the machine's busy cores, this benchmark's process tree by process
(Ray's replicas, proxy, controller; clip back), and what other processes on the machine took
(``other_processes_cores``: the machine is shared; a level with that well above 0 is suspect).
The load client's own CPU is ``client_cpu_core_frac``.

The model is a random-initialised CLIP of a realistic-but-CPU-feasible size (``CLIP_CFG``: a
6-layer ViT, hidden 384, 224 px / patch 32; a 4-layer text tower, hidden 256, 77 tokens;
projection 256). The gallery is ``data/corpus`` (1,000 images) embedded with it by
``run_gallery``; checkpoint and gallery are cached under ``--cache`` and reused.

    .venv/bin/python benchmarks/serve_load.py --clipback \
        --out benchmarks/results/cpu-2core/serve_load.json
    # quicker: --levels 1,8 --duration 10 --batch-sizes 16 --no-floor --noop-levels '' \
    #          --ongoing-check-users 0 --client-check-users 0 --no-knn-facade
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# At module level: FastAPI resolves the noop ingress's (string) annotations in these globals.
from fastapi import Request

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

CLIP_CFG: dict[str, Any] = {
    "text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "max_position_embeddings": 77,
                    "vocab_size": 49408},
    "vision_config": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                      "num_attention_heads": 6, "image_size": 224, "patch_size": 32},
    "projection_dim": 256,
}

# Composed-query instructions and text-only queries ("a few texts").
INSTRUCTIONS = ["the same scene at night", "make it black and white", "with a dog in it",
                "seen from above", "in winter, covered in snow"]
TEXT_QUERIES = ["a red car parked on a street", "a bowl of fruit on a wooden table",
                "two people walking on a beach", "a city skyline at sunset"]
KINDS = ("composed", "image", "text")
TOP_K = 10

# The service's settings for this machine: configs/serve-tiny.yaml's, with the batch size (and
# max_ongoing_requests, which must be >= it) set per run.
def serve_args(gallery: str, checkpoint: str, batch: int, threads: int, wait_s: float,
               ongoing: int = 32, ingress_ongoing: int = 64) -> dict[str, Any]:
    ongoing = max(ongoing, batch)
    return {
        "gallery_dir": gallery, "checkpoint": checkpoint, "title": "serve_load benchmark",
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": ingress_ongoing},
        "query_encoder": {"num_cpus": 0.5, "torch_threads": threads, "max_batch_size": batch,
                          "batch_wait_timeout_s": wait_s, "max_ongoing_requests": ongoing},
        "search": {"num_cpus": 0.25, "max_batch_size": batch, "batch_wait_timeout_s": wait_s,
                   "max_ongoing_requests": ongoing},
        "limits": {"max_top_k": 100, "default_top_k": TOP_K},
    }


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    import ray
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    versions = {"python": platform.python_version(), "ray": ray.__version__,
                "torch": torch.__version__}
    from importlib.metadata import PackageNotFoundError, version

    # By distribution metadata: importing locust here would monkey-patch this process (gevent).
    for pkg in ("faiss-cpu", "transformers", "locust", "httpx", "fastapi", "uvicorn"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    return {"cpu_model": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib,
            "kernel": platform.release(), "versions": versions, "model_config": CLIP_CFG,
            "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


# --------------------------------------------------------------------------- checkpoint, gallery


def corpus_images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (key, JPEG bytes) drawn at random from the bundled corpus's shards."""
    found: list[tuple[str, bytes]] = []
    for tar in sorted((ROOT / "data" / "corpus").glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    found.append((f"{tar.stem}/{m.name}", t.extractfile(m).read()))
    rng = random.Random(seed)
    return rng.sample(found, n)


def prepare_once(cache: Path) -> tuple[str, str]:
    """``prepare`` on a Ray started for it and stopped after: for benchmarks that measure
    without Ray in this process (or in subprocesses of their own)."""
    import ray

    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    try:
        return prepare(cache)
    finally:
        ray.shutdown()


def prepare(cache: Path) -> tuple[str, str]:
    """(checkpoint, gallery) folders, made once and reused. Needs an initialised Ray."""
    ckpt, gallery = cache / "ckpt", cache / "gallery"
    if not (ckpt / "config.json").exists():
        import torch

        from megapairs_ray.models.mmret import MMRetCLIP
        from megapairs_ray.models.tokenizer import load_tokenizer

        print(f"making the random CLIP checkpoint {ckpt}", flush=True)
        torch.manual_seed(0)
        MMRetCLIP.from_config(**CLIP_CFG).save_pretrained(ckpt)
        load_tokenizer(None).save_pretrained(ckpt)
        (ckpt / "bench_model_config.json").write_text(json.dumps(CLIP_CFG, indent=1))
    if not (gallery / "gallery.json").exists():
        from megapairs_ray.config import config_from_dict
        from megapairs_ray.pipeline.gallery import run_gallery
        from megapairs_ray.serve.config import GalleryConfig

        print(f"building the gallery {gallery} from data/corpus", flush=True)
        t0 = time.perf_counter()
        run_gallery(config_from_dict({
            "profile": "serve-bench", "run_dir": str(gallery), "checkpoint": str(ckpt),
            "input": {"uris": [str(ROOT / "data" / "corpus")], "format": "webdataset"},
            "ingest": {"min_side": 16, "num_cpus": 0.5},
            "encoder": {"device": "cpu", "batch_size": 64, "decode_threads": 2, "num_cpus": 1},
            "index": {"kind": "flat", "shards": 2, "shard_num_cpus": 0.1},
            "ray": {"num_cpus": 2, "object_store_memory": 512 * 1024**2},
        }, schema=GalleryConfig))
        print(f"gallery built in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(ckpt), str(gallery)


# --------------------------------------------------------------------------- queries


def make_queries(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` queries cycling composed / image-only / text-only, images from the corpus."""
    images = corpus_images(n, seed)
    out = []
    for i, (key, jpeg) in enumerate(images):
        kind = KINDS[i % 3]
        text = (INSTRUCTIONS[i % len(INSTRUCTIONS)] if kind == "composed" else
                TEXT_QUERIES[i % len(TEXT_QUERIES)] if kind == "text" else None)
        out.append({"kind": kind, "image": None if kind == "text" else jpeg, "text": text,
                    "image_key": None if kind == "text" else key})
    return out


def search_payloads(queries: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for q in queries:
        body: dict[str, Any] = {"top_k": TOP_K}
        if q["image"] is not None:
            body["image_base64"] = base64.b64encode(q["image"]).decode()
        if q["text"] is not None:
            body["text"] = q["text"]
        out.append({"path": "/search", "kind": q["kind"], "body": json.dumps(body)})
    return out


NOTES = [
    "Latencies are timed by the client around each request (perf_counter); only requests "
    "started after the warm-up count; requests/s = answered 200s / counted window.",
    "The floor runs the encoder and the search in this process, one batch after another, with "
    "the query encoder deployment's settings (torch threads, a decode pool of 4 threads); it "
    "includes no HTTP, JSON, base64 or the ingress's image header checks: Serve's added "
    "latency includes those.",
    "@serve.batch waits batch_wait_timeout_s after a batch's first request unless the batch "
    "fills (ray/serve/batching.py wait_for_batch), in each of the two batched deployments: at "
    "concurrency 1 the batched service pays about 2 x batch_wait_timeout_s on top of its "
    "unbatched latency; with max_batch_size 1 a batch is full at once and nothing waits.",
    "cpu_over_level.other_processes_cores: CPU that processes outside this benchmark's process "
    "tree (Ray, Serve replicas, the client and clip back are inside it) used during the level; "
    "anything well above 0 means the numbers were taken on a shared, busy machine.",
    "client_check: the same level with locust and with an asyncio httpx client; locust's "
    "FastHttpUser (geventhttpclient) costs about half the CPU per request of httpx, so it is "
    "the client used.",
]

KNN_INDEX_NAME = "corpus"


def knn_payloads(queries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """clip-retrieval's ``/knn-service`` requests of the mix's image-only and text-only queries
    (it has no composed query): what clip back and the service's compatible facade both take."""
    out = []
    for q in queries:
        if q["kind"] == "composed":
            continue
        body: dict[str, Any] = {"modality": "image", "num_images": TOP_K,
                                "indice_name": KNN_INDEX_NAME, "use_mclip": False,
                                "deduplicate": False, "use_safety_model": False,
                                "use_violence_detector": False}
        if q["kind"] == "image":
            body["image"] = base64.b64encode(q["image"]).decode()
        else:
            body["text"] = q["text"]
        out.append({"path": "/knn-service", "kind": q["kind"], "body": json.dumps(body)})
    return out


# --------------------------------------------------------------------------- statistics


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear interpolation between closest ranks."""
    v = sorted(values)
    if not v:
        return float("nan")
    x = q * (len(v) - 1)
    lo = int(x)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def latency_summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(pct(ms, 0.5), 2), "p90_ms": round(pct(ms, 0.9), 2),
            "p99_ms": round(pct(ms, 0.99), 2), "mean_ms": round(statistics.fmean(ms), 2)
            if ms else float("nan")}


# --------------------------------------------------------------------------- the floor


def floor(checkpoint: str, gallery: str, queries: list[dict[str, Any]], batches: list[int],
          threads: int, duration: float, max_queries: int, precision: str = "fp32",
          ) -> dict[str, Any]:
    """Encoder + search called directly, one batch after another, in this process."""
    import torch

    from megapairs_ray.models.retriever import RetrieverEncoder
    from megapairs_ray.serve.search import GallerySearcher

    torch.set_num_threads(threads)
    # As the QueryEncoder deployment builds it (decode pool of 4 threads).
    enc = RetrieverEncoder(checkpoint, batch_size=max(batches), threads=4, precision=precision)
    searcher = GallerySearcher(gallery)
    out: dict[str, Any] = {"torch_threads": threads, "precision": enc.precision}
    for b in batches:
        groups = [queries[i : i + b] for i in range(0, len(queries) - b + 1, b)]
        for g in groups[:3]:  # warm-up
            searcher.search(enc.queries([q["image"] for q in g], [q["text"] for q in g]), TOP_K)
        lat, enc_ms, search_ms, done = [], [], [], 0
        before = cpu_snapshot()
        t_start = time.perf_counter()
        i = 0
        while time.perf_counter() - t_start < duration and done < max_queries:
            g = groups[i % len(groups)]
            i += 1
            t0 = time.perf_counter()
            v = enc.queries([q["image"] for q in g], [q["text"] for q in g])
            t1 = time.perf_counter()
            hits = searcher.search(v, TOP_K)
            t2 = time.perf_counter()
            assert len(hits) == len(g) and all(len(h) == TOP_K for h in hits)
            lat.append((t2 - t0) * 1e3)
            enc_ms.append((t1 - t0) * 1e3)
            search_ms.append((t2 - t1) * 1e3)
            done += len(g)
        wall = time.perf_counter() - t_start
        out[f"batch_{b}"] = {
            "batch": b, "queries": done, "wall_s": round(wall, 2),
            "queries_per_s": round(done / wall, 2),
            "batch_latency": latency_summary(lat),
            "encode_p50_ms": round(pct(enc_ms, 0.5), 2),
            "search_p50_ms": round(pct(search_ms, 0.5), 3),
            "cpu": cpu_split(before, cpu_snapshot())}
        if b == 1:  # per kind: the mix's kinds differ in cost
            kinds = [groups[j % len(groups)][0]["kind"] for j in range(len(lat))]
            out["batch_1"]["by_kind_p50_ms"] = {
                k: round(pct([x for x, kk in zip(lat, kinds) if kk == k], 0.5), 2)
                for k in KINDS}
        print(f"floor batch {b}: {out[f'batch_{b}']['queries_per_s']} q/s, batch p50 "
              f"{out[f'batch_{b}']['batch_latency']['p50_ms']} ms", flush=True)
    del enc, searcher
    return out


# --------------------------------------------------------------------------- the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read()[:300]


def wait_healthy(url: str, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    last: Any = None
    while time.perf_counter() - t0 < timeout:
        try:
            status, body = http_json(url.rstrip("/") + "/healthz", timeout=10)
            if status == 200:
                return time.perf_counter() - t0
            last = (status, body)
        except Exception as e:  # not up yet
            last = e
        time.sleep(1)
    raise RuntimeError(f"{url}healthz not healthy after {timeout} s: {last}")


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU jiffies) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(d)] = (int(fields[1]), float(fields[11]) + float(fields[12]))
    return out


def _name(pid: int) -> str:
    """A process's name as Ray sets it (``ray::ServeReplica:app:Deployment``), else its
    program and script."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split(".", 1)[0].split(" ", 1)[0]
    prog = Path(argv[0]).name
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), "")
    return f"{prog} {script}".strip()


def cpu_snapshot() -> dict[str, Any]:
    """The machine's busy jiffies, and those of this process and its descendants (Ray's
    processes, the load client, clip back) by process name, so the CPU others took can be
    told apart and the benchmark's own split by process."""
    procs = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    by_pid: dict[int, tuple[str, float]] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        by_pid[pid] = (_name(pid), procs.get(pid, (0, 0.0))[1])
        todo += children.get(pid, [])
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    return {"busy": sum(v) - v[3] - v[4], "total": sum(v),
            "mine": sum(j for _, j in by_pid.values()), "by_pid": by_pid,
            "t": time.perf_counter()}


def cpu_split(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Cores busy between two snapshots: all, this benchmark's process tree, everything else."""
    cores = os.cpu_count() or 1
    span = max(b["total"] - a["total"], 1e-9) / cores  # jiffies per core
    busy = (b["busy"] - a["busy"]) / span
    mine = (b["mine"] - a["mine"]) / span
    by_name: dict[str, float] = {}
    for pid, (name, j) in b["by_pid"].items():
        by_name[name] = by_name.get(name, 0.0) + (j - a["by_pid"].get(pid, (name, 0.0))[1])
    return {"machine_cores_busy": round(busy, 2), "benchmark_cores": round(mine, 2),
            "other_processes_cores": round(max(busy - mine, 0.0), 2),
            "benchmark_cores_by_process": {k: round(v / span, 3) for k, v in sorted(
                by_name.items(), key=lambda kv: -kv[1]) if v / span >= 0.01}}


def run_level(host: str, payloads_file: str, users: int, args: argparse.Namespace,
              client: str, workdir: Path, tag: str) -> dict[str, Any]:
    """One closed-loop level through ``serve_client.py`` (a subprocess); its summary."""
    raw = workdir / f"raw-{tag}-c{users}.json"
    cmd = [sys.executable, str(HERE / "serve_client.py"), "--client", client, "--host", host,
           "--payloads", payloads_file, "--users", str(users), "--warmup", str(args.warmup),
           "--duration", str(args.duration), "--max-requests", str(args.max_requests),
           "--out", str(raw)]
    t0 = time.perf_counter()
    before = cpu_snapshot()
    subprocess.run(cmd, check=True, timeout=args.warmup + args.duration + 120)
    cpu = cpu_split(before, cpu_snapshot())
    res = json.loads(raw.read_text())
    rows = res.pop("rows")
    ok = [r for r in rows if r[3] == 200]
    ms = [r[1] for r in ok]
    out = {"users": users, "client": client, "requests": len(rows),
           "errors": len(rows) - len(ok),
           "error_statuses": sorted({r[3] for r in rows if r[3] != 200}),
           "requests_per_s": round(len(ok) / res["window_s"], 2),
           **latency_summary(ms),
           "by_kind_p50_ms": {k: round(pct([r[1] for r in ok if r[2] == k], 0.5), 2)
                              for k in KINDS if any(r[2] == k for r in ok)},
           "window_s": round(res["window_s"], 2), "stopped_by": res["stopped_by"],
           "client_cpu_core_frac": round(res["client_cpu_s"] / res["window_s"], 3),
           "client_cpu_ms_per_request": round(1e3 * res["client_cpu_s"] / max(len(rows), 1),
                                              3),
           "machine_busy_frac": round(res["machine_busy_frac"], 3),
           "cpu_over_level": cpu,  # warm-up included; others = not this benchmark's processes
           "level_wall_s": round(time.perf_counter() - t0, 1)}
    if "locust_stats" in res:
        out["locust_stats_whole_run"] = res["locust_stats"]
    print(f"  c={users:>3} {client}: {out['requests_per_s']:>7} req/s  p50 {out['p50_ms']:>8} ms"
          f"  p99 {out['p99_ms']:>8} ms  errors {out['errors']}  client CPU "
          f"{out['client_cpu_core_frac']:.2f} core, machine busy "
          f"{out['machine_busy_frac']:.2f}, other processes {cpu['other_processes_cores']} "
          "cores", flush=True)
    return out


def noop_app(dim: int, ongoing: int, ingress_ongoing: int) -> Any:
    """The service's topology and resources with no work: an ingress (FastAPI) that parses the
    JSON body and decodes the base64 image, then awaits a query-encoder stub (returns a
    constant vector) and a search stub (returns 10 constant hits), each ``@serve.batch``-ed
    with batches of 1. Its latency is what Ray Serve itself costs on this machine."""
    import numpy as np
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=ongoing)
    class EncoderStub:
        @serve.batch(max_batch_size=1)
        async def encode(self, queries: list[Any]) -> list[Any]:
            return [np.full(dim, 1 / np.sqrt(dim), np.float32) for _ in queries]

    @serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=ongoing)
    class SearchStub:
        @serve.batch(max_batch_size=1)
        async def search(self, requests: list[Any]) -> list[Any]:
            return [[{"id": i, "score": 0.5, "caption": "a caption"} for i in range(k)]
                    for _, k in requests]

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=ingress_ongoing)
    @serve.ingress(api)
    class IngressStub:
        def __init__(self, encoder: Any, searcher: Any) -> None:
            self.encoder, self.searcher = encoder, searcher

        @api.post("/search")
        async def search(self, request: Request) -> dict[str, Any]:
            body = json.loads(await request.body())
            image = base64.b64decode(body["image_base64"]) if body.get("image_base64") else None
            vector = await self.encoder.encode.remote((image, body.get("text")))
            hits = await self.searcher.search.remote((vector, int(body.get("top_k", TOP_K))))
            return {"kind": "stub", "top_k": len(hits), "hits": hits}

        @api.get("/healthz")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

    return IngressStub.bind(EncoderStub.bind(), SearchStub.bind())


def noop_runs(queries: list[dict[str, Any]], args: argparse.Namespace, workdir: Path,
              ) -> dict[str, Any]:
    from ray import serve

    payloads_file = workdir / "payloads-search.json"
    payloads_file.write_text(json.dumps(search_payloads(queries)))
    port = free_port()
    print(f"deploying the no-op topology on 127.0.0.1:{port}", flush=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(noop_app(256, args.ongoing, args.ingress_ongoing), name="noop",
              route_prefix="/", blocking=False)
    host = f"http://127.0.0.1:{port}"
    wait_healthy(host + "/")
    levels = [int(x) for x in args.noop_levels.split(",") if x]
    out = {"what": "the service's topology, resources and request bodies, no model and no "
                   "index (noop_app)",
           "levels": [run_level(host, str(payloads_file), u, args, args.client, workdir, "noop")
                      for u in levels]}
    serve.shutdown()
    time.sleep(2)
    return out


def write_serve_config(path: Path, port: int, app: dict[str, Any],
                       request_timeout_s: float | None = None) -> None:
    """A Ray Serve config file with the one megapairs application on 127.0.0.1:``port``."""
    import yaml

    http: dict[str, Any] = {"host": "127.0.0.1", "port": port}
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": http,
        "applications": [{"name": "megapairs", "route_prefix": "/",
                          "import_path": "megapairs_ray.serve.app:build_app",
                          "args": app}]}, sort_keys=False))


def serve_runs(checkpoint: str, gallery: str, queries: list[dict[str, Any]],
               args: argparse.Namespace, workdir: Path, batches: list[int] | None = None,
               levels: list[int] | None = None, ongoing: int | None = None,
               extras: bool = True) -> dict[str, Any]:
    """Each batch size deployed in turn, every level run on it; with ``extras`` also the client
    check (first deployment) and the /knn-service facade levels."""
    from ray import serve

    from megapairs_ray.serve.deploy import deploy

    payloads_file = workdir / "payloads-search.json"
    payloads_file.write_text(json.dumps(search_payloads(queries)))
    knn_file = workdir / "payloads-knn.json"
    knn_file.write_text(json.dumps(knn_payloads(queries)))
    levels = levels or [int(x) for x in args.levels.split(",")]
    batches = batches or [int(x) for x in args.batch_sizes.split(",")]
    ongoing = ongoing or args.ongoing
    out: dict[str, Any] = {}
    for batch in batches:
        tag = f"batch_{batch}"
        app = serve_args(gallery, checkpoint, batch, args.torch_threads, args.batch_wait_s,
                         ongoing, args.ingress_ongoing)
        cfg_file = workdir / f"serve-{tag}.yaml"
        port = free_port()
        write_serve_config(cfg_file, port, app)
        print(f"deploying {cfg_file} (max_batch_size {batch}) on 127.0.0.1:{port}", flush=True)
        t0 = time.perf_counter()
        (url,) = deploy(cfg_file, "127.0.0.1", port)
        ready = wait_healthy(url)
        deploy_s = time.perf_counter() - t0
        host = url.rstrip("/")
        # One request of each kind first: the answers are checked, not just their status.
        for p in search_payloads(queries[:3]):
            status, body = http_json(host + "/search", p["body"].encode())
            if status != 200 or body["kind"] != p["kind"] or len(body["hits"]) != TOP_K:
                raise RuntimeError(f"preflight {p['kind']}: {status} {str(body)[:300]}")
        res = {"max_batch_size": batch, "config": app, "deploy_to_healthy_s": round(deploy_s, 1),
               "healthz_wait_s": round(ready, 1), "levels": []}
        for users in levels:
            res["levels"].append(run_level(host, str(payloads_file), users, args, args.client,
                                           workdir, tag))
        if extras and args.client_check_users and not out:
            # The same level with the other client: what each costs in CPU per request.
            other = "httpx" if args.client == "locust" else "locust"
            res["client_check"] = [
                run_level(host, str(payloads_file), args.client_check_users, args, c, workdir,
                          f"{tag}-{c}-check") for c in (args.client, other)]
        if extras and args.knn_facade:
            # clip back's requests (image-only and text-only) on the service's /knn-service.
            status, body = http_json(host + "/knn-service",
                                     json.loads(knn_file.read_text())[0]["body"].encode())
            if status != 200 or len(body) != TOP_K:
                raise RuntimeError(f"preflight knn-service: {status} {str(body)[:300]}")
            res["knn_facade_levels"] = [
                run_level(host, str(knn_file), users, args, args.client, workdir,
                          f"{tag}-knn") for users in levels]
        out[tag] = res
        serve.shutdown()
        time.sleep(2)
    return out


# --------------------------------------------------------------------------- report


def rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(run, request mix, level) of every load level, in table order."""
    out = []
    for tag, run in results.get("serve", {}).items():
        out += [(f"serve {tag}", "/search mix", lv) for lv in run["levels"]]
    for tag, run in results.get("serve", {}).items():
        out += [(f"serve {tag}", "/knn-service", lv) for lv in run.get("knn_facade_levels", [])]
    for tag, run in results.get("ongoing_check", {}).items():
        if isinstance(run, dict) and "levels" in run:
            out += [(f"serve {tag} ong{args_ongoing(run)}", "/search mix", lv)
                    for lv in run["levels"]]
    out += [("serve no-op", "/search mix", lv)
            for lv in results.get("serve_noop", {}).get("levels", [])]
    cb = results.get("clipback", {})
    out += [("clip back", "/knn-service", lv) for lv in cb.get("levels", [])]
    return out


def args_ongoing(run: dict[str, Any]) -> int:
    return int(run["config"]["query_encoder"]["max_ongoing_requests"])


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_gib']} GiB; Python "
             f"{m['versions']['python']}, Ray {m['versions']['ray']}, torch "
             f"{m['versions']['torch']}, locust {m['versions'].get('locust')}"]
    fl = results.get("floor")
    if fl:
        for key in ("batch_1", "batch_16"):
            if key in fl:
                f = fl[key]
                lines.append(f"floor {key:<9} {f['queries_per_s']:>8} q/s   per-batch p50 "
                             f"{f['batch_latency']['p50_ms']} ms, p99 "
                             f"{f['batch_latency']['p99_ms']} ms   (other processes "
                             f"{f['cpu']['other_processes_cores']} cores)")
    lines.append(f"{'run':<23}{'requests':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
                 f"{'errors':>7}{'client':>8}{'others':>8}")
    for run, mix, lv in rows(results):
        lines.append(f"{run:<23}{mix:<14}{lv['users']:>5}{lv['requests_per_s']:>9}"
                     f"{lv['p50_ms']:>9}{lv['p99_ms']:>9}{lv['errors']:>7}"
                     f"{lv['client_cpu_core_frac']:>8}"
                     f"{lv['cpu_over_level']['other_processes_cores']:>8}")
    lines.append("(client: cores the load client used; others: cores used by processes outside "
                 "this benchmark during the level)")
    cb = results.get("clipback")
    if cb and not cb.get("ran"):
        lines.append(f"clip back did not run: {cb.get('failed_step')}: "
                     f"{str(cb.get('error'))[-400:]}")
    for k, v in results.get("summary", {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    fl = results.get("floor", {})
    serve_ = results.get("serve", {})
    b1 = fl.get("batch_1")
    for tag, run in serve_.items():
        by_users = {lv["users"]: lv for lv in run["levels"]}
        if b1 and 1 in by_users:
            s[f"added_p50_ms_at_c1_{tag}"] = round(by_users[1]["p50_ms"] -
                                                   b1["batch_latency"]["p50_ms"], 2)
            s[f"added_p99_ms_at_c1_{tag}"] = round(by_users[1]["p99_ms"] -
                                                   b1["batch_latency"]["p99_ms"], 2)
        s[f"peak_requests_per_s_{tag}"] = max(lv["requests_per_s"] for lv in run["levels"])
    if "batch_16" in serve_ and "batch_1" in serve_:
        s["batching_speedup_at_peak"] = round(s["peak_requests_per_s_batch_16"] /
                                              s["peak_requests_per_s_batch_1"], 2)
    for b in (1, 16):
        if f"batch_{b}" in fl:
            for tag in serve_:
                s[f"peak_{tag}_vs_floor_batch_{b}_throughput"] = round(
                    s[f"peak_requests_per_s_{tag}"] / fl[f"batch_{b}"]["queries_per_s"], 2)
    for tag, run in serve_.items():
        if run.get("knn_facade_levels"):
            s[f"knn_facade_peak_requests_per_s_{tag}"] = max(
                lv["requests_per_s"] for lv in run["knn_facade_levels"])
    for tag, run in results.get("ongoing_check", {}).items():
        if isinstance(run, dict) and "levels" in run:
            for lv in run["levels"]:
                s[f"requests_per_s_{tag}_c{lv['users']}_ongoing{args_ongoing(run)}"] = \
                    lv["requests_per_s"]
    noop = {lv["users"]: lv for lv in results.get("serve_noop", {}).get("levels", [])}
    if 1 in noop:
        s["noop_topology_p50_ms_at_c1"] = noop[1]["p50_ms"]
        s["noop_topology_p99_ms_at_c1"] = noop[1]["p99_ms"]
    for run in serve_.values():
        for lv in run.get("client_check", []):
            s[f"client_cpu_ms_per_request_{lv['client']}_c{lv['users']}"] = \
                lv["client_cpu_ms_per_request"]
    cb = results.get("clipback", {})
    if cb.get("levels"):
        s["clipback_peak_requests_per_s"] = max(lv["requests_per_s"] for lv in cb["levels"])
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench" / "serve"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core" /
                                         "serve_load.json"))
    ap.add_argument("--levels", default="1,8,32,64", help="closed-loop concurrency levels")
    ap.add_argument("--batch-sizes", default="16,1",
                    help="max_batch_size of both batched deployments, one deployment each")
    ap.add_argument("--batch-wait-s", type=float, default=0.005,
                    help="batch_wait_timeout_s of both deployments (serve-tiny's)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads of the query encoder (serve-tiny's), and the floor's")
    ap.add_argument("--ongoing", type=int, default=32,
                    help="max_ongoing_requests of the encoder and search deployments "
                         "(serve-tiny's 32; at least the batch size)")
    ap.add_argument("--ingress-ongoing", type=int, default=64,
                    help="max_ongoing_requests of the ingress (serve-tiny's)")
    ap.add_argument("--queries", type=int, default=48, help="distinct queries (a third each)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds not counted per level")
    ap.add_argument("--duration", type=float, default=20.0, help="counted seconds per level")
    ap.add_argument("--max-requests", type=int, default=3000, help="counted requests per level")
    ap.add_argument("--floor-duration", type=float, default=15.0)
    ap.add_argument("--client", choices=["locust", "httpx"], default="locust")
    ap.add_argument("--no-knn-facade", dest="knn_facade", action="store_false",
                    help="skip the service's /knn-service runs (clip back's requests)")
    ap.add_argument("--client-check-users", type=int, default=8,
                    help="on the first deployment, one more level at this concurrency with "
                         "each client (locust, httpx), to compare their CPU cost; 0: skip")
    ap.add_argument("--ongoing-check-users", type=int, default=64,
                    help="one more deployment (batch 16) with the encoder's and search's "
                         "max_ongoing_requests = the ingress's, at this concurrency; 0: skip")
    ap.add_argument("--noop-levels", default="1,8",
                    help="levels for the no-op topology (Ray Serve's own cost); '' to skip")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--clipback", action="store_true",
                    help="also run clip-retrieval's clip back (serve_clipback.py)")
    ap.add_argument("--clipback-venv", default=str(ROOT / "data" / "bench" / "clipback-venv"))
    args = ap.parse_args()

    import ray

    cache = Path(args.cache).resolve()
    workdir = cache / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    checkpoint, gallery = prepare(cache)
    queries = make_queries(args.queries)
    results: dict[str, Any] = {
        "benchmark": "serve_load", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "setup": {"checkpoint": "random-initialised MMRetCLIP (CLIP_CFG), torch seed 0",
                  "gallery": f"data/corpus (1,000 images; ingest refuses 2 under min_side 16): "
                             f"{json.loads(Path(gallery, 'gallery.json').read_text())['count']}"
                             " indexed, flat index in 2 shards",
                  "queries": f"{len(queries)} distinct, a third each composed / image-only / "
                             "text-only, cycled; JSON base64 images, top_k 10",
                  "instructions": INSTRUCTIONS, "text_queries": TEXT_QUERIES,
                  "load": f"closed loop, no think time; {args.warmup} s warm-up not counted, "
                          f"then {args.duration} s or {args.max_requests} requests per level",
                  "client": args.client, "torch_threads": args.torch_threads,
                  "batch_wait_timeout_s": args.batch_wait_s,
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}}
    results["notes"] = NOTES
    if not args.no_floor:
        print("floor: encoder + search in this process", flush=True)
        results["floor"] = floor(checkpoint, gallery, queries, [1, 16], args.torch_threads,
                                 args.floor_duration, args.max_requests)
    if not args.no_serve:
        results["serve"] = serve_runs(checkpoint, gallery, queries, args, workdir)
    if args.ongoing_check_users:
        # The top level again with the encoder's and search's max_ongoing_requests raised to
        # the ingress's: whether the collapse there is Serve's router waiting on full replicas.
        users = args.ongoing_check_users
        results["ongoing_check"] = {
            "what": f"max_batch_size 16, encoder and search max_ongoing_requests "
                    f"{args.ingress_ongoing} (= the ingress's) instead of {args.ongoing}, "
                    f"at concurrency {users}",
            **serve_runs(checkpoint, gallery, queries, args, workdir, batches=[16],
                         levels=[users], ongoing=args.ingress_ongoing, extras=False)}
    if args.noop_levels:
        results["serve_noop"] = noop_runs(queries, args, workdir)
    if args.clipback:
        sys.path.insert(0, str(HERE))
        import serve_clipback

        ray.shutdown()  # clip back gets the machine to itself
        results["clipback"] = serve_clipback.run(queries, args, workdir, ROOT)
    results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["summary"] = summarise(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
