"""Which Ray a command uses when another one already runs on the machine.

A `ray start --head` cluster is started here (its own temp dir, stopped by killing its own
process group, never `ray stop`, which would take every Ray on the machine with it). Without an
address, `megapairs` starts its own Ray with the config's size instead of attaching to that one
and failing on `num_cpus`; with `ray.address: auto` it joins it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from .helpers import good_samples, tiny_config, write_tar
from .serve_helpers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_cluster():
    temp = Path("/tmp") / f"mp-ray-{uuid.uuid4().hex[:8]}"  # short: socket paths have a limit
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    try:
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
             "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
            env=env, check=True, capture_output=True, timeout=180)
        assert (temp / "ray" / "ray_current_cluster").exists()  # what ray.init() would find
        yield env
    finally:
        # Every process of that cluster names its temp dir on its command line: stop those,
        # and only those (`ray stop` would stop every Ray on the machine).
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        shutil.rmtree(temp, ignore_errors=True)


def _ingest(env: dict[str, str], tmp_path: Path, **ray_cfg: object) -> subprocess.CompletedProcess:
    write_tar(tmp_path / "in" / "a.tar", good_samples(4))
    doc = tiny_config(tmp_path / f"run-{len(ray_cfg)}", [str(tmp_path / "in")])
    doc["ray"] = {"num_cpus": 2, "object_store_memory": 256 * 1024**2, **ray_cfg}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return subprocess.run([str(Path(sys.executable).parent / "megapairs"), "ingest", "-c",
                           str(cfg)], env=env, capture_output=True, text=True, timeout=300)


def test_without_an_address_a_command_starts_its_own_ray(other_cluster, tmp_path):
    result = _ingest(other_cluster, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    marker = json.loads(next((tmp_path / "run-0" / "_state" / "ingest").glob("*.json")).read_text())
    assert marker["counts"]["images"] == 4


def test_ray_address_auto_joins_the_running_cluster(other_cluster, tmp_path):
    result = _ingest(other_cluster, tmp_path, address="auto", num_cpus=None,
                     object_store_memory=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in result.stderr
