"""The ingest stage: one Ray task per shard (``stages/ingest.py``), finished shards skipped."""

from __future__ import annotations

import json
from typing import Any

import ray

from megapairs_ray.config import InputConfig, output_settings
from megapairs_ray.io import layout
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.pipeline.shardlist import Ingests, recorded_shards, run_shards
from megapairs_ray.stages.ingest import IngestShard


def _input(cfg: Ingests) -> InputConfig:
    assert cfg.input is not None, "ingest runs only on a config with an input"
    return cfg.input


def _settings(cfg: Ingests) -> dict[str, Any]:
    """Ingest's output depends on the input and the checks."""
    return {**output_settings(_input(cfg), prefix="input."),
            **output_settings(cfg.ingest, prefix="ingest.")}


def _upgrade_marker(unit: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Books v1 kept a shard's rejects and problems by reason beside its counts."""
    counts = doc["counts"]
    counts.update({f"reject:{r}": n for r, n in doc.pop("rejects", {}).items()})
    counts.update({f"shard_problem:{r}": n for r, n in doc.pop("shard_problems", {}).items()})
    return doc


def _ingest_batch(batch: dict[str, Any], state: StepState, **kwargs: Any,
                  ) -> dict[str, list[Any]]:
    """Ingest a batch of shards; each shard's marker last, after its files."""
    out = IngestShard(**kwargs)(batch)
    for slug, counts, name, uri in zip(out["shard"], out["counts"], out["name"], out["uri"]):
        state.mark_done(slug, json.loads(counts), shard=name, uri=uri)
    return out


def _run(ctx: StageRun[Ingests], todo: list[str]) -> None:
    cfg = ctx.cfg
    wanted = set(todo)
    shards = [s for s in recorded_shards(cfg.run_dir) if s.slug in wanted]
    if not shards:
        return
    ds = ray.data.from_items([s.to_row() for s in shards], override_num_blocks=len(shards))
    # Tasks, not actors: a shard's work needs no model, and tasks spread over every node.
    ds = ds.map_batches(
        _ingest_batch,
        fn_kwargs={"run_dir": cfg.run_dir, "input_cfg": _input(cfg), "ingest_cfg": cfg.ingest,
                   "state": ctx.state},
        batch_size=1,
        num_cpus=cfg.ingest.num_cpus,
    )
    for _ in ds.iter_rows():
        ctx.count("shards_ingested")


INGEST: Stage[Ingests] = Stage(
    name="ingest",
    help="Read shards, gate every record, write the images table and the rejects.",
    needs=(),
    settings=_settings,
    outputs=lambda cfg: {"images": layout.images_dir(cfg.run_dir),
                         "rejects": layout.rejects_dir(cfg.run_dir, "ingest")},
    units=lambda cfg: [s.slug for s in run_shards(cfg)],
    run=_run,
    unit_noun="shards",
    upgrade_marker=_upgrade_marker,
    inputs=lambda ctx: {"uris": list(_input(ctx.cfg).uris), "shards": len(ctx.units)},
)
