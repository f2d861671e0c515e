"""Autoscaling for real: a cluster whose worker nodes the Ray autoscaler adds and removes.

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``, ``ray start --autoscaling-config``) runs
the real autoscaler; the nodes it "launches" are real raylets on this machine. Ray's own
``AutoscalingCluster`` helper runs ``ray stop --force`` (every Ray on the machine, the suite's
shared one too), so the head is started here, with its own temp dir and token authentication as
a KubeRay cluster has them, and stopped by killing the processes that name that dir.

The node types mirror ``cluster/kuberay/raycluster.yaml`` in small: a head with no CPUs, a
``cpu`` group and a ``gpu`` group, both from ``minReplicas: 0``; the gpu group's ``maxReplicas``
caps the embed pool (``embed.max_actors``), as there. The gpu nodes declare one ``GPU`` that
nothing uses as a GPU: the embed actors ask for it (``embed.num_gpus: 1``) and run their models
on the CPU, so the scheduler and the autoscalers see the GPU pool of a real cluster. (With CPUs
alone, Ray Data's per-operator budget keeps the embed pool at half the cluster's CPUs: a
4-CPU cluster gives 2 actors, not ``max_actors``; GPUs are the embed pool's alone.)

Ray Data's cluster autoscaler asks for nodes from the embed pool's throughput, the Ray
autoscaler launches them, the pool grows on them, and they go when idle.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from megapairs_ray.config import load_config
from megapairs_ray.io import storage
from megapairs_ray.io.shards import fetch_bytes
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import load_space

from .helpers import good_samples, stop_local_cluster, write_tar
from .serve_helpers import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Two gpu nodes: the pool grows from one actor to two and is capped there. (A third node's
# raylet and actor only took CPU from the work on a 2-core machine: the pool's growth shows at 2.)
CPU_NODES, GPU_NODES = 2, 2
MIN_ACTORS, MAX_ACTORS = 1, GPU_NODES
# About 100 s of embedding for one actor. Measured on a 2-core machine with the settings below:
# the second actor came 36 s after the first, and the work ended about 40 s after that.
SHARDS, PER_SHARD = 10, 240


@dataclass
class Autoscaling:
    root: Path
    address: str  # the GCS: where a driver connects
    url: str  # the dashboard: Ray's state API
    env: dict[str, str]


def _provider_config(gcs_address: str) -> dict:
    """The fake provider's cluster config: the KubeRay groups' shapes and the timings."""
    return {
        "cluster_name": "megapairs-fake", "max_workers": CPU_NODES + GPU_NODES,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu": {"resources": {"CPU": 1, "object_store_memory": 200 * 1024**2},
                    "node_config": {}, "min_workers": 0, "max_workers": CPU_NODES},
            "gpu": {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 200 * 1024**2},
                    "node_config": {}, "min_workers": 0, "max_workers": GPU_NODES}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        # Six seconds idle and a node goes: the test waits for it.
        "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture(scope="module")
def autoscaling() -> Iterator[Autoscaling]:
    import ray._private.services as services

    root = Path("/tmp") / f"mp-as-{uuid.uuid4().hex[:6]}"  # short: socket paths have a limit
    root.mkdir(parents=True)
    gcs, dash = free_port(), free_port()
    address = f"{services.get_node_ip_address()}:{gcs}"
    (root / "autoscaler.json").write_text(json.dumps(_provider_config(address)))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
           # Ray Data's cluster autoscaler asks again every 2 s, not 10: each gpu node came a
           # request later than the one before.
           "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    try:
        head = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--temp-dir={root}/t", f"--port={gcs}",
             "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--autoscaling-config={root}/autoscaler.json", "--disable-usage-stats",
             f"--ray-client-server-port={free_port()}"],
            env=env, capture_output=True, text=True, timeout=300)
        assert head.returncode == 0, head.stderr[-2000:]
        yield Autoscaling(root, address, f"http://127.0.0.1:{dash}", env)
    finally:
        stop_local_cluster(root, gcs)


# What the cluster holds, once a second, in one process of its own: each line the alive worker
# nodes (id -> resources) and the alive embed actors (id -> node). Ray's state API keeps no
# actor start and end times, so the pool's size over time is sampled.
_WATCH = """
import json, sys, time
from ray.util.state import list_actors, list_nodes
url, out = sys.argv[1], sys.argv[2]
while True:
    try:
        nodes = {n.node_id: n.resources_total for n in list_nodes(
            address=url, limit=1000, raise_on_missing_output=False)
            if n.state == "ALIVE" and not n.is_head_node}
        actors = {a.actor_id: a.node_id for a in list_actors(
            address=url, filters=[("state", "=", "ALIVE")], limit=10000,
            raise_on_missing_output=False) if "EmbedStage" in (a.class_name or "")}
    except Exception:  # the dashboard busy or not up yet: the next second tells
        time.sleep(1)
        continue
    with open(out, "a") as f:
        f.write(json.dumps({"t": time.time(), "nodes": nodes, "embed_actors": actors}) + "\\n")
    time.sleep(1)
