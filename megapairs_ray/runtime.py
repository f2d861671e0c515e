"""Connecting to Ray: a cluster when ``ray.address`` is set (or RAY_ADDRESS, as under
``ray job submit``), else a Ray of this command's own, sized by the config. Either way the job's
workers run ``worker_setup`` first (Ray's ``worker_process_setup_hook``, the documented place to
configure a worker's logging).

"Its own" holds even when another Ray (``ray start --head``) runs on the same machine: without
an address, Ray would otherwise attach to that one and refuse the config's ``num_cpus``. To use
a running cluster, say so: ``ray.address: auto`` (or an address) in the config, or RAY_ADDRESS.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from megapairs_ray.config import RayConfig

log = logging.getLogger(__name__)


def _started_in() -> str:
    """This process's working directory, from the shell's ``PWD`` if it is already gone."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return os.environ.get("PWD", "")


# Where this process started: a job driver's unpacked ``working_dir`` (see reenter_working_dir).
_STARTED_IN = _started_in()


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env())
        return
    ray.init(address="local", num_cpus=cfg.num_cpus,
             object_store_memory=cfg.object_store_memory, include_dashboard=False,
             log_to_driver=True, runtime_env=job_runtime_env())


WORKER_SETUP = "megapairs_ray.runtime.worker_setup"


def job_runtime_env() -> dict[str, Any]:
    """What this project adds to the job's runtime env: its worker setup hook, unless the job
    was submitted with a hook of its own (Ray runs one per job, and refuses two)."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if (submitted.get("runtime_env") or {}).get("worker_process_setup_hook"):
        return {}
    return {"worker_process_setup_hook": WORKER_SETUP}


def worker_setup() -> None:
    """Run by every worker of the job before its first task."""
    logging.getLogger("vllm.v1.engine.async_llm").addFilter(_engine_shutdown_race)


def _engine_shutdown_race(record: logging.LogRecord) -> bool:
    """False (drop the record) for the one traceback vLLM logs when its engine shuts down in
    order: ``AsyncLLM.shutdown`` stops the engine process before it cancels its output loop, so
    the loop, still waiting, sees the engine gone and logs ``EngineDeadError`` with a traceback
    ("AsyncLLM output_handler failed."). ``ray.data.llm``'s engine stage calls that shutdown when
    Ray Data releases the actor, after every row came back: a successful step's log then showed
    a traceback. Kept: the same record while any request is unfinished (an engine that died
    mid-step), and any record whose request count cannot be read (a vLLM that changed)."""
    if record.getMessage() != "AsyncLLM output_handler failed." or not record.exc_info:
        return True
    exc_type, _, tb = record.exc_info
    if exc_type is None or exc_type.__name__ != "EngineDeadError":
        return True
    while tb is not None:  # the output loop's frame holds its output processor
        processor = tb.tb_frame.f_locals.get("output_processor")
        if processor is not None:
            try:
                return processor.get_num_unfinished_requests() != 0
            except Exception:  # unreadable: keep the record
                return True
        tb = tb.tb_next
    return True


def reenter_working_dir() -> None:
    """Step back into this process's working directory by its path when the directory itself
    was replaced beneath it; called before each stage.

    A ``ray job submit`` driver starts in the job's unpacked ``working_dir``. Every node's
    runtime-env agent unpacks it afresh (``rmtree``, then unzip at the same path) the first time
    it runs one of the job's tasks, so where nodes share one Ray temp dir (several ``ray start``
    on one machine, without ``--temp-dir``) the driver is left in a deleted folder. Nothing the
    driver opens by an absolute path notices; ``os.getcwd()`` and every relative path then fail
    with ``ENOENT`` naming no file (the index stage's "not found: No such file or directory").
    The new copy at the same path holds the same files."""
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    if not _STARTED_IN or not os.path.isdir(_STARTED_IN):
        return  # nothing to step back into: the first relative path will say so
    os.chdir(_STARTED_IN)
    log.warning("this process's working directory %s was replaced beneath it (Ray nodes on "
                "one machine sharing a temp dir unpack a job's working_dir again): re-entered "
                "it; start each node with its own --temp-dir", _STARTED_IN)
