"""The run manifest: what each stage consumed, produced, counted, rejected and how long it took.

One JSON document at ``RUN/manifest.json``. Only the driver writes it, once per stage, so a
read-modify-write is safe on s3 too.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from megapairs_ray.io import layout, storage


@dataclass
class StageRecord:
    name: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    rejects: Counter[str] = field(default_factory=Counter)
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    _t0: float = 0.0

    def start(self) -> StageRecord:
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._t0 = time.perf_counter()
        return self

    def finish(self) -> StageRecord:
        self.seconds = round(time.perf_counter() - self._t0, 3)
        self.finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_t0")
        d["counts"] = dict(sorted(self.counts.items()))
        d["rejects"] = dict(sorted(self.rejects.items()))
        return d


def load(run_dir: str) -> dict[str, Any]:
    uri = layout.manifest_file(run_dir)
    if storage.exists(uri):
        return storage.read_json(uri)
    return {"stages": {}}


def record_stage(run_dir: str, record: StageRecord, config: dict[str, Any] | None = None) -> None:
    doc = load(run_dir)
    if config is not None:
        doc["config"] = config
    doc.setdefault("stages", {})[record.name] = record.to_dict()
    storage.write_json(layout.manifest_file(run_dir), doc)
