"""Entrypoint for ``ray job submit``: the data probe on the cluster (``megapairs probe``).

    ray job submit --working-dir . -- python jobs/probe.py --config configs/probe-demo.yaml

Submitting again with the same config resumes: finished trainings are reused, unfinished ones
resume from their newest checkpoint, and every retriever is scored again.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["probe", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
