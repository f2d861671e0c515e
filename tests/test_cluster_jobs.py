"""`ray job submit`, for real, against a local multi-node Ray cluster shaped like KubeRay's.

The cluster: a head with `--num-cpus 0` (KubeRay's head takes no work) and two worker nodes
joined with `ray start --address`, each with its own temp dir as a pod has its own disk, token
authentication as Ray 2.60 sets it up (a generated token every node and the client get, the way
KubeRay hands a Secret to its pods and the submitter). Jobs are submitted with the `ray` CLI
exactly as the README says. The cluster is stopped by killing the processes that name its temp
dir, never with `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from megapairs_ray.train.evaluate import run_eval
from megapairs_ray.train.toy_triplets import write_toy_dataset
from tests.helpers import good_samples, stop_local_cluster, write_tar
from tests.serve_helpers import free_port
from tests.test_evaluate import make_circo
from tests.train_helpers import train_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    url: str  # the dashboard: where `ray job submit --address` goes
    env: dict[str, str]  # a client's environment: the token, the venv first on PATH
    head_node: str
    worker_nodes: list[str]
    root: Path  # every node's temp dir is under it
    gcs: int
    lost: list[str] = field(default_factory=list)  # killed worker nodes (Ray sees it later)


def _ray(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[Cluster]:
    root = Path("/tmp") / f"mp-kr-{uuid.uuid4().hex[:6]}"  # short: socket paths have a limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32),
           # A lost node is declared dead after 5 failed health checks a second apart, not 3 s
           # apart (Ray's default): the tests that lose one wait for that, and nothing else
           # changes. (Each check still waits up to 10 s for an answer.)
           "RAY_health_check_period_ms": "1000"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    try:
        head = _ray(env, "start", "--head", f"--temp-dir={root}/head", f"--port={gcs}",
                    "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    *_ports(), timeout=180)
        assert head.returncode == 0, head.stderr[-2000:]
        c = Cluster(f"http://127.0.0.1:{dash}", env, "", [], root, gcs)
        for name in ("cpu-a", "cpu-b"):
            _add_worker(c, name)
        nodes = _nodes(c)
        c.head_node = next(n["node_id"] for n in nodes if n["is_head_node"])
        assert len(c.worker_nodes) == 2
        yield c
    finally:
        stop_local_cluster(root, gcs)


def _ports() -> list[str]:
    return [f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]


def _api(cluster: Cluster, path: str) -> Any:
    """GET a path of the cluster's dashboard API, as the `ray` CLI does, with the token. The
    test's own waits and checks ask here: a `ray` CLI call is a Python start-up (seconds of a
    core), and polling with it took CPU from the jobs on this 2-core machine."""
    request = urllib.request.Request(
        cluster.url + path,
        headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _state(cluster: Cluster, kind: str, *filters: tuple[str, str]) -> list[dict]:
    """Ray's state API (what `ray list <kind> --detail` prints), with ``key=value`` filters."""
    query = urllib.parse.urlencode({"limit": 10000, "detail": "true"})
    for key, value in filters:
        query += "&" + urllib.parse.urlencode({"filter_keys": key, "filter_predicates": "=",
                                                "filter_values": value})
    doc = _api(cluster, f"/api/v0/{kind}?{query}")
    assert doc["result"], doc
    return doc["data"]["result"]["result"]


def _nodes(cluster: Cluster) -> list[dict]:
    return _state(cluster, "nodes")


def _add_worker(cluster: Cluster, name: str) -> str:
    """Join a worker node of 2 CPUs with its own temp dir (a pod); its node id."""
    # Its own /tmp too, as a pod has: Ray Train's workers download the checkpoint they restore
    # into a temp dir named by the checkpoint; with one /tmp under two nodes, a restored worker
    # read a trainer state the other node's download was still writing (EOFError).
    tmp = cluster.root / name / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    worker = _ray({**cluster.env, "TMPDIR": str(tmp)}, "start", f"--temp-dir={cluster.root}/{name}",
                  f"--address=127.0.0.1:{cluster.gcs}", "--num-cpus=2", *_ports(), timeout=180)
    assert worker.returncode == 0, worker.stderr[-2000:]
    for _ in range(60):
        new = [n["node_id"] for n in _nodes(cluster) if not n["is_head_node"]
               and n["state"] == "ALIVE"
               and n["node_id"] not in cluster.worker_nodes + cluster.lost]
        if new:
            break
        time.sleep(0.5)
    assert len(new) == 1, new
    cluster.worker_nodes.append(new[0])
    return new[0]


