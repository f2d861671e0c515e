"""The closed-loop load client of the serve benchmarks: locust (the project's load tool, through
its library API, headless) or an asyncio httpx loop, with one command line.

Each of ``--users`` clients sends a request, waits for the answer, sends the next (no think
time): concurrency is exactly ``--users``. Requests cycle through a payload file (a JSON list of
``{"path", "body", "kind"}``, bodies pre-serialised, so the client does no image work), each user
starting at its own offset. Only requests *started* after ``--warmup`` seconds count; the run
stops by itself after ``--warmup + --duration`` seconds or ``--max-requests`` counted answers,
whichever comes first. Traffic goes to ``--host`` only, and the host must be on this machine.

Latencies are timed here with ``time.perf_counter`` (locust's CSV percentiles are rounded); the
output JSON holds every counted request and the client's own CPU time over the counted window,
so a reader can tell how much of the 2 cores the load generator itself took.

    python benchmarks/serve_client.py --client locust --host http://127.0.0.1:8000 \
        --payloads /tmp/payloads.json --users 8 --warmup 3 --duration 20 --out /tmp/raw.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class Recorder:
    def __init__(self, warmup: float, duration: float, max_requests: int) -> None:
        self.t0 = time.perf_counter()
        self.warmup, self.duration, self.max_requests = warmup, duration, max_requests
        self.rows: list[tuple[float, float, str, int]] = []  # start (s), latency (ms), kind, status
        self.counted = 0
        self.window_start: dict[str, float] | None = None
        self.window_end: dict[str, float] | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self) -> dict[str, float]:
        busy, total = machine_busy()
        return {"t": self.now(), "cpu": cpu_s(), "busy": busy, "total": total}

    def tick(self) -> None:
        """Open the counted window once warm-up is over."""
        if self.window_start is None and self.now() >= self.warmup:
            self.window_start = self.mark()

    def add(self, start: float, latency_ms: float, kind: str, status: int) -> None:
        if start >= self.warmup and not self.done():
            self.rows.append((start, latency_ms, kind, status))
            self.counted += 1
            if self.counted >= self.max_requests and self.window_end is None:
                self.window_end = self.mark()

    def done(self) -> bool:
        return self.counted >= self.max_requests or self.now() >= self.warmup + self.duration

    def result(self, client: str, users: int) -> dict:
        end = self.window_end or self.mark()
        start = self.window_start or end
        window = max(end["t"] - start["t"], 1e-9)
        jiffies = max(end["total"] - start["total"], 1e-9)
        return {"client": client, "users": users, "window_s": window,
                "client_cpu_s": end["cpu"] - start["cpu"],
                "machine_busy_frac": (end["busy"] - start["busy"]) / jiffies,
                "stopped_by": "max_requests" if self.counted >= self.max_requests else "time",
                "rows": self.rows}


def load_payloads(path: str) -> list[dict]:
    with open(path) as f:
        payloads = json.load(f)
    for p in payloads:
        p["data"] = p["body"].encode()
    return payloads


def run_locust(args: argparse.Namespace) -> dict:
    import gevent
    from locust import FastHttpUser, constant, events, task
    from locust.env import Environment

    payloads = load_payloads(args.payloads)
    rec = Recorder(args.warmup, args.duration, args.max_requests)
    offsets = iter(range(0, 10**9, max(1, len(payloads) // max(args.users, 1)) or 1))

    class Client(FastHttpUser):
        host = args.host
        wait_time = constant(0)
        network_timeout = args.timeout
        connection_timeout = args.timeout

        def on_start(self) -> None:
            self.i = next(offsets)

        @task
        def query(self) -> None:
            rec.tick()
            if rec.done():
                gevent.sleep(0.05)
                return
            p = payloads[self.i % len(payloads)]
            self.i += 1
            start = rec.now()
            with self.client.post(p["path"], data=p["data"], name=p["kind"],
                                  headers={"content-type": "application/json"},
                                  catch_response=True) as r:
                latency = (rec.now() - start) * 1e3
                status = r.status_code or 0
                if status == 200:
                    r.success()
                else:
                    r.failure(f"status {status}")
                retry_after = r.headers.get("retry-after") if r.headers else None
            rec.add(start, latency, p["kind"], status)
            if args.honour_retry_after and status == 503 and retry_after:
                gevent.sleep(float(retry_after))  # as HTTP asks of a client told to come back

    env = Environment(user_classes=[Client], events=events)
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    deadline = time.perf_counter() + args.warmup + args.duration + args.timeout + 5
    while not rec.done() and time.perf_counter() < deadline:
        rec.tick()
        gevent.sleep(0.05)
    out = rec.result("locust", args.users)
    runner.quit()
    total = env.stats.total
    out["locust_stats"] = {  # locust's own view (whole run, warm-up included; rounded ms)
        "requests": total.num_requests, "failures": total.num_failures,
        "p50_ms": total.get_response_time_percentile(0.5),
        "p99_ms": total.get_response_time_percentile(0.99)}
    return out


def run_httpx(args: argparse.Namespace) -> dict:
    import asyncio

    import httpx

    payloads = load_payloads(args.payloads)
    rec = Recorder(args.warmup, args.duration, args.max_requests)
    step = max(1, len(payloads) // max(args.users, 1))

    async def user(client: httpx.AsyncClient, u: int) -> None:
        i = u * step
        while not rec.done():
            rec.tick()
            p = payloads[i % len(payloads)]
            i += 1
            start = rec.now()
            try:
                r = await client.post(p["path"], content=p["data"],
                                      headers={"content-type": "application/json"})
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            rec.add(start, (rec.now() - start) * 1e3, p["kind"], status)

    async def main() -> None:
        limits = httpx.Limits(max_connections=args.users, max_keepalive_connections=args.users)
        async with httpx.AsyncClient(base_url=args.host, limits=limits,
                                     timeout=args.timeout) as client:
            tasks = [asyncio.create_task(user(client, u)) for u in range(args.users)]
            ticker_deadline = args.warmup + args.duration + args.timeout + 5
            while not rec.done() and rec.now() < ticker_deadline:
                rec.tick()
                await asyncio.sleep(0.05)
            await asyncio.wait(tasks, timeout=args.timeout)
            for t in tasks:
                t.cancel()

    asyncio.run(main())
    return rec.result("httpx", args.users)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", choices=["locust", "httpx"], default="locust")
    ap.add_argument("--host", required=True)
    ap.add_argument("--payloads", required=True)
    ap.add_argument("--users", type=int, required=True)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--honour-retry-after", action="store_true",
                    help="locust: a user told 503 + Retry-After waits that long before its "
                         "next request (without it, refused users retry at once)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if urlparse(args.host).hostname not in LOOPBACK:
        raise SystemExit(f"--host {args.host}: this benchmark only sends traffic to this machine")
    out = run_locust(args) if args.client == "locust" else run_httpx(args)
    with open(args.out, "w") as f:
        json.dump(out, f)
    os._exit(0)  # locust's greenlets and gevent's hub need no orderly teardown


if __name__ == "__main__":
    main()
