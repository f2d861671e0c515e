"""`ray job submit`, for real, against a local multi-node Ray cluster shaped like KubeRay's.

The cluster: a head with `--num-cpus 0` (KubeRay's head takes no work) and two worker nodes
joined with `ray start --address`, each with its own temp dir as a pod has its own disk, token
authentication as Ray 2.60 sets it up (a generated token every node and the client get, the way
KubeRay hands a Secret to its pods and the submitter). Jobs are submitted with the `ray` CLI
exactly as the README says. The cluster is stopped by killing the processes that name its temp
dir, never with `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from megapairs_ray.train.toy_triplets import write_toy_dataset
from tests.helpers import good_samples, write_tar
from tests.serve_helpers import free_port
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


def _ray(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[Cluster]:
    root = Path("/tmp") / f"mp-kr-{uuid.uuid4().hex[:6]}"  # short: socket paths have a limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()

    def ports() -> list[str]:
        return [f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]

    try:
        head = _ray(env, "start", "--head", f"--temp-dir={root}/head", f"--port={gcs}",
                    "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    *ports(), timeout=180)
        assert head.returncode == 0, head.stderr[-2000:]
        for name in ("cpu-a", "cpu-b"):
            worker = _ray(env, "start", f"--temp-dir={root}/{name}",
                          f"--address=127.0.0.1:{gcs}", "--num-cpus=2", *ports(), timeout=180)
            assert worker.returncode == 0, worker.stderr[-2000:]
        nodes = json.loads(_ray(env, "list", "nodes", "--address", f"http://127.0.0.1:{dash}",
                                "--format=json", "--detail").stdout)
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        workers = [n["node_id"] for n in nodes if not n["is_head_node"]]
        assert len(workers) == 2
        yield Cluster(f"http://127.0.0.1:{dash}", env, head_id, workers)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _submit(cluster: Cluster, *entrypoint: str, env_vars: dict[str, str] | None = None,
            ) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit --working-dir . -- <entrypoint>`` as a user types it; (job id, result)."""
    job_id = f"mp-{uuid.uuid4().hex[:8]}"
    runtime = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    result = _ray(cluster.env, "job", "submit", "--address", cluster.url, "--working-dir", ".",
                  "--submission-id", job_id, *runtime, "--", *entrypoint, timeout=900)
    return job_id, result


def _placement(cluster: Cluster, job_id: str, kind: str) -> list[tuple[str, str]]:
    """(name, node id) of a job's tasks or actors, from Ray's state API."""
    jobs = json.loads(_ray(cluster.env, "list", "jobs", "--address", cluster.url,
                           "--format=json").stdout)
    ray_job = next(j["job_id"] for j in jobs if j["submission_id"] == job_id)
    rows = json.loads(_ray(cluster.env, "list", kind, "--address", cluster.url, "--format=json",
                           "--detail", "--limit=10000", "--filter", f"job_id={ray_job}").stdout)
    name = "func_or_class_name" if kind == "tasks" else "class_name"
    return [(str(r.get(name) or r.get("name")), r["node_id"]) for r in rows if r.get("node_id")]


def test_a_client_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN"}
    result = _ray(env, "job", "list", "--address", cluster.url, timeout=120)
    assert result.returncode != 0
    assert "auth" in (result.stdout + result.stderr).lower()


def test_the_pipeline_job_runs_its_stages_on_the_worker_nodes(cluster, tmp_path):
    for i in range(2):
        write_tar(tmp_path / "corpus" / f"s{i}.tar", good_samples(8, prefix=f"s{i}"))
    run_dir = tmp_path / "run"
    job_id, result = _submit(
        cluster, "python", "jobs/run_pipeline.py", "--config", "configs/tiny.yaml",
        "--set", f"run_dir={run_dir}", "--set", f"input.uris=[{tmp_path / 'corpus'}]",
        "--set", "mine.min_hard_negatives=2", "--stages", "ingest,embed,index,mine")
    assert result.returncode == 0 and "succeeded" in result.stdout, \
        (result.stdout + result.stderr)[-4000:]
    doc = json.loads((run_dir / "manifest.json").read_text())
    assert set(doc["stages"]) == {"ingest", "embed", "index", "mine"}
    assert doc["stages"]["ingest"]["counts"]["images"] == 16
    assert doc["stages"]["embed"]["counts"]["embedded"] == 16
    for space in doc["config"]["embed"]["spaces"]:  # the profile's spaces, whichever they are
        assert doc["stages"]["index"]["counts"][f"{space['name']}_vectors"] == 16
    assert doc["stages"]["mine"]["counts"]["shards_mined"] == 2
    assert len(list((run_dir / "_state" / "mine").glob("*.json"))) == 2
    assert not (run_dir / "_state" / "lock.json").exists()  # released at the end
    # The head takes no work: every stage's tasks and actors ran on worker nodes (Ray's own
    # zero-CPU bookkeeping actors may sit anywhere). Ray Data's map tasks (ingest, the embed
    # readers and writers, the index's staging) are all named _map_task.
    placed = _placement(cluster, job_id, "tasks") + _placement(cluster, job_id, "actors")
    for stage_part in ("_map_task", "EmbedStage", "train_index", "_build_shard_task",
                       "IndexShard", "MineShard"):
        nodes = {node for name, node in placed if stage_part in name}
        assert nodes, f"no task or actor named {stage_part} in {sorted({n for n, _ in placed})}"
        assert nodes <= set(cluster.worker_nodes), stage_part


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


def test_training_runs_one_worker_on_each_node_with_checkpoints_on_s3(cluster, tmp_path,
                                                                       bucket, s3_endpoint):
    annotations = write_toy_dataset(tmp_path / "toy")
    doc = train_config(str(annotations), f"s3://{bucket}/train", "multi",
                       optim={"max_steps": 6, "warmup_steps": 0},
                       scaling={"num_workers": 2, "cpus_per_worker": 1.5},
                       checkpoint={"every_steps": 3, "log_every_steps": 1})
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    aws = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                      "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    job_id, result = _submit(cluster, "python", "jobs/train_mmret.py", "--config",
                             str(cfg_file), env_vars=aws)
    assert result.returncode == 0 and "succeeded" in result.stdout, \
        (result.stdout + result.stderr)[-4000:]
    import s3fs

    fs = s3fs.S3FileSystem()
    summary = json.loads(fs.cat_file(f"{bucket}/train/multi/summary.json"))
    assert summary["metrics"]["step"] == 6
    assert fs.exists(f"{bucket}/train/multi/step_00000006")
    # 1.5 CPUs a worker on 2-CPU nodes: the two Ray Train workers are on the two worker nodes.
    workers = {node for name, node in _placement(cluster, job_id, "actors")
               if "TrainWorker" in name}
    assert workers == set(cluster.worker_nodes), _placement(cluster, job_id, "actors")