"""


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_embed_pool_grows_on_the_nodes_the_autoscaler_adds_and_they_go_after(
        autoscaling: Autoscaling, tmp_path: Path) -> None:
    for i in range(SHARDS):
        write_tar(tmp_path / "corpus" / f"s{i}.tar", good_samples(PER_SHARD, prefix=f"s{i}"))
    # The bundled profile's real encoders (EfficientNet-Lite0, MiniLM): a real per-image cost.
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc.update(run_dir=str(tmp_path / "run"), ray={"address": autoscaling.address})
    doc["input"]["uris"] = [str(tmp_path / "corpus")]
    doc["embed"].update(min_actors=MIN_ACTORS, max_actors=MAX_ACTORS, num_gpus=1, num_cpus=1,
                        batch_size=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))

    watched = tmp_path / "watch.jsonl"
    watch = subprocess.Popen([sys.executable, "-c", _WATCH, autoscaling.url, str(watched)],
                             env=autoscaling.env)
    try:
        deadline = time.time() + 120
        while not _samples(watched):
            assert time.time() < deadline, "the state API did not answer"
            time.sleep(1)
        assert _samples(watched)[-1]["nodes"] == {}  # it starts with its head alone
        with open(tmp_path / "run.log", "w") as log:  # a pipe nobody reads would fill, block
            run = subprocess.run(
                [str(BIN / "megapairs"), "run", "-c", str(tmp_path / "run.yaml"), "--stages",
                 "ingest,embed"], cwd=ROOT, env=autoscaling.env, stdout=log,
                stderr=subprocess.STDOUT, timeout=900)
        assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        # Idle nodes are removed once the stage is done (idle_timeout_minutes 0.1).
        deadline = time.time() + 180
        while (samples := _samples(watched))[-1]["nodes"] or samples[-1]["t"] < time.time() - 5:
            assert time.time() < deadline, f"idle nodes stayed: {samples[-1]['nodes']}"
            time.sleep(2)
    finally:
        watch.kill()
        watch.wait()

    samples = _samples(watched)
    gpu_nodes = {n for s in samples for n, res in s["nodes"].items() if res.get("GPU")}
    pool = [len(s["embed_actors"]) for s in samples if s["embed_actors"]]
    # The pool started at min_actors and grew, never past max_actors, each actor on a gpu node
    # the autoscaler launched during the run (there was none before it).
    assert pool and pool[0] == MIN_ACTORS, pool
    assert MIN_ACTORS < max(pool) <= MAX_ACTORS, pool
    assert len(gpu_nodes) >= max(pool), gpu_nodes
    assert {n for s in samples for n in s["embed_actors"].values()} <= gpu_nodes

    # Every image embedded exactly once, in every space, whichever actor or node it met...
    cfg = load_config(tmp_path / "run.yaml")
    images = storage.read_parquet_dir(storage.join(cfg.run_dir, "images"))
    assert images.num_rows == SHARDS * PER_SHARD
    stored = {}
    for space in cfg.embed.space_names:
        ids, vectors = load_space(cfg.run_dir, space)
        assert sorted(ids.tolist()) == sorted(images.column("image_id").to_pylist()), space
        stored[space] = dict(zip(ids.tolist(), vectors))
    # ...and equal to the stage called directly, as a fixed-size run's are
    # (tests/test_pipeline.py): a sample from every shard.
    sample = [r for i, r in enumerate(images.to_pylist()) if i % 25 == 0]
    direct = EmbedStage(cfg.embed)({
        "image_id": np.array([r["image_id"] for r in sample]),
        "shard": np.array(["x"] * len(sample), dtype=object),
        "image": np.array(fetch_bytes(sample, cfg.input), dtype=object),
        "caption": np.array([r["caption"] for r in sample], dtype=object),
        "format": np.array([r["format"] for r in sample], dtype=object),
        "mode": np.array([r["mode"] for r in sample], dtype=object),
    })
    for space in cfg.embed.space_names:
        for i, r in enumerate(sample):
            np.testing.assert_allclose(stored[space][r["image_id"]].astype(np.float32),
                                       direct[space][i].astype(np.float32), atol=3e-3)
