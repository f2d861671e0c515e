"""Entrypoint for ``ray job submit``: the whole pipeline (or chosen stages) on the cluster.

    ray job submit --working-dir . -- python jobs/run_pipeline.py --config configs/paper.yaml

Under ``ray job submit`` RAY_ADDRESS is set, so the driver joins the cluster it runs on; the
arguments are those of ``megapairs run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# With --working-dir the package is importable from the job's root even when not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["run", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
