"""Embed on Ray Data: shard readers -> an autoscaling pool of encoder actors -> writers.

Resume works per shard. Before the run, any output of a shard without a completion marker is
removed (it is a partial leftover); during the run the driver counts, from the writers' small
summary rows, how many of each shard's accepted images have been written or rejected, and writes
the shard's marker the moment the count is complete. A rerun skips marked shards without reading
a byte of them, and nothing is ever written twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import ray

from megapairs_ray import manifest
from megapairs_ray.config import RunConfig, output_settings
from megapairs_ray.errors import MegapairsError
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import Shard
from megapairs_ray.io.stepstate import StepState, stored_fingerprint
from megapairs_ray.pipeline.shardlist import run_shards
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import read_accepted_images, write_embeddings
from megapairs_ray.stages.ingest import ingest_state


class IncompleteEmbedError(MegapairsError, RuntimeError):
    """The pipeline ended with shards whose rows were not all accounted for."""


def embed_state(cfg: RunConfig) -> StepState:
    """Embed's books: the encoders and how images become tensors, on top of ingest's output."""
    return StepState(cfg.run_dir, "embed", output_settings(cfg.embed, prefix="embed."),
                     {"ingest": stored_fingerprint(cfg.run_dir, "ingest")})


def clear_partial(run_dir: str, stage: str, spaces: Iterable[str], slugs: Iterable[str]) -> None:
    """Remove what unfinished shards left behind: one listing per space and one of the rejects,
    so a first run over 100,000 shards sends no request per shard."""
    slugs = set(slugs)
    for space in spaces:
        for name in storage.list_dirs(layout.embeddings_dir(run_dir, space)):
            if name in slugs:
                storage.remove(layout.embeddings_shard_dir(run_dir, space, name), recursive=True)
    for f in storage.list_files(layout.rejects_dir(run_dir, stage), include_hidden=True):
        name = f.rsplit("/", 1)[-1]
        if name.startswith(".tmp-"):  # a writer's temporary name: .tmp-<uuid>-<final name>
            name = name.split("-", 2)[-1]
        if name.rsplit("-part-", 1)[0] in slugs:
            storage.remove(f)


def build_embed_dataset(cfg: RunConfig, todo: list[Shard]) -> ray.data.Dataset:
    """The streaming pipeline; its output is the writers' per-shard summary rows."""
    e = cfg.embed
    ds = ray.data.from_items([s.to_row() for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        read_accepted_images,
        fn_kwargs={"run_dir": cfg.run_dir, "input_cfg": cfg.input,
                   "max_member_bytes": cfg.ingest.max_bytes},
        batch_size=1,
        num_cpus=e.reader_num_cpus,
    )
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"cfg": e},
        batch_size=e.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=e.min_actors, max_size=e.max_actors,
            max_tasks_in_flight_per_actor=max(e.max_tasks_in_flight_per_actor,
                                              e.concurrent_calls_per_actor),
            max_concurrent_calls_per_actor=e.concurrent_calls_per_actor,
            enable_true_multi_threading=e.concurrent_calls_per_actor > 1),
        num_gpus=e.num_gpus,
        num_cpus=e.num_cpus,
    )
    return ds.map_batches(
        write_embeddings,
        fn_kwargs={"run_dir": cfg.run_dir},
        batch_size=e.writer_batch_rows,
        batch_format="numpy",
        num_cpus=e.writer_num_cpus,
    )


def count_until_done(summaries: Iterable[dict[str, Any]], expected: dict[str, int],
                     mark_done: Callable[[str, Counter[str]], None]) -> list[str]:
    """Add up the writers' per-shard summary rows as they stream back; call ``mark_done`` the
    moment all of a shard's ``expected`` rows are written or rejected. Returns the shards that
    ended short."""
    tallies: dict[str, Counter[str]] = {slug: Counter() for slug in expected}
    for summary in summaries:
        t = tallies[summary["shard"]]
        for k in ("rows", "embedded", "texts", "rejected"):
            t[k] += int(summary[k])
        if t["rows"] == expected[summary["shard"]]:
            mark_done(summary["shard"], t)
    return [slug for slug, t in tallies.items() if t["rows"] != expected[slug]]


def run_embed(cfg: RunConfig) -> manifest.StageRecord:
    record = manifest.StageRecord("embed").start()
    slugs = [s.slug for s in run_shards(cfg)]
    ingest = ingest_state(cfg.run_dir, cfg.input, cfg.ingest)
    ingest.require_finished(slugs)
    expected = {slug: int(m["counts"].get("images", 0))
                for slug, m in zip(slugs, ingest.read_markers(slugs))}
    state = embed_state(cfg)
    changed = state.reconcile([*(layout.embeddings_dir(cfg.run_dir, s) for s in layout.SPACES),
                               layout.rejects_dir(cfg.run_dir, "embed")])
    if changed:
        record.counts["recomputed_changed_settings"] = 1
        record.inputs["changed"] = changed
    done = state.done_units()
    todo = [s for s in run_shards(cfg) if s.slug not in done]
    record.inputs.update({"shards": len(slugs), "images": sum(expected.values())})
    record.counts["shards_skipped_done"] = len(slugs) - len(todo)

    clear_partial(cfg.run_dir, "embed", layout.SPACES, [s.slug for s in todo])
    for s in [s for s in todo if expected[s.slug] == 0]:
        state.mark_done(s.slug, Counter())
    todo = [s for s in todo if expected[s.slug] > 0]

    if todo:
        def done(slug: str, tally: Counter[str]) -> None:
            state.mark_done(slug, tally)
            record.counts["shards_embedded"] += 1

        unfinished = count_until_done(build_embed_dataset(cfg, todo).iter_rows(),
                                      {s.slug: expected[s.slug] for s in todo}, done)
        if unfinished:
            raise IncompleteEmbedError(
                f"{len(unfinished)} shard(s) ended with rows unaccounted for: {unfinished[:5]}")

    record.counts.update({k: v for k, v in state.sum_counts(slugs).items() if k != "rows"})
    rejects = storage.read_parquet_dir(layout.rejects_dir(cfg.run_dir, "embed"), ["reason"])
    if rejects is not None:
        record.rejects.update(Counter(rejects.column("reason").to_pylist()))
    record.outputs = {space: layout.embeddings_dir(cfg.run_dir, space) for space in layout.SPACES}
    record.outputs["rejects"] = layout.rejects_dir(cfg.run_dir, "embed")
    record.finish()
    manifest.record_stage(cfg.run_dir, record)
    return record
