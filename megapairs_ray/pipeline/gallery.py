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
from typing import Any

import ray

from megapairs_ray import manifest
from megapairs_ray.config import InputConfig, output_settings
from megapairs_ray.io import layout, storage
from megapairs_ray.io.runs import ingested_images, ingested_tables
from megapairs_ray.io.stepstate import stored_fingerprint
from megapairs_ray.models.family import CLIP_PIXELS_FORM, family_of
from megapairs_ray.models.retriever import resolve_checkpoint
from megapairs_ray.pipeline.embed import clear_partial, count_until_done
from megapairs_ray.pipeline.engine import Stage, StageRun, run_stage
from megapairs_ray.pipeline.index import build_space
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.pipeline.shardlist import recorded_shards
from megapairs_ray.serve.config import SPACE, GalleryConfig
from megapairs_ray.serve.gallery import (
    GalleryEncoder,
    GalleryError,
    gallery_json,
    index_dir,
    read_gallery_images,
)
from megapairs_ray.stages.embed_io import write_embeddings

INDEX_UNIT = "index"  # the gallery's last unit: its index, built once every table is embedded


def _sources(cfg: GalleryConfig) -> tuple[str, list[tuple[str, str, int]], InputConfig]:
    """(images root, [(shard slug, images table, accepted rows)], the input's reading config)."""
    if cfg.input is not None:
        root = cfg.run_dir
        return root, ingested_tables(root, recorded_shards(root), GalleryError), cfg.input
    root = str(cfg.images_from)
    tables, input_cfg = ingested_images(root, "images_from", GalleryError)
    return root, tables, input_cfg


def _root(cfg: GalleryConfig) -> str:
    return cfg.run_dir if cfg.input is not None else str(cfg.images_from)


def _upstream(cfg: GalleryConfig) -> dict[str, str]:
    """The images' ingest fingerprint, once the source is known to be a finished ingest (else
    one line naming what is missing)."""
    _sources(cfg)
    return {"ingest": stored_fingerprint(_root(cfg), "ingest")}


def _settings(cfg: GalleryConfig) -> dict[str, Any]:
    """What decides the vectors and the index: a change discards both."""
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    # CLIP's pixels changed to the released processor's: its vectors made before are not
    # mixed with a service's new queries. The towers' pixels did not change.
    pixels = ({"pixels.form": CLIP_PIXELS_FORM} if family_of(checkpoint) == "clip" else {})
    return {"checkpoint": checkpoint, "images": _root(cfg), **pixels,
            **output_settings(cfg.encoder, prefix="encoder."),
            **{f"index.{k}": v for k, v in cfg.index.build_fields().items()}}


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
                   "stage": "gallery"},
        batch_size=e.writer_batch_rows, batch_format="numpy", num_cpus=e.writer_num_cpus)


def _run(ctx: StageRun[GalleryConfig], todo: list[str]) -> None:
    cfg, state = ctx.cfg, ctx.state
    root, sources, input_cfg = _sources(cfg)
    checkpoint = state.settings["checkpoint"]
    ctx.record.inputs.update({"images": root, "tables": len(sources),
                              "rows": sum(n for *_, n in sources), "checkpoint": checkpoint})
    tables = [s for s in sources if s[0] in set(todo)]
    ctx.count("tables_skipped_done", len(sources) - len(tables))
    clear_partial(cfg.run_dir, "gallery", [SPACE], [slug for slug, *_ in tables])
    for slug, _, n in tables:
        if n == 0:
            state.mark_done(slug, Counter())
    tables = [s for s in tables if s[2] > 0]
    if tables:
        state.unmark(INDEX_UNIT)  # new vectors: the index is rebuilt

        def finished(slug: str, tally: Counter[str]) -> None:
            state.mark_done(slug, tally)
            ctx.count("tables_embedded")

        ds = build_gallery_dataset(cfg, checkpoint, tables, input_cfg)
        unfinished = count_until_done(ds.iter_rows(), {slug: n for slug, _, n in tables},
                                      finished)
        if unfinished:
            raise GalleryError(f"{len(unfinished)} images table(s) ended with rows unaccounted "
                               f"for: {unfinished[:5]}")
    if INDEX_UNIT not in state.done_units():
        slugs = [slug for slug, *_ in sources]
        tally = state.sum_counts(slugs)
        if tally["embedded"] == 0:
            # Ingest's rejects too: an input whose every image ingest refused (no caption,
            # say) reaches this stage empty, and its reasons are ingest's.
            markers = layout.markers_dir(_root(cfg), INGEST.name)
            for marker in storage.list_files(markers, ".json"):
                tally.update(storage.read_json(marker).get("counts", {}))
            rejects = {k[7:]: n for k, n in tally.items() if k.startswith("reject:")}
            raise GalleryError(f"no gallery image could be embedded (rejects: "
                               f"{rejects or 'none'}; is the input empty?)")
        meta = build_space(cfg.run_dir, cfg.index, SPACE, state.fingerprint)
        state.mark_done(INDEX_UNIT, {"indexed": meta["count"]})
    index_meta = storage.read_json(layout.index_meta_file(cfg.run_dir, SPACE))
    # Last: the service reads nothing else first.
    storage.write_json(gallery_json(cfg.run_dir), {
        "checkpoint": checkpoint, "space": SPACE, "dim": index_meta["dim"],
        "count": index_meta["count"], "index": index_dir(cfg.run_dir),
        "index_build": index_meta["build"], "images_tables": [uri for _, uri, _ in sources],
        "input": input_cfg.model_dump(mode="json"), "settings": state.settings,
        "fingerprint": state.fingerprint,
    })


def _upgrade_marker(unit: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Books v1 counted the index's vectors as ``vectors``."""
    if unit == INDEX_UNIT and "vectors" in doc["counts"]:
        doc["counts"] = {"indexed": doc["counts"]["vectors"]}
    return doc


GALLERY: Stage[GalleryConfig] = Stage(
    name="gallery",
    help="Embed a gallery with a retriever checkpoint and index it, for `megapairs serve`.",
    needs=(),
    # The images are this folder's own ingest, or another run's.
    upstream=lambda cfg: _upstream(cfg),
    settings=_settings,
    outputs=lambda cfg: {"gallery": gallery_json(cfg.run_dir), "index": index_dir(cfg.run_dir),
                         "rejects": layout.rejects_dir(cfg.run_dir, "gallery")},
    removes=lambda cfg: [layout.embeddings_dir(cfg.run_dir, SPACE),
                         layout.index_root(cfg.run_dir),
                         layout.rejects_dir(cfg.run_dir, "gallery"), gallery_json(cfg.run_dir)],
    units=lambda cfg: [slug for slug, *_ in _sources(cfg)[1]] + [INDEX_UNIT],
    run=_run,
    unit_noun="units",
    hidden_counts=("rows", "texts"),
    upgrade_marker=_upgrade_marker,
)


def run_gallery(cfg: GalleryConfig) -> manifest.StageRecord:
    """The gallery job: ingest its images (when they are its own), then the gallery stage."""
    if cfg.input is not None:
        run_stage(INGEST, cfg)
    return run_stage(GALLERY, cfg)
