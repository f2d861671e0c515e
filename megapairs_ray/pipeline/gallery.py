"""The gallery job on Ray: ingest (or a finished run's images) → retriever embeddings → index.

1. The images: ``input`` is ingested into the gallery folder exactly as a run ingests (same
   checks, same rejects, same resume); ``images_from`` reuses a finished run's images tables.
2. Embedding streams like the embed stage: per images table, readers fetch the bytes grouped by
   file → an autoscaling actor pool of ``GalleryEncoder`` → the embed stage's writer. Resume is
   per images table (a marker once all its rows are written or rejected; partial leftovers of
   unmarked tables are removed first). A change of checkpoint, precision or images discards the
   old vectors and index: one gallery never mixes two models.
3. The index stage builds the ``retriever`` space (kind, shards, build settings from the config)
   unless an index with the same build settings over the same vectors exists.
4. ``gallery.json`` last: the service reads nothing else first.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from megapairs_ray import manifest
from megapairs_ray.config import InputConfig
from megapairs_ray.io import storage
from megapairs_ray.io.shards import Shard
from megapairs_ray.models.retriever import resolve_checkpoint
from megapairs_ray.pipeline.embed import count_until_done
from megapairs_ray.pipeline.index import build_space
from megapairs_ray.pipeline.ingest import run_ingest
from megapairs_ray.pipeline.shardlist import run_shards, shards_uri
from megapairs_ray.serve.config import SPACE, GalleryConfig
from megapairs_ray.serve.gallery import (
    GalleryEncoder,
    GalleryError,
    gallery_json,
    index_dir,
    read_gallery_images,
    settings_uri,
)
from megapairs_ray.stages import layout
from megapairs_ray.stages.embed_io import write_embeddings

STAGE = "gallery"


def _sources(cfg: GalleryConfig) -> tuple[str, list[tuple[str, str, int]], InputConfig]:
    """(images root, [(shard slug, images table, accepted rows)], the input's reading config)."""
    if cfg.input is not None:
        root, shards, input_cfg = cfg.run_dir, run_shards(cfg), cfg.input  # type: ignore[arg-type]
    else:
        root = str(cfg.images_from)
        if not storage.exists(shards_uri(root)):
            raise GalleryError(f"images_from: {root} is not a run directory (no shards.json)")
        shards = [Shard.from_row(r) for r in storage.read_json(shards_uri(root))]
        doc = manifest.load(root).get("config", {})
        input_cfg = InputConfig.model_validate(doc.get("input") or {"uris": [root]})
    missing = [s.name for s in shards if not storage.exists(layout.ingest_marker(root, s.slug))]
    if missing:
        raise GalleryError(f"{len(missing)} shard(s) of {root} are not ingested (e.g. "
                           f"{missing[:3]}); finish ingest there first")
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(storage.read_json,
                                [layout.ingest_marker(root, s.slug) for s in shards]))
    return root, [(s.slug, layout.images_file(root, s.slug), int(m["counts"].get("images", 0)))
                  for s, m in zip(shards, markers)], input_cfg


def _settings(checkpoint: str, cfg: GalleryConfig, root: str) -> dict[str, Any]:
    """What decides the vectors: a change discards them."""
    return {"checkpoint": checkpoint, "precision": cfg.encoder.precision, "images": root}


def _reset(cfg: GalleryConfig) -> None:
    for uri in (storage.join(cfg.run_dir, "embeddings"), storage.join(cfg.run_dir, "index"),
                layout.rejects_dir(cfg.run_dir, STAGE)):
        storage.remove(uri, recursive=True)
    storage.remove(gallery_json(cfg.run_dir))


def _clear_partial(cfg: GalleryConfig, slug: str) -> None:
    storage.remove(layout.embeddings_shard_dir(cfg.run_dir, SPACE, slug), recursive=True)
    for f in storage.list_files(layout.rejects_dir(cfg.run_dir, STAGE), include_hidden=True):
        if f.rsplit("/", 1)[-1].startswith(f"{slug}-part-"):
            storage.remove(f)


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
        fn_kwargs={"run_dir": cfg.run_dir, "image_spaces": (SPACE,), "text_space": None,
                   "stage": STAGE},
        batch_size=e.writer_batch_rows, batch_format="numpy", num_cpus=e.writer_num_cpus)


