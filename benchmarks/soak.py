"""Soak: the whole pipeline, ingest to export, many times through ``ray job submit`` on a local
multi-node Ray cluster, against one clean single-process run of the same data and settings.

The cluster is shaped as ``cluster/README.md`` describes (and ``tests/test_cluster_jobs.py``
builds): a head with ``--num-cpus 0`` and two worker nodes joined with ``ray start --address``,
each with its own ``--temp-dir`` and ``TMPDIR`` (as each pod has its own disk), the project's
venv first on ``PATH``. Each run draws from a seeded plan:
- into a **fresh** run directory, or **resumed** into the directory of an earlier run;
- a worker node **killed** at a random moment (every process of the node SIGKILLed, then a new
  node joins, as KubeRay replaces a pod) and, if the job fails, resubmitted once;
- the run directory on the **local** filesystem or on **s3** (moto's server on 127.0.0.1).

Per run it records the exit status of every submission, the stage that failed and the job
log's last error line, how many tracebacks the job's log holds, each stage's wall time (the
manifest), and whether the output equals the single-process run: the ingested image ids and
the mined pairs equal, no row lost or duplicated; which pairs the LLMs describe and instruct
only where their sampling is seeded (vLLM's CPU sampler is not): otherwise those sets must be
consistent (no duplicates, instructed within described within mined, one exported triplet per
instructed pair).

    python benchmarks/soak.py --runs 12 --shards 3 \
        --out benchmarks/results/cpu-2core/soak.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "soak"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sh(args: list[str], env: dict[str, str], timeout: float = 1800,
       ) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


class Cluster:
    """Head (no CPUs) + worker nodes of ``cpus`` CPUs, each with its own temp dir and /tmp;
    with ``shared_temp``, all in one temp dir and one /tmp, as plain ``ray start`` commands on
    one machine leave them (the issue's first report)."""

    def __init__(self, root: Path, env: dict[str, str], cpus: int,
                 shared_temp: bool = False) -> None:
        self.root, self.env, self.cpus, self.shared_temp = root, env, cpus, shared_temp
        self.gcs, self.dash = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dash}"
        self.workers: list[str] = []  # node names (their temp dirs)
        self.serial = 0

    def _ports(self) -> list[str]:
        return [f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]

    def start(self, workers: int) -> None:
        head = "shared" if self.shared_temp else "head"
        r = sh([str(BIN / "ray"), "start", "--head", f"--temp-dir={self.root}/{head}",
                f"--port={self.gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash}", *self._ports()], self.env, 300)
        if r.returncode:
            raise RuntimeError(f"ray start --head failed: {r.stderr[-2000:]}")
        for _ in range(workers):
            self.add_worker()

    def add_worker(self) -> str:
        self.serial += 1
        name = f"w{self.serial}"
        tmp = self.root / name / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        temp_dir, env = ((f"{self.root}/shared", self.env) if self.shared_temp
                         else (f"{self.root}/{name}", {**self.env, "TMPDIR": str(tmp)}))
        r = sh([str(BIN / "ray"), "start", f"--temp-dir={temp_dir}",
                f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={self.cpus}", *self._ports()],
               env, 300)
        if r.returncode:
            raise RuntimeError(f"ray start (worker) failed: {r.stderr[-2000:]}")
        self.workers.append(name)
        return name

    def kill_worker(self, rng: random.Random) -> str:
        """SIGKILL every process of one worker node, then join a new one in its place."""
        name = rng.choice(self.workers)
        kill_tree(f"{self.root}/{name}")
        self.workers.remove(name)
        self.add_worker()
        return name

    def stop(self) -> None:
        kill_tree(str(self.root))


def kill_tree(pattern: str) -> None:
    """SIGKILL every process whose command line holds ``pattern`` and all their descendants:
    a node's agents and vLLM's engine processes don't name the node's folder, and a pod's loss
    takes them too."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    pids = {int(p) for p in found.split()} - {os.getpid()}
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            os.kill(pid, 9)


def submit(cluster: Cluster, overrides: list[str], env_vars: dict[str, str]) -> str:
    job_id = f"soak-{uuid.uuid4().hex[:8]}"
    args = [str(BIN / "ray"), "job", "submit", "--address", cluster.url, "--working-dir", ".",
            "--submission-id", job_id, "--no-wait",
            "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
            "python", "jobs/run_pipeline.py", "--config", "configs/tiny.yaml"]
    for o in overrides:
        args += ["--set", o]
    r = sh(args, cluster.env, 300)
    if r.returncode:
        raise RuntimeError(f"ray job submit failed: {r.stderr[-2000:]}")
    return job_id


def job_status(cluster: Cluster, job_id: str) -> str:
    """From the dashboard's job API (a `ray` CLI call would start a Python each poll: seconds
    of a core taken from the jobs on a small machine)."""
    with urllib.request.urlopen(f"{cluster.url}/api/jobs/{job_id}", timeout=120) as response:
        status = json.loads(response.read())["status"].lower()
    return status if status in ("succeeded", "failed", "stopped") else "running"


def job_logs(cluster: Cluster, job_id: str) -> str:
    return sh([str(BIN / "ray"), "job", "logs", "--address", cluster.url, job_id],
              cluster.env, 300).stdout


def wait(cluster: Cluster, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(cluster, job_id)
        if status != "running":
            return status
        time.sleep(3)
    sh([str(BIN / "ray"), "job", "stop", "--address", cluster.url, job_id], cluster.env, 120)
    return "timed out"


def failure(logs: str) -> dict[str, str]:
    """The stage that was running and the job log's last error line."""
    stage = ""
    for m in re.finditer(r"(?:running|stage)[: ]+(ingest|embed|index|mine|describe|instruct|"
                         r"export)\b", logs):
        stage = m.group(1)
    errors = [ln for ln in logs.splitlines() if re.search(r"error|Error|Traceback", ln)]
    return {"stage": stage, "error": errors[-1][-400:] if errors else logs[-400:]}


