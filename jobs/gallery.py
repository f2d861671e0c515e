"""Entrypoint for ``ray job submit``: build a gallery for the retriever service.

    ray job submit --working-dir . -- python jobs/gallery.py --config configs/gallery-paper.yaml

The arguments are those of ``megapairs gallery``; a resubmitted job resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# With --working-dir the package is importable from the job's root even when not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["gallery", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
