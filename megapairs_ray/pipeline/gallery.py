"""The gallery job on Ray: ingest (or a finished run's images) → retriever embeddings → index.

1. The images: ``input`` is ingested into the gallery folder exactly as a run ingests (same
   checks, same rejects, same resume); ``images_from`` reuses a finished run's images tables.
2. Embedding streams like the embed stage: per images table, readers fetch the bytes grouped by
   file → an autoscaling actor pool of ``GalleryEncoder`` → the embed stage's writer. Resume is
   per images table (a marker once all its rows are written or rejected; partial leftovers of
   unmarked tables are removed first). The books are every stage's (``io/stepstate.py``): a
   change of checkpoint, precision, images or index build settings discards the old vectors
   and index: one gallery never mixes two models.
3. The index stage builds the ``retriever`` space (kind, shards, build settings from the config)
   once per set of vectors.
4. ``gallery.json`` last: the service reads nothing else first.
"""

from __future__ import annotations

from collections import Counter

import ray

from megapairs_ray import manifest
from megapairs_ray.config import InputConfig, output_settings
from megapairs_ray.io import layout, storage
from megapairs_ray.io.runs import ingested_images, ingested_tables
from megapairs_ray.io.stepstate import StepState, stored_fingerprint
from megapairs_ray.models.retriever import resolve_checkpoint
from megapairs_ray.pipeline.embed import clear_partial, count_until_done
from megapairs_ray.pipeline.index import build_space
from megapairs_ray.pipeline.ingest import run_ingest
from megapairs_ray.pipeline.shardlist import run_shards
from megapairs_ray.serve.config import SPACE, GalleryConfig
from megapairs_ray.serve.gallery import (
    GalleryEncoder,
    GalleryError,
    gallery_json,
    index_dir,
    read_gallery_images,
)
from megapairs_ray.stages.embed_io import write_embeddings

STAGE = "gallery"
INDEX_UNIT = "index"


def _sources(cfg: GalleryConfig) -> tuple[str, list[tuple[str, str, int]], InputConfig]:
    """(images root, [(shard slug, images table, accepted rows)], the input's reading config)."""
    if cfg.input is not None:
        root, input_cfg = cfg.run_dir, cfg.input
        return root, ingested_tables(root, run_shards(cfg), GalleryError), input_cfg  # type: ignore[arg-type]
    root = str(cfg.images_from)
    tables, input_cfg = ingested_images(root, "images_from", GalleryError)
    return root, tables, input_cfg


def gallery_state(cfg: GalleryConfig, checkpoint: str, root: str) -> StepState:
    """What decides the vectors and the index: a change discards both."""
    return StepState(cfg.run_dir, STAGE,
                     {"checkpoint": checkpoint, "images": root,
                      **output_settings(cfg.encoder, prefix="encoder."),
                      **{f"index.{k}": v for k, v in cfg.index.build_fields().items()}},
                     {"ingest": stored_fingerprint(root, "ingest")})


def build_gallery_dataset(cfg: GalleryConfig, checkpoint: str,
                          todo: list[tuple[str, str, int]], input_cfg: InputConfig,
                          ) -> ray.data.Dataset:
    """The streaming pipeline; its output is the writers' per-shard summary rows."""
    e = cfg.encoder
    ds = ray.data.from_items([{"shard": slug, "images_file": uri} for slug, uri, _ in todo],
                             override_num_blocks=len(todo))
    ds = ds.map_batches(read_gallery_images,
                        fn_kwargs={"input_cfg": input_cfg, "rows_per_batch": e.read_batch_rows},
                        batch_size=1, num_cpus=e.reader_num_cpus)
    ds = ds.map_batches(
        GalleryEncoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "device": e.device,
                               "precision": e.precision, "batch_size": e.batch_size,
                               "threads": e.decode_threads,
                               "decode_budget_bytes": e.decode_budget_bytes},
        batch_size=e.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=e.min_actors, max_size=e.max_actors),
        num_gpus=e.num_gpus, num_cpus=e.num_cpus)
    return ds.map_batches(
        write_embeddings,
        fn_kwargs={"run_dir": cfg.run_dir, "image_spaces": (SPACE,),
                   "stage": STAGE},
        batch_size=e.writer_batch_rows, batch_format="numpy", num_cpus=e.writer_num_cpus)


