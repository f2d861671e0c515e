"""Connecting to Ray: a cluster when ``ray.address`` is set (or RAY_ADDRESS, as under
``ray job submit``), else a local Ray sized by the config."""

from __future__ import annotations

import os

import ray

from megapairs_ray.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
             include_dashboard=False, log_to_driver=True)
