"""Index on Ray: per space, train once on a sample, then build every id-range shard in parallel.

The embeddings are read with Ray Data, each row tagged with its shard (from its id), grouped by
shard, and each group becomes one FAISS shard written under ``RUN/index/<space>/``. Non-finite
vectors are counted rejects. ``index.json`` (with the settings' fingerprint) is written last, then
the space's marker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from megapairs_ray.config import IndexConfig, RunConfig
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.pipeline.datasets import read_parquet_files
from megapairs_ray.pipeline.embed import EMBED
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.reasons import Reason
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


def _tag_shards(table: pa.Table, shards: int) -> pa.Table:
    """Add each row's id-range shard; Arrow in, Arrow out, so the vectors keep their type."""
    ids = table.column("image_id").to_numpy()
    return table.select(["image_id", "embedding"]).append_column(
        "shard", pa.array(shard_of(ids, shards)))


def _build_shard_task(staging: str, shard: int, trained: bytes, space: str, out_dir: str,
                      run_dir: str, cfg: IndexConfig, factory: str, dim: int) -> tuple[int, int]:
    """Build one id-range shard from its staged partition; (vectors indexed, vectors dropped)."""
    table = storage.read_parquet_dir(storage.join(staging, f"shard={shard}"),
                                     ["image_id", "embedding"])
    if table is None:
        ids, vectors = np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    else:
        col = table.column("embedding").combine_chunks()
        ids = table.column("image_id").to_numpy()
        vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    ids, vectors, dropped = clean_vectors(ids, vectors)
    index = build_shard(trained, ids, vectors)
    lo, hi = id_range(shard, cfg.shards)
    save_shard(out_dir, index, ShardMeta(space, shard, cfg.shards, cfg.kind, factory, dim,
                                         int(index.ntotal), lo, hi))
    if len(dropped):
        write_rejects(layout.rejects_file(run_dir, "index", f"{space}-{shard:04d}"),
                      [reject_row("index", f"{space}/{shard}", [int(i)], Reason.NON_FINITE_VECTOR,
                                  "NaN or inf in the embedding") for i in dropped])
    return int(index.ntotal), len(dropped)


def _count_and_sample(files: list[str], want: int, seed: int = 0,
                      ) -> tuple[int, int, np.ndarray]:
    """Row count (from parquet footers), dimension, and a training sample read from randomly
    chosen files — no pass over the whole space."""
    fs, _ = storage.filesystem(files[0])

    def footer(uri: str) -> tuple[int, int]:
        with fs.open(storage.filesystem(uri)[1], "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.metadata.num_rows, pf.schema_arrow.field("embedding").type.list_size

    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(footer, files))
    dims = {d for _, d in footers}
    if len(dims) != 1:
        raise IndexStageError(f"embedding parts of one space disagree on the dimension: {dims}")
    dim = dims.pop()
    rng = np.random.default_rng(seed)
    picked: list[np.ndarray] = [np.zeros((0, dim), np.float32)]
    got = 0
    for i in rng.permutation(len(files)):
        if got >= want:
            break
        table = storage.read_parquet(files[i], ["embedding"])
        col = table.column("embedding").combine_chunks()
        vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        vectors = vectors[np.isfinite(vectors).all(axis=1)].astype(np.float32)
        picked.append(vectors)
        got += len(vectors)
    return sum(n for n, _ in footers), dim, np.concatenate(picked)[:want]


def build_space(run_dir: str, icfg: IndexConfig, space: str, fingerprint: str = "",
                ) -> dict[str, Any]:
    """Build one space's index (the run's, or a gallery's) from ``RUN/embeddings/<space>``; its
    ``index.json`` (written last) records ``fingerprint``, the settings it was built under."""
    src = layout.embeddings_dir(run_dir, space)
    files = storage.list_files(src, ".parquet")
    if not files:
        raise IndexStageError(f"space {space!r} has no embeddings under {src}: run embed first")
    out = layout.index_dir(run_dir, space)
    storage.remove(out, recursive=True)
    for stale in storage.list_files(layout.rejects_dir(run_dir, "index")):
        if stale.rsplit("/", 1)[-1].startswith(f"{space}-"):
            storage.remove(stale)
    n, dim, sample = _count_and_sample(files, icfg.train_sample)
    if n == 0:
        raise IndexStageError(f"space {space!r} is empty")
    factory = factory_string(icfg, dim, n)
    trained_ref = ray.remote(num_cpus=icfg.shard_num_cpus)(train_index).remote(icfg, sample, n)
    # Stage the vectors partitioned by id-range shard (each block writes its own slices: no
    # shuffle), then build every shard in its own task from its partition alone.
    staging = storage.join(out, "staging")
    vectors = read_parquet_files(src, ["image_id", "embedding"])
    assert vectors is not None  # its files were listed above
    (vectors.map_batches(_tag_shards, fn_kwargs={"shards": icfg.shards}, batch_format="pyarrow",
                         num_cpus=0.25)
     .write_parquet(staging, partition_cols=["shard"]))
    build = ray.remote(num_cpus=icfg.shard_num_cpus)(_build_shard_task)
    results = ray.get([build.remote(staging, s, trained_ref, space, out, run_dir, icfg,
                                    factory, dim) for s in range(icfg.shards)])
    storage.remove(staging, recursive=True)
    meta = {"space": space, "kind": icfg.kind, "factory": factory, "dim": dim,
            "shards": icfg.shards, "count": sum(c for c, _ in results),
            "rejected": sum(r for _, r in results),
            "per_shard": [c for c, _ in results],
            "build": icfg.build_fields(), "fingerprint": fingerprint}
    storage.write_json(layout.index_meta_file(run_dir, space), meta)
    return meta


def _run(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    for space in todo:
        meta = build_space(ctx.cfg.run_dir, ctx.cfg.index, space, ctx.state.fingerprint)
        counts = {f"{space}_vectors": meta["count"]}
        if meta["rejected"]:
            counts[f"reject:{Reason.NON_FINITE_VECTOR}"] = meta["rejected"]
        ctx.state.mark_done(space, counts)


def _upgrade_marker(space: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Books v1 counted a space's vectors and non-finite rejects without naming them."""
    old = doc["counts"]
    doc["counts"] = {f"{space}_vectors": old.get("vectors", 0)}
    if old.get("rejected"):
        doc["counts"][f"reject:{Reason.NON_FINITE_VECTOR}"] = old["rejected"]
    return doc


INDEX: Stage[RunConfig] = Stage(
    name="index",
    help="Build the sharded FAISS index of each embedding space.",
    needs=(EMBED,),
    # How the index is built (not how it is searched).
    settings=lambda cfg: {f"index.{k}": v for k, v in cfg.index.build_fields().items()},
    outputs=lambda cfg: {**{s: layout.index_dir(cfg.run_dir, s) for s in cfg.mine.spaces},
                         "rejects": layout.rejects_dir(cfg.run_dir, "index")},
    removes=lambda cfg: [layout.index_root(cfg.run_dir), layout.rejects_dir(cfg.run_dir, "index")],
    units=lambda cfg: list(cfg.mine.spaces),
    run=_run,
    unit_noun="spaces",
    upgrade_marker=_upgrade_marker,
)