def run_gallery(cfg: GalleryConfig) -> manifest.StageRecord:
    if cfg.input is not None:
        run_ingest(cfg)  # type: ignore[arg-type]  # reads run_dir, input and ingest only
    record = manifest.StageRecord(STAGE).start()
    root, sources, input_cfg = _sources(cfg)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    settings = _settings(checkpoint, cfg, root)
    if storage.exists(settings_uri(cfg.run_dir)) and \
            storage.read_json(settings_uri(cfg.run_dir)) != settings:
        _reset(cfg)
        record.counts["reset_changed_settings"] = 1
    storage.write_json(settings_uri(cfg.run_dir), settings)

    todo = [s for s in sources if not storage.exists(layout.embed_marker(cfg.run_dir, s[0]))]
    record.inputs = {"images": root, "tables": len(sources),
                     "rows": sum(n for *_, n in sources), "checkpoint": checkpoint}
    record.counts["tables_skipped_done"] = len(sources) - len(todo)
    for slug, _, n in todo:
        _clear_partial(cfg, slug)
        if n == 0:
            _mark_done(cfg, slug, Counter())
    todo = [s for s in todo if s[2] > 0]
    if todo:
        def done(slug: str, tally: Counter[str]) -> None:
            _mark_done(cfg, slug, tally)
            record.counts["tables_embedded"] += 1

        ds = build_gallery_dataset(cfg, checkpoint, todo, input_cfg)
        unfinished = count_until_done(ds.iter_rows(),
                                      {slug: n for slug, _, n in todo}, done)
        if unfinished:
            raise GalleryError(f"{len(unfinished)} images table(s) ended with rows unaccounted "
                               f"for: {unfinished[:5]}")
    embedded = _tally(cfg, sources, record)
    if embedded == 0:
        raise GalleryError(f"no gallery image could be embedded (rejects: "
                           f"{dict(record.rejects) or 'none'}; is the input empty?)")

    index_meta = _index(cfg, rebuild=bool(todo) or record.counts["reset_changed_settings"] > 0)
    record.counts["indexed"] = index_meta["count"]
    storage.write_json(gallery_json(cfg.run_dir), {
        "checkpoint": checkpoint, "space": SPACE, "dim": index_meta["dim"],
        "count": index_meta["count"], "index": index_dir(cfg.run_dir),
        "index_build": index_meta["build"], "images_tables": [uri for _, uri, _ in sources],
        "input": input_cfg.model_dump(mode="json"), "settings": settings,
    })
    record.outputs = {"gallery": gallery_json(cfg.run_dir), "index": index_dir(cfg.run_dir),
                      "rejects": layout.rejects_dir(cfg.run_dir, STAGE)}
    record.finish()
    manifest.record_stage(cfg.run_dir, record, config=cfg.model_dump(mode="json"))
    return record


def _index(cfg: GalleryConfig, rebuild: bool) -> dict[str, Any]:
    uri = storage.join(index_dir(cfg.run_dir), "index.json")
    if not rebuild and storage.exists(uri):
        meta = storage.read_json(uri)
        if meta.get("build") == cfg.index.build_fields():
            return meta
    return build_space(cfg, SPACE)  # type: ignore[arg-type]  # reads run_dir and index only


def _mark_done(cfg: GalleryConfig, slug: str, tally: Counter[str]) -> None:
    storage.write_json(layout.embed_marker(cfg.run_dir, slug), {"counts": dict(tally)})


def _tally(cfg: GalleryConfig, sources: list[tuple[str, str, int]],
           record: manifest.StageRecord) -> int:
    """Counts over every images table, this invocation's and earlier ones'; the embedded count."""
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(storage.read_json,
                                [layout.embed_marker(cfg.run_dir, slug) for slug, *_ in sources]))
    for m in markers:
        record.counts.update({k: v for k, v in m["counts"].items()
                              if k in ("embedded", "rejected")})
    rejects = storage.read_parquet_dir(layout.rejects_dir(cfg.run_dir, STAGE), ["reason"])
    if rejects is not None:
        record.rejects.update(Counter(rejects.column("reason").to_pylist()))
    return int(record.counts["embedded"])
