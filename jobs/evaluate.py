"""Entrypoint for ``ray job submit``: zero-shot CIR evaluation of a checkpoint on a worker node
(``megapairs eval --gpus 1``, or ``--cpus N`` on CPUs; the head of a cluster takes no work).
The checkpoint may be a ``megapairs train`` run folder: its last checkpoint is evaluated.

    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://.../step_00015000 \
        --benchmark circo --data s3://.../CIRCO --device cuda --precision bf16 --gpus 1 \
        --out s3://.../eval/circo.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megapairs_ray.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["eval", *(sys.argv[1:] if argv is None else argv)], standalone_mode=True)


if __name__ == "__main__":
    main()
