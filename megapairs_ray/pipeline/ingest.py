"""Ingest on Ray Data: one task per shard, shards with a completion marker skipped."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from megapairs_ray import manifest
from megapairs_ray.config import RunConfig
from megapairs_ray.io import storage
from megapairs_ray.io.shards import Shard
from megapairs_ray.pipeline.shardlist import run_shards
from megapairs_ray.stages import layout
from megapairs_ray.stages.ingest import IngestShard


def _ingest_batch(batch: dict[str, Any], **kwargs: Any) -> dict[str, list[Any]]:
    return IngestShard(**kwargs)(batch)


def pending_shards(cfg: RunConfig, shards: list[Shard]) -> list[Shard]:
    return [s for s in shards if not storage.exists(layout.ingest_marker(cfg.run_dir, s.slug))]


def run_ingest(cfg: RunConfig) -> manifest.StageRecord:
    record = manifest.StageRecord("ingest").start()
    shards = run_shards(cfg)
    todo = pending_shards(cfg, shards)
    record.inputs = {"uris": list(cfg.input.uris), "shards": len(shards)}
    record.counts["shards_skipped_done"] = len(shards) - len(todo)
    if todo:
        ds = ray.data.from_items([s.to_row() for s in todo], override_num_blocks=len(todo))
        # Tasks, not actors: a shard's work needs no model, and tasks spread over every node.
        ds = ds.map_batches(
            _ingest_batch,
            fn_kwargs={"run_dir": cfg.run_dir, "input_cfg": cfg.input, "ingest_cfg": cfg.ingest},
            batch_size=1,
            num_cpus=cfg.ingest.num_cpus,
        )
        for _ in ds.iter_rows():
            record.counts["shards_ingested"] += 1
    _tally(cfg, shards, record)
    record.outputs = {"images": storage.join(cfg.run_dir, "images"),
                      "rejects": layout.rejects_dir(cfg.run_dir, "ingest")}
    record.finish()
    manifest.record_stage(cfg.run_dir, record, config=cfg.model_dump(mode="json"))
    return record


def _tally(cfg: RunConfig, shards: list[Shard], record: manifest.StageRecord) -> None:
    """Counts over every shard of the run, this invocation's and earlier ones', from markers."""
    totals: Counter[str] = Counter()
    with ThreadPoolExecutor(16) as pool:
        markers = pool.map(storage.read_json,
                           [layout.ingest_marker(cfg.run_dir, s.slug) for s in shards])
    for marker in markers:
        totals.update(marker["counts"])
        record.rejects.update(marker["rejects"])
        totals.update({f"shard_problem:{k}": v
                       for k, v in marker.get("shard_problems", {}).items()})
    record.counts.update(totals)
