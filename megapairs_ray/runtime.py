"""Connecting to Ray: a cluster when ``ray.address`` is set (or RAY_ADDRESS, as under
``ray job submit``), else a Ray of this command's own, sized by the config.

"Its own" holds even when another Ray (``ray start --head``) runs on the same machine: without
an address, Ray would otherwise attach to that one and refuse the config's ``num_cpus``. To use
a running cluster, say so: ``ray.address: auto`` (or an address) in the config, or RAY_ADDRESS.
"""

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
    ray.init(address="local", num_cpus=cfg.num_cpus,
             object_store_memory=cfg.object_store_memory, include_dashboard=False,
             log_to_driver=True)
