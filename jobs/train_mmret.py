"""Entrypoint for ``ray job submit``: MMRet training on the cluster (``megapairs train``).

    ray job submit --working-dir . -- python jobs/train_mmret.py --config configs/train-paper.yaml

Submitting again with the same config resumes from the newest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["train", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
