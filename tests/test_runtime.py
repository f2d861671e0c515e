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


def test_the_worker_setup_drops_only_vllm_s_known_shutdown_race():
    """vLLM logs "AsyncLLM output_handler failed." with an ``EngineDeadError`` traceback when an
    engine shuts down in order (its output loop outlives the engine process). The job's worker
    setup drops that record when no request was outstanding, and keeps it when one was (an
    engine that died mid-step) or for any other error."""
    import logging

    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.engine.output_processor import OutputProcessor

    from megapairs_ray.runtime import worker_setup

    def output_loop(output_processor: OutputProcessor, error: Exception) -> None:
        def output_handler() -> None:  # as in vLLM: the processor is a closure's free variable
            try:
                output_processor.get_num_unfinished_requests()
                raise error
            except Exception:
                logging.getLogger("vllm.v1.engine.async_llm").exception(
                    "AsyncLLM output_handler failed.")
        output_handler()

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("vllm.v1.engine.async_llm")
    logger.addHandler(handler)
    try:
        worker_setup()
        idle, busy = OutputProcessor(None, log_stats=False), OutputProcessor(None, log_stats=False)
        busy.request_states["pending"] = object()  # type: ignore[assignment]
        output_loop(idle, EngineDeadError())  # the shutdown race: dropped
        assert seen == []
        output_loop(busy, EngineDeadError())  # a request lost: kept
        output_loop(idle, RuntimeError("boom"))  # another failure: kept
        logger.error("AsyncLLM output_handler failed.")  # no traceback to judge: kept
        assert [r.exc_info[0] if r.exc_info else None for r in seen] == [
            EngineDeadError, RuntimeError, None]
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()


@pytest.mark.ray
def test_the_worker_setup_runs_in_an_actor_with_a_runtime_env_of_its_own(ray_cluster):
    """The vLLM engine stage's actors get ``env_vars`` of their own (``stage_runtime_env``);
    the job's setup hook must still run in them, or the filter above never applies."""
    import logging

    import ray

    from megapairs_ray.runtime import _engine_shutdown_race

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"MEGAPAIRS_PROBE": "1"}})
    class Probe:
        def filters(self) -> tuple[str, list[str]]:
            return (os.environ.get("MEGAPAIRS_PROBE", ""),
                    [getattr(f, "__name__", repr(f)) for f in
                     logging.getLogger("vllm.v1.engine.async_llm").filters])

    probe = Probe.remote()
    try:
        assert ray.get(probe.filters.remote(), timeout=120) == (
            "1", [_engine_shutdown_race.__name__])
    finally:
        ray.kill(probe)


def test_a_stage_steps_back_into_a_working_directory_replaced_beneath_it(tmp_path, monkeypatch,
                                                                          caplog):
    """Where Ray nodes on one machine share a temp dir, each node's agent unpacks the job's
    working_dir afresh under the driver already running in it: ``os.getcwd()`` and every
    relative path fail (ENOENT naming no file). Each stage first re-enters the folder by its
    path, and says why in one warning."""
    from megapairs_ray import runtime

    package = tmp_path / "_ray_pkg_0123"
    (package / "configs").mkdir(parents=True)
    before = os.getcwd()
    monkeypatch.setattr(runtime, "_STARTED_IN", str(package))
    try:
        os.chdir(package)
        shutil.rmtree(package)  # what the agent does: remove, then unzip at the same path
        (package / "configs").mkdir(parents=True)
        (package / "configs" / "tiny.yaml").write_text("run_dir: runs/tiny\n")
        with pytest.raises(FileNotFoundError):
            Path("configs/tiny.yaml").resolve()
        runtime.reenter_working_dir()
        assert os.getcwd() == str(package)
        assert Path("configs/tiny.yaml").read_text() == "run_dir: runs/tiny\n"
        runtime.reenter_working_dir()  # nothing to do now: no second warning
    finally:
        os.chdir(before)
    warnings = [r.getMessage() for r in caplog.records if r.name == "megapairs_ray.runtime"]
    assert len(warnings) == 1 and "--temp-dir" in warnings[0] and str(package) in warnings[0]
