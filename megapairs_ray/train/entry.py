"""What Ray Train's controller unpickles to start a run: the workers' loop and the metrics
callback.

The controller imports this module and never runs the loop, so the module stays light: the model
code (``train/trainer.py``, the families, transformers) loads in the workers, when the loop
starts. Defined beside that code, the loop made the controller import it before any worker
could start: about 3 s of CPU on every launch and every restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray.train

from megapairs_ray.io import storage


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's loop: ``trainer.run_worker`` in each worker."""
    from megapairs_ray.train.trainer import run_worker

    run_worker(loop_config)


class MetricsLog(ray.train.UserCallback):
    """Keeps every report's metrics (rank 0's) as ``metrics.jsonl`` beside the checkpoints;
    a resumed run appends to what the earlier attempt logged.

    On a local or mounted disk each report appends one line. Object storage has no append, so
    there the file is rewritten whole, once per report: reports come once per checkpoint or
    log interval, so the file stays small."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.rows: list[dict[str, Any]] | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: ray.train.Checkpoint | None) -> None:
        row = dict(metrics[0])
        if checkpoint is not None:
            row["checkpoint"] = checkpoint_uri(self.uri, checkpoint)
        if not storage.is_remote(self.uri):
            path = storage.filesystem(self.uri)[1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return
        if self.rows is None:
            self.rows = read_metrics(self.uri)
        self.rows.append(row)
        with storage.open_atomic(self.uri, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)


def checkpoint_uri(storage_uri: str, checkpoint: ray.train.Checkpoint) -> str:
    """A checkpoint's full URI (Ray gives object-store paths without their scheme)."""
    if storage.is_remote(storage_uri) and "://" not in checkpoint.path:
        return f"{storage_uri.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def read_metrics(uri: str) -> list[dict[str, Any]]:
    if not storage.exists(uri):
        return []
    fs, path = storage.filesystem(uri)
    rows = []
    for line in fs.cat_file(path).decode().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the half line a killed writer left: skipped
            continue
    return rows