def _kill_node(cluster: Cluster, node_id: str) -> None:
    """SIGKILL every process of one worker node (its raylet, its workers), as a pod lost with
    its machine; the node's temp dir names them all."""
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    raylet = next(line for line in ps.splitlines() if f"--node_id={node_id}" in line)
    temp_dir = re.search(r"--temp_dir=(\S+)", raylet).group(1)
    assert temp_dir.startswith(str(cluster.root)) and not temp_dir.endswith("/head")
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
    cluster.worker_nodes.remove(node_id)
    cluster.lost.append(node_id)


def _submit(cluster: Cluster, *entrypoint: str, env_vars: dict[str, str] | None = None,
            wait: bool = True) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit --working-dir . -- <entrypoint>`` as a user types it; (job id, result).
    ``wait=False``: ``--no-wait``, the job runs on while the caller does something to it."""
    job_id = f"mp-{uuid.uuid4().hex[:8]}"
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    no_wait = [] if wait else ["--no-wait"]
    result = _ray(cluster.env, "job", "submit", "--address", cluster.url, "--working-dir", ".",
                  "--submission-id", job_id, *no_wait, *runtime, "--", *entrypoint,
                  timeout=900)
    return job_id, result


def _job_status(cluster: Cluster, job_id: str) -> str:
    status = _api(cluster, f"/api/jobs/{job_id}")["status"].lower()
    return status if status in ("succeeded", "failed", "stopped") else "running"


def _wait_job(cluster: Cluster, job_id: str, timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _job_status(cluster, job_id)
        if status != "running":
            return status
        time.sleep(0.5)
    return "timed out"


def _logs(cluster: Cluster, job_id: str) -> str:
    return _ray(cluster.env, "job", "logs", "--address", cluster.url, job_id).stdout


def _placement(cluster: Cluster, job_id: str, kind: str, state: str | None = None,
               ) -> list[tuple[str, str]]:
    """(name, node id) of a job's tasks or actors, from Ray's state API, those in ``state``
    if given ([] while the job's driver has not started)."""
    jobs = _api(cluster, "/api/jobs/")
    ray_job = next((j["job_id"] for j in jobs if j["submission_id"] == job_id), None)
    if ray_job is None:
        return []
    name = "func_or_class_name" if kind == "tasks" else "class_name"
    return [(str(r.get(name) or r.get("name")), r["node_id"])
            for r in _state(cluster, kind, ("job_id", ray_job))
            if r.get("node_id") and state in (None, r.get("state"))]


def test_a_client_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    result = _ray(env, "job", "list", "--address", cluster.url, timeout=120)
    assert result.returncode != 0
    assert "auth" in (result.stdout + result.stderr).lower()


def _markers(run_dir: Path, stage: str) -> int:
    return len(list((run_dir / "_state" / stage).glob("*.json")))


# Two tests' time budget: it is the two former tests' work in one job.
@pytest.mark.timeout(1200)
def test_the_pipeline_job_runs_on_the_worker_nodes_and_a_node_lost_in_embed_loses_no_row(
        cluster, tmp_path):
    """One pipeline job, ingest to mine, as the README submits it: the worker node the embed
    actor lives on is killed during embed. (One job for both behaviours: each job starts a
    driver and loads the profile's encoders, the module's costliest steps after training.)"""
    from megapairs_ray.stages.embed_io import load_space

    shards, per_shard = 36, 10
    for i in range(shards):
        write_tar(tmp_path / "corpus" / f"s{i:02d}.tar",
                  good_samples(per_shard, prefix=f"s{i:02d}"))
    run_dir = tmp_path / "run"
    job_id, result = _submit(
        cluster, "python", "jobs/run_pipeline.py", "--config", "configs/tiny.yaml",
        "--set", f"run_dir={run_dir}", "--set", f"input.uris=[{tmp_path / 'corpus'}]",
        "--set", "embed.batch_size=2", "--set", "mine.min_hard_negatives=2",
        "--stages", "ingest,embed,index,mine", wait=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    spaces = [s["name"] for s in yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
              ["embed"]["spaces"]]
    # The node the embed actor lives on goes as soon as the actor is up (its model loaded, the
    # stage's readers running): the stage's work in flight on that node is lost with it.
    deadline, victim = time.time() + 600, None
    while victim is None:
        assert time.time() < deadline and _job_status(cluster, job_id) == "running", \
            _logs(cluster, job_id)[-4000:]
        victim = next((node for name, node in _placement(cluster, job_id, "actors", "ALIVE")
                       if "EmbedStage" in name), None)
        time.sleep(0.2)
    _kill_node(cluster, victim)
    done_at_kill = _markers(run_dir, f"embed.{spaces[0]}")
    _add_worker(cluster, "cpu-c")  # KubeRay replaces a lost pod; the module's tests go on on two
    assert _wait_job(cluster, job_id) == "succeeded", _logs(cluster, job_id)[-4000:]

    assert done_at_kill < shards, f"the kill came after embed had finished ({done_at_kill})"
    doc = json.loads((run_dir / "manifest.json").read_text())
    assert set(doc["stages"]) == {"ingest", "embed", "index", "mine"}
    assert doc["stages"]["ingest"]["counts"]["images"] == shards * per_shard
    assert doc["stages"]["embed"]["counts"]["embedded"] == shards * per_shard
    for space in doc["config"]["embed"]["spaces"]:  # the profile's spaces, whichever they are
        assert doc["stages"]["index"]["counts"][f"{space['name']}_vectors"] == shards * per_shard
    assert doc["stages"]["mine"]["counts"]["shards_mined"] == shards
    assert _markers(run_dir, "mine") == shards
    assert not (run_dir / "_state" / "lock.json").exists()  # released at the end
    image_ids = pq.read_table(run_dir / "images", columns=["image_id"]).column(
        "image_id").to_pylist()
    assert len(image_ids) == shards * per_shard
    for space in spaces:
        ids, vectors = load_space(str(run_dir), space)
        assert len(ids) == len(set(ids.tolist())) == len(image_ids), space  # none lost, none twice
        assert set(ids.tolist()) == set(image_ids), space
        assert len(vectors) == len(ids)
    # The pool went on elsewhere: an embed actor now lives on a node that is still there.
    placed = _placement(cluster, job_id, "tasks") + _placement(cluster, job_id, "actors")
    nodes = {node for name, node in placed if "EmbedStage" in name}
    assert nodes & set(cluster.worker_nodes), nodes
    # The head takes no work: every stage's tasks and actors ran on worker nodes, the killed one
    # included (Ray's own zero-CPU bookkeeping actors may sit anywhere). Ray Data's map tasks
    # (ingest, the embed readers and writers, the index's staging) are all named _map_task.
    workers = set(cluster.worker_nodes) | set(cluster.lost)
    for stage_part in ("_map_task", "EmbedStage", "train_index", "_build_shard_task",
                       "IndexShard", "MineShard"):
        nodes = {node for name, node in placed if stage_part in name}
        assert nodes, f"no task or actor named {stage_part} in {sorted({n for n, _ in placed})}"
        assert nodes <= workers and cluster.head_node not in nodes, stage_part
    # The stages after embed ran after the loss, on the nodes that are still there.
    for stage_part in ("train_index", "_build_shard_task", "IndexShard", "MineShard"):
        assert {node for name, node in placed if stage_part in name} <= set(
            cluster.worker_nodes), stage_part


def test_a_wrong_config_fails_fast_with_the_cause_in_the_job_logs(cluster, tmp_path):
    job_id, result = _submit(cluster, "python", "jobs/run_pipeline.py", "--config",
                             "configs/tiny.yaml", "--set", "embed.batch_size=-3",
                             "--set", f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    logs = _ray(cluster.env, "job", "logs", "--address", cluster.url, job_id).stdout
    assert "embed.batch_size" in logs and "Traceback" not in logs
    # A relative input path the upload left out says why.
    _, result = _submit(cluster, "python", "jobs/run_pipeline.py", "--config",
                        "configs/tiny.yaml", "--set", f"run_dir={tmp_path / 'run2'}",
                        "--set", "input.uris=[data/not-uploaded]", "--stages", "ingest")
    assert result.returncode != 0
    assert "does not upload what .gitignore lists" in result.stdout + result.stderr


def test_mllm_training_on_two_nodes_survives_losing_one_and_restores_its_checkpoint(
        cluster, tmp_path, bucket, s3_endpoint):
    """The paper's strongest retriever, as a cluster trains it: the mllm family (the LLaVA-NeXT
    twin under LoRA) on two gloo workers on two nodes, GradCache in chunks of 2 with every
    worker's candidates gathered. A node is lost after the first checkpoint; the run restores
    it on the node that replaces it and finishes, and its checkpoint (a LoRA adapter on s3) is
    evaluated as a user submits it. (That this step learns is tests/test_mllm.py's, on one
    fixed batch: a step's loss here swings by ±0.5 with its 4 queries, and showing learning
    through that noise took 64 steps, two minutes of this test.)"""
    import s3fs

    annotations = write_toy_dataset(tmp_path / "toy")
    steps, every = 16, 8
    doc = train_config(str(annotations), f"s3://{bucket}/train", "multi",
                       model={"init": "tiny-random-llava-next", "family": "mllm",
                              "mllm": {"image_size": 56, "max_text_len": 96,
                                       "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}},
                       data={"num_hard_negatives": 1},
                       optim={"max_steps": steps, "warmup_steps": 2, "lr": 3e-3,
                              "grad_cache_chunk": 2},
                       scaling={"num_workers": 2, "cpus_per_worker": 1.5},
                       checkpoint={"every_steps": every, "log_every_steps": 1,
                                   "max_failures": 1})
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                      "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    job_id, result = _submit(cluster, "python", "jobs/train_mmret.py", "--config",
                             str(cfg_file), env_vars=aws, wait=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    fs = s3fs.S3FileSystem()
    # The first checkpoint is registered (in Ray Train's run snapshot, not just uploaded: a
    # node lost between the two takes the registration with it): a node goes.
    snapshot = f"{bucket}/train/multi/checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while not (fs.exists(snapshot)
               and f"step_{every:08d}" in fs.cat_file(snapshot).decode()):
        assert time.time() < deadline and _job_status(cluster, job_id) == "running", \
            _logs(cluster, job_id)[-4000:]
        time.sleep(0.2)
        fs.invalidate_cache()
    # 1.5 CPUs a worker on 2-CPU nodes: one Ray Train worker on each worker node, none on the
    # head; either node holds one.
    before = {node for name, node in _placement(cluster, job_id, "actors")
              if "TrainWorker" in name}
    assert before == set(cluster.worker_nodes), _placement(cluster, job_id, "actors")
    victim = cluster.worker_nodes[-1]
    _kill_node(cluster, victim)
    _add_worker(cluster, "cpu-d")  # the capacity comes back, as KubeRay replaces a pod
    fs.invalidate_cache()
    assert _wait_job(cluster, job_id) == "succeeded", (
        _logs(cluster, job_id)[-4000:],
        {k: v["size"] for k, v in fs.find(f"{bucket}/train/multi", detail=True).items()
         if "prepared" not in k})

    summary = json.loads(fs.cat_file(f"{bucket}/train/multi/summary.json"))
    assert summary["metrics"]["step"] == steps
    # The checkpoint is the adapter (the base is named, not copied) with the family's settings.
    assert {"adapter_model.safetensors", "mmret_mllm.json"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/train/multi/step_{steps:08d}")}
    rows = [json.loads(line) for line in
            fs.cat_file(f"{bucket}/train/multi/metrics.jsonl").decode().splitlines()]
    logged = [r["step"] for r in rows if "loss" in r]
    # A second worker group started after the loss, from a registered checkpoint: any step it
    # logged again follows a checkpoint's step, never a fresh start from step 1.
    workers = [(name, node) for name, node in _placement(cluster, job_id, "actors")
               if "TrainWorker" in name]
    assert len(workers) == 4, workers
    restarts = [b for a, b in itertools.pairwise(logged) if b <= a]
    assert len(restarts) <= 1 and all(b - 1 >= every and (b - 1) % every == 0
                                      for b in restarts), logged
    assert logged[-1] == steps and set(logged) == set(range(1, steps + 1)), logged
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r), rows
    assert {node for _, node in workers} - before <= set(cluster.worker_nodes)

    # Then the evaluation, as a user submits it: the run folder on s3 (its last checkpoint),
    # the work on a worker node (`--cpus`), the report written to s3.
    circo = make_circo(tmp_path / "circo")
    eval_id, result = _submit(
        cluster, "python", "jobs/evaluate.py", "--checkpoint", f"s3://{bucket}/train/multi",
        "--benchmark", "circo", "--data", str(circo), "--cpus", "1",
        "--out", f"s3://{bucket}/eval/circo.json", env_vars=aws)
    assert result.returncode == 0 and "succeeded" in result.stdout, \
        (result.stdout + result.stderr)[-4000:]
    report = json.loads(fs.cat_file(f"{bucket}/eval/circo.json"))
    assert report["checkpoint"].endswith(f"train/multi/step_{steps:08d}"), report["checkpoint"]
    here = run_eval(report["checkpoint"], "circo", str(circo))  # the same, in this process
    assert report["results"][0]["metrics"] == pytest.approx(here["results"][0]["metrics"])
    ran = {node for name, node in _placement(cluster, eval_id, "tasks") if name == "run_eval"}
    assert ran and ran <= set(cluster.worker_nodes), _placement(cluster, eval_id, "tasks")
