"""Ingest on Ray Data: one task per shard, finished shards skipped."""

from __future__ import annotations

from typing import Any

import ray

from megapairs_ray import manifest
from megapairs_ray.config import RunConfig
from megapairs_ray.io import layout
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.pipeline.shardlist import run_shards
from megapairs_ray.stages.ingest import IngestShard, ingest_state


def _ingest_batch(batch: dict[str, Any], **kwargs: Any) -> dict[str, list[Any]]:
    return IngestShard(**kwargs)(batch)


def run_ingest(cfg: RunConfig) -> manifest.StageRecord:
    record = manifest.StageRecord("ingest").start()
    shards = run_shards(cfg)
    state = ingest_state(cfg.run_dir, cfg.input, cfg.ingest)
    changed = state.reconcile([layout.images_dir(cfg.run_dir),
                               layout.rejects_dir(cfg.run_dir, "ingest")])
    if changed:
        record.counts["recomputed_changed_settings"] = 1
        record.inputs["changed"] = changed
    done = state.done_units()
    todo = [s for s in shards if s.slug not in done]
    record.inputs.update({"uris": list(cfg.input.uris), "shards": len(shards)})
    record.counts["shards_skipped_done"] = len(shards) - len(todo)
    if todo:
        ds = ray.data.from_items([s.to_row() for s in todo], override_num_blocks=len(todo))
        # Tasks, not actors: a shard's work needs no model, and tasks spread over every node.
        ds = ds.map_batches(
            _ingest_batch,
            fn_kwargs={"run_dir": cfg.run_dir, "input_cfg": cfg.input, "ingest_cfg": cfg.ingest,
                       "state": state},
            batch_size=1,
            num_cpus=cfg.ingest.num_cpus,
        )
        for _ in ds.iter_rows():
            record.counts["shards_ingested"] += 1
    tally(state, [s.slug for s in shards], record)
    record.outputs = {"images": layout.images_dir(cfg.run_dir),
                      "rejects": layout.rejects_dir(cfg.run_dir, "ingest")}
    record.finish()
    manifest.record_stage(cfg.run_dir, record, config=cfg.model_dump(mode="json"))
    return record


def tally(state: StepState, slugs: list[str], record: manifest.StageRecord) -> None:
    """Counts over every shard of the run, this invocation's and earlier ones', from markers."""
    for marker in state.read_markers(slugs):
        record.counts.update(marker["counts"])
        record.rejects.update(marker["rejects"])
        record.counts.update({f"shard_problem:{k}": v
                              for k, v in marker.get("shard_problems", {}).items()})
