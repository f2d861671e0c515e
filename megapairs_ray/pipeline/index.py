"""Index on Ray: per space, train once on a sample, then build every id-range shard in parallel.

The embeddings are read with Ray Data, each row tagged with its shard (from its id), grouped by
shard, and each group becomes one FAISS shard written under ``RUN/index/<space>/``. Non-finite
vectors are counted rejects. ``index.json`` is written last and marks the space done.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from megapairs_ray import manifest
from megapairs_ray.config import IndexConfig, RunConfig
from megapairs_ray.io import storage
from megapairs_ray.stages import layout
from megapairs_ray.stages.index import (
    IndexStageError,
    ShardMeta,
    build_shard,
    clean_vectors,
    factory_string,
    id_range,
    save_shard,
    shard_of,
    train_index,
)
from megapairs_ray.stages.ingest import REJECTS_SCHEMA


def index_dir(run_dir: str, space: str) -> str:
    return storage.join(run_dir, "index", space)


def _matrix(col: Any) -> np.ndarray:
    arr = np.asarray(col)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in col])
    return arr


def _tag_shards(batch: dict[str, Any], shards: int, dim: int) -> dict[str, Any]:
    vectors = _matrix(batch["embedding"])
    if vectors.shape[1] != dim:
        raise IndexStageError(f"embedding dimension {vectors.shape[1]} in a part of a space whose "
                          f"first part has dimension {dim}")
    return {"image_id": batch["image_id"], "embedding": vectors,
            "shard": shard_of(np.asarray(batch["image_id"]), shards)}


def _build_group(batch: dict[str, Any], trained: bytes, space: str, out_dir: str,
                 run_dir: str, cfg: IndexConfig, factory: str, dim: int) -> dict[str, Any]:
    shard = int(batch["shard"][0])
    ids, vectors, dropped = clean_vectors(np.asarray(batch["image_id"]),
                                          _matrix(batch["embedding"]))
    index = build_shard(trained, ids, vectors)
    lo, hi = id_range(shard, cfg.shards)
    save_shard(out_dir, index, ShardMeta(space, shard, cfg.shards, cfg.kind, factory, dim,
                                         int(index.ntotal), lo, hi))
    if len(dropped):
        storage.write_parquet(
            storage.join(layout.rejects_dir(run_dir, "index"), f"{space}-{shard:04d}.parquet"),
            pa.Table.from_pylist([{"image_id": int(i), "shard": f"{space}/{shard}", "key": None,
                                   "stage": "index", "reason": "non_finite_vector",
                                   "detail": "NaN or inf in the embedding"} for i in dropped],
                                 schema=REJECTS_SCHEMA))
    return {"shard": np.array([shard]), "count": np.array([index.ntotal]),
            "rejected": np.array([len(dropped)])}


def build_space(cfg: RunConfig, space: str) -> dict[str, Any]:
    icfg = cfg.index
    src = layout.embeddings_dir(cfg.run_dir, space)
    files = storage.list_files(src, ".parquet")
    if not files:
        raise IndexStageError(f"space {space!r} has no embeddings under {src}: run embed first")
    out = index_dir(cfg.run_dir, space)
    storage.remove(out, recursive=True)
    ds = ray.data.read_parquet(files)
    n = ds.count()
    if n == 0:
        raise IndexStageError(f"space {space!r} is empty")
    dim = ds.schema().base_schema.field("embedding").type.list_size
    fraction = min(1.0, icfg.train_sample / n)
    sample_batch = (ds.random_sample(fraction, seed=0) if fraction < 1 else ds).take_batch(
        icfg.train_sample, batch_format="numpy")
    _, sample, _ = clean_vectors(np.asarray(sample_batch["image_id"]),
                                 _matrix(sample_batch["embedding"]))
    factory = factory_string(icfg, dim, n)
    trained = ray.get(ray.remote(num_cpus=icfg.shard_num_cpus)(train_index).remote(
        icfg, sample, n))
    tagged = ds.map_batches(_tag_shards, fn_kwargs={"shards": icfg.shards, "dim": dim},
                            batch_format="numpy")
    built = tagged.groupby("shard").map_groups(
        _build_group, batch_format="numpy", num_cpus=icfg.shard_num_cpus,
        fn_kwargs={"trained": trained, "space": space, "out_dir": out, "run_dir": cfg.run_dir,
                   "cfg": icfg, "factory": factory, "dim": dim})
    counts = {int(r["shard"]): (int(r["count"]), int(r["rejected"])) for r in built.iter_rows()}
    for shard in range(icfg.shards):  # an id range with no vectors still gets its (empty) shard
        if shard not in counts:
            lo, hi = id_range(shard, icfg.shards)
            save_shard(out, build_shard(trained, np.zeros(0, np.int64),
                                        np.zeros((0, dim), np.float32)),
                       ShardMeta(space, shard, icfg.shards, icfg.kind, factory, dim, 0, lo, hi))
            counts[shard] = (0, 0)
    meta = {"space": space, "kind": icfg.kind, "factory": factory, "dim": dim,
            "shards": icfg.shards, "count": sum(c for c, _ in counts.values()),
            "rejected": sum(r for _, r in counts.values()),
            "per_shard": [counts[s][0] for s in range(icfg.shards)],
            "config": icfg.model_dump(mode="json")}
    storage.write_json(storage.join(out, "index.json"), meta)
    return meta


def run_index(cfg: RunConfig) -> manifest.StageRecord:
    record = manifest.StageRecord("index").start()
    for space in cfg.mine.spaces:
        meta_uri = storage.join(index_dir(cfg.run_dir, space), "index.json")
        if storage.exists(meta_uri):
            meta = storage.read_json(meta_uri)
            if meta.get("config") == cfg.index.model_dump(mode="json"):
                record.counts["spaces_skipped_done"] += 1
                record.counts[f"{space}_vectors"] = meta["count"]
                continue
        meta = build_space(cfg, space)
        record.counts[f"{space}_vectors"] = meta["count"]
        if meta["rejected"]:
            record.rejects.update(Counter({"non_finite_vector": meta["rejected"]}))
    record.outputs = {s: index_dir(cfg.run_dir, s) for s in cfg.mine.spaces}
    record.finish()
    manifest.record_stage(cfg.run_dir, record)
    return record