# ----------------------------------------------------------------------------- outputs


def outputs(run_dir: str) -> dict[str, Any]:
    """What a run produced, in comparable form (sorted ids; counts to find duplicates)."""
    from megapairs_ray.io import layout, storage

    def column(folder: str, name: str) -> list[Any]:
        table = storage.read_parquet_dir(folder, columns=[name])
        return sorted(table.column(name).to_pylist()) if table is not None else []

    triplets = storage.join(layout.triplets_dir(run_dir), "megapairs.jsonl")
    fs, path = storage.filesystem(triplets)
    rows = ([json.loads(ln) for ln in fs.cat_file(path).decode().splitlines() if ln]
            if storage.exists(triplets) else [])
    manifest = storage.read_json(layout.manifest_file(run_dir))
    return {
        "image_ids": column(layout.images_dir(run_dir), "image_id"),
        "pair_ids": column(layout.pairs_dir(run_dir), "pair_id"),
        "described": column(layout.descriptions_dir(run_dir), "pair_id"),
        "instructed": column(layout.instructions_dir(run_dir), "pair_id"),
        "triplets": sorted(f"{r['q_img']}>{r['t_img']}" for r in rows),
        "stage_seconds": {k: v.get("seconds") for k, v in manifest.get("stages", {}).items()},
    }