def run_gallery(cfg: GalleryConfig) -> manifest.StageRecord:
    if cfg.input is not None:
        run_ingest(cfg)  # type: ignore[arg-type]  # reads run_dir, input and ingest only
    record = manifest.StageRecord(STAGE).start()
    root, sources, input_cfg = _sources(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    state = gallery_state(cfg, checkpoint, root)
    changed = state.reconcile([layout.embeddings_dir(cfg.run_dir, SPACE),
                               storage.join(cfg.run_dir, "index"),
                               layout.rejects_dir(cfg.run_dir, STAGE),
                               gallery_json(cfg.run_dir)])
    if changed:
        record.counts["recomputed_changed_settings"] = 1
        record.inputs["changed"] = changed
    done = state.done_units()
    todo = [s for s in sources if s[0] not in done]
    record.inputs.update({"images": root, "tables": len(sources),
                          "rows": sum(n for *_, n in sources), "checkpoint": checkpoint})
    record.counts["tables_skipped_done"] = len(sources) - len(todo)
    clear_partial(cfg.run_dir, STAGE, [SPACE], [slug for slug, *_ in todo])
    for slug, _, n in todo:
        if n == 0:
            state.mark_done(slug, Counter())
    todo = [s for s in todo if s[2] > 0]
    if todo:
        state.unmark(INDEX_UNIT)  # new vectors: the index is rebuilt

        def finished(slug: str, tally: Counter[str]) -> None:
            state.mark_done(slug, tally)
            record.counts["tables_embedded"] += 1

        ds = build_gallery_dataset(cfg, checkpoint, todo, input_cfg)
        unfinished = count_until_done(ds.iter_rows(),
                                      {slug: n for slug, _, n in todo}, finished)
        if unfinished:
            raise GalleryError(f"{len(unfinished)} images table(s) ended with rows unaccounted "
                               f"for: {unfinished[:5]}")
    slugs = [slug for slug, *_ in sources]
    record.counts.update({k: v for k, v in state.sum_counts(slugs).items()
                          if k in ("embedded", "rejected")})
    rejects = storage.read_parquet_dir(layout.rejects_dir(cfg.run_dir, STAGE), ["reason"])
    if rejects is not None:
        record.rejects.update(Counter(rejects.column("reason").to_pylist()))
    if record.counts["embedded"] == 0:
        raise GalleryError(f"no gallery image could be embedded (rejects: "
                           f"{dict(record.rejects) or 'none'}; is the input empty?)")

    if INDEX_UNIT not in state.done_units():
        meta = build_space(cfg, SPACE, state.fingerprint)  # type: ignore[arg-type]
        state.mark_done(INDEX_UNIT, {"vectors": meta["count"]})
    index_meta = storage.read_json(layout.index_meta_file(cfg.run_dir, SPACE))
    record.counts["indexed"] = index_meta["count"]
    storage.write_json(gallery_json(cfg.run_dir), {
        "checkpoint": checkpoint, "space": SPACE, "dim": index_meta["dim"],
        "count": index_meta["count"], "index": index_dir(cfg.run_dir),
        "index_build": index_meta["build"], "images_tables": [uri for _, uri, _ in sources],
        "input": input_cfg.model_dump(mode="json"), "settings": state.settings,
        "fingerprint": state.fingerprint,
    })
    record.outputs = {"gallery": gallery_json(cfg.run_dir), "index": index_dir(cfg.run_dir),
                      "rejects": layout.rejects_dir(cfg.run_dir, STAGE)}
    record.finish()
    manifest.record_stage(cfg.run_dir, record, config=cfg.model_dump(mode="json"))
    return record
