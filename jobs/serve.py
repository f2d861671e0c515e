"""Entrypoint for ``ray job submit``: deploy the retriever service on the cluster's Ray Serve.

    ray job submit --working-dir . -- python jobs/serve.py --config configs/serve-paper.yaml

The job deploys and returns (``--detach``); Serve keeps the application running after the job
ends. On KubeRay, prefer cluster/kuberay/rayservice.yaml: it carries the same config file and
upgrades without downtime.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["serve", "--detach", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