def compare(got: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Ids, pairs: equal to the reference's. What the LLMs decide (which pairs get usable
    descriptions and instructions) only where sampling is seeded, which vLLM's CPU sampler is
    not: there each set must be consistent (no duplicates, instructed within described within
    the mined pairs, a triplet per instructed pair), and its overlap with the reference's is
    recorded."""
    out: dict[str, Any] = {}
    for key in ("image_ids", "pair_ids", "described", "instructed", "triplets"):
        g, r = Counter(got[key]), Counter(ref[key])
        out[key] = {"equal": g == r, "lost": sum((r - g).values()),
                    "extra": sum((g - r).values()),
                    "duplicated": sum(n - 1 for n in g.values() if n > 1)}
    described, instructed = set(got["described"]), set(got["instructed"])
    out["consistent"] = (all(v["duplicated"] == 0 for v in out.values())
                         and instructed <= described <= set(got["pair_ids"])
                         and len(got["triplets"]) == len(got["instructed"]))
    out["equal"] = (out["consistent"] and out["image_ids"]["equal"]
                    and out["pair_ids"]["equal"])
    return out


# ----------------------------------------------------------------------------- the soak


def plan(runs: int, seed: int, kills: bool = True) -> list[dict[str, Any]]:
    """At least a third of the runs killed (unless ``kills`` is off) and a third on s3; every
    fourth run resumed into an earlier run's directory. Kills go to fresh runs only: a resume
    into a finished run ends in seconds, before any kill lands (the first soak's fourth kill
    found its job done)."""
    rng = random.Random(seed)
    fresh = [i for i in range(runs) if i % 4 != 3]
    killed = set(rng.sample(fresh, min(len(fresh), max(1, runs // 3))))
    if not kills:
        killed = set()
    s3 = set(rng.sample(range(runs), max(1, runs // 3)))
    return [{"run": i, "kill": i in killed, "storage": "s3" if i in s3 else "local",
             "resume": i % 4 == 3} for i in range(runs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--shards", type=int, default=3, help="corpus shards (100 images each)")
    ap.add_argument("--worker-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared-temp-dir", action="store_true",
                    help="all nodes in one Ray temp dir and one /tmp, as plain `ray start` on "
                         "one machine leaves them; no kills (a node's processes can't be told "
                         "apart by path)")
    ap.add_argument("--timeout", type=float, default=1800, help="per submission, seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    root = Path("/tmp") / f"mp-soak-{uuid.uuid4().hex[:6]}"
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for tar in sorted((REPO / "data" / "corpus").glob("shard-*.tar"))[: args.shards]:
        shutil.copy(tar, corpus / tar.name)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    s3_env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
              "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(s3_env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    common = [f"input.uris=[{corpus}]", "mine.query_fraction=0.2"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)

    # The reference: one process, its own local Ray, the same data and settings.
    ref_dir = str(root / "reference")
    start = time.time()
    r = sh([str(BIN / "megapairs"), "run", "-c", "configs/tiny.yaml",
            *[a for o in [f"run_dir={ref_dir}", *common] for a in ("--set", o)]], env)
    if r.returncode:
        raise RuntimeError(f"reference run failed: {r.stderr[-3000:]}")
    reference = outputs(ref_dir)
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "cluster": {"worker_cpus": args.worker_cpus, "shared_temp_dir": args.shared_temp_dir},
        "corpus_images": len(reference["image_ids"]), "reference_seconds": time.time() - start,
        "reference_stage_seconds": reference["stage_seconds"],
        "reference_counts": {k: len(v) for k, v in reference.items() if isinstance(v, list)},
        "runs": []}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)

    cluster = Cluster(root / "ray", env, args.worker_cpus, args.shared_temp_dir)
    rng = random.Random(args.seed)
    try:
        cluster.start(2)
        dirs: list[str] = []
        for p in plan(args.runs, args.seed, kills=not args.shared_temp_dir):
            earlier = [d for d in dirs if d.startswith("s3://") == (p["storage"] == "s3")]
            if p["resume"] and earlier:
                run_dir = rng.choice(earlier)
            else:
                name = f"run-{p['run']:02d}"
                run_dir = (f"s3://{BUCKET}/{name}" if p["storage"] == "s3"
                           else str(root / "runs" / name))
                dirs.append(run_dir)
            # A resume with no earlier run on its storage is a fresh run: say so.
            record: dict[str, Any] = {**p, "resume": bool(p["resume"] and earlier),
                                      "run_dir": run_dir, "submissions": []}
            start = time.time()
            for attempt in range(2):
                job = submit(cluster, [f"run_dir={run_dir}", "ray.address=auto", *common],
                             {**s3_env, "HF_HUB_OFFLINE": "1"})
                if p["kill"] and attempt == 0:
                    time.sleep(rng.uniform(20, 120))  # runs take ~150-190 s
                    if job_status(cluster, job) == "running":
                        record["killed_node"] = cluster.kill_worker(rng)
                        record["killed_at_s"] = round(time.time() - start, 1)
                status = wait(cluster, job, args.timeout)
                sub: dict[str, Any] = {"job": job, "status": status}
                logs = job_logs(cluster, job)
                # A successful run's log should hold no traceback (issue: teardown noise).
                sub["tracebacks_in_log"] = logs.count("Traceback (most recent call last)")
                if status != "succeeded":
                    sub.update(failure(logs))
                record["submissions"].append(sub)
                if status == "succeeded" or not p["kill"]:
                    break
            record["seconds"] = round(time.time() - start, 1)
            record["succeeded"] = record["submissions"][-1]["status"] == "succeeded"
            if record["succeeded"]:
                got = outputs(run_dir)
                record["stage_seconds"] = got["stage_seconds"]
                record["compare"] = compare(got, reference)
            report["runs"].append(record)
            print(json.dumps(record), flush=True)
            if args.out:  # kept after every run: a soak stopped midway keeps what it measured
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    finally:
        cluster.stop()
        moto.stop()
    runs = report["runs"]
    report["summary"] = {
        "runs": len(runs), "killed": sum(r["kill"] for r in runs),
        "on_s3": sum(r["storage"] == "s3" for r in runs),
        "resumed": sum(r["resume"] for r in runs),
        "succeeded": sum(r["succeeded"] for r in runs),
        "equal_to_reference": sum(bool(r.get("compare", {}).get("equal")) for r in runs),
        "needed_a_resubmission": sum(len(r["submissions"]) > 1 for r in runs),
        "succeeded_with_a_traceback_in_log": sum(
            r["succeeded"] and r["submissions"][-1]["tracebacks_in_log"] > 0 for r in runs),
        # A run without a kill must succeed at once; a killed one after one resubmission.
        "failed": sum(not r["succeeded"] for r in runs),
    }
    print(json.dumps(report["summary"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
