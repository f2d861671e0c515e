"""Mine on Ray: shard actors hold the indexes; miner actors fan each query batch out to them.

Queries are processed one input shard at a time (the embed stage wrote each input shard's
vectors side by side in every space), so a miner reads only that shard's three small slices.
For each space it sends the queries to every index shard's actor at once, merges the top-k lists
exactly (``merge_topk``), applies the mining rules and writes ``pairs/<shard>.parquet``, its
rejects, and last the shard's marker with its counts.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from megapairs_ray.config import MineConfig, RunConfig, output_settings
from megapairs_ray.io import layout, storage
from megapairs_ray.io.rejects import reject_row, write_rejects
from megapairs_ray.io.stepstate import StepState
from megapairs_ray.pipeline.engine import Stage, StageRun
from megapairs_ray.pipeline.index import INDEX
from megapairs_ray.pipeline.shardlist import run_shards
from megapairs_ray.stages.embed_io import embedding_matrix
from megapairs_ray.stages.index import IndexShard, IndexStageError, merge_topk, read_meta
from megapairs_ray.stages.mine import is_query, mine_batch

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.int64()), ("query_id", pa.int64()), ("target_id", pa.int64()),
    ("spaces", pa.list_(pa.string())), ("similarities", pa.list_(pa.float32())),
    ("hard_negatives", pa.list_(pa.int64())),
])


class MineShard:
    """Callable stage (a Ray actor): ``{"slug"}`` rows in, per-shard summaries out."""

    def __init__(self, run_dir: str, cfg: MineConfig, shard_actors: dict[str, list[Any]],
                 state: StepState) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.shard_actors = shard_actors
        self.state = state

    def search(self, space: str, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ref = ray.put(queries)  # one copy in the object store, read by every shard actor
        refs = [a.search.remote(ref, self.cfg.k) for a in self.shard_actors[space]]
        return merge_topk(ray.get(refs), self.cfg.k)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"slug": [], "queries": [], "pairs": [], "rejected": []}
        for slug in batch["slug"]:
            summary = self.mine_slug(str(slug))
            for k in out:
                out[k].append(summary[k])
        return {k: np.array(v) for k, v in out.items()}

    def mine_slug(self, slug: str) -> dict[str, Any]:
        vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for space in self.cfg.spaces:
            vectors[space] = embedding_matrix(
                layout.embeddings_shard_dir(self.run_dir, space, slug))
        all_ids = np.unique(np.concatenate([ids for ids, _ in vectors.values()]))
        queries = all_ids[is_query(all_ids, self.cfg.query_fraction, self.cfg.seed)]
        neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for space, (ids, vecs) in vectors.items():
            scores = np.full((len(queries), self.cfg.k), -np.inf, dtype=np.float32)
            nbr = np.full((len(queries), self.cfg.k), -1, dtype=np.int64)
            pos = {int(i): r for r, i in enumerate(ids)}
            rows = [r for r, q in enumerate(queries) if int(q) in pos]
            if rows:  # a query without a vector here (no caption: no text vector) skips it
                vq = vecs[[pos[int(queries[r])] for r in rows]].astype(np.float32)
                finite = np.isfinite(vq).all(axis=1)
                rows = [r for r, ok in zip(rows, finite) if ok]
                if rows:
                    s, i = self.search(space, vq[finite])
                    scores[rows], nbr[rows] = s, i
            neighbours[space] = (scores, nbr)
        pairs, rejects = mine_batch(queries.tolist(), neighbours, self.cfg)
        write_rejects(layout.rejects_file(self.run_dir, "mine", slug),
                      [reject_row("mine", slug, [r["query_id"], r["target_id"]], r["reason"],
                                  r["detail"]) for r in rejects])
        storage.write_parquet(layout.pairs_file(self.run_dir, slug),
                              pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA))
        counts = Counter({"queries": len(queries), "pairs": len(pairs)})
        counts.update("pairs_from_" + "+".join(p["spaces"]) for p in pairs)
        counts.update("reject:" + r["reason"] for r in rejects)
        self.state.mark_done(slug, counts)  # last: it vouches for both files
        return {"slug": slug, "queries": len(queries), "pairs": len(pairs),
                "rejected": len(rejects)}


def start_shard_actors(cfg: RunConfig) -> dict[str, list[Any]]:
    actor_cls = ray.remote(IndexShard)
    actors: dict[str, list[Any]] = {}
    INDEX.require_finished(cfg)
    for space in cfg.mine.spaces:
        meta = read_meta(layout.index_dir(cfg.run_dir, space))
        actors[space] = [
            # Spread over the nodes: each maps its shard's bulk through its node's page cache.
            # A shard actor holds nothing but its shard file, which it opens again, so Ray
            # restarts it elsewhere when its node is lost and retries the calls it had: a lost
            # node cost the whole run while the actors were starting (found by the soak).
            actor_cls.options(num_cpus=cfg.index.shard_num_cpus,
                              num_gpus=cfg.index.shard_num_gpus,
                              scheduling_strategy="SPREAD", max_restarts=-1,
                              max_task_retries=-1).remote(
                layout.index_dir(cfg.run_dir, space), s, cfg.index, mmap=cfg.index.mmap,
                local_cache_dir=cfg.index.local_cache_dir)
            for s in range(meta["shards"])
        ]
    # Fail here, with the shard's own message, if a shard file is missing or corrupt — or with
    # the resources asked for if the cluster cannot place every shard actor.
    ready = [a.shape.remote() for lst in actors.values() for a in lst]
    try:
        shapes = ray.get(ready, timeout=cfg.index.actor_start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        stop_actors(actors)
        n = len(ready)
        raise IndexStageError(
            f"{n} index shard actors ({cfg.index.shard_num_cpus} CPU, "
            f"{cfg.index.shard_num_gpus} GPU each) did not start within "
            f"{cfg.index.actor_start_timeout_s:.0f}s; the cluster has "
            f"{ray.cluster_resources()}: lower index.shard_num_cpus or index.shards, or, when "
            "the run is on s3 (each actor copies its shard to local disk first), raise "
            "index.actor_start_timeout_s") from None
    except Exception:
        stop_actors(actors)
        raise
    shapes_iter = iter(shapes)
    for space, lst in actors.items():
        dim = read_meta(layout.index_dir(cfg.run_dir, space))["dim"]
        for shard, _ in enumerate(lst):
            got_dim, _count = next(shapes_iter)
            if got_dim != dim:
                stop_actors(actors)
                raise IndexStageError(f"index shard {shard} of {space!r} has dimension {got_dim}, "
                                      f"index.json says {dim}: rerun the index stage")
    return actors


def stop_actors(actors: dict[str, list[Any]]) -> None:
    for lst in actors.values():
        for a in lst:
            ray.kill(a)


def _run(ctx: StageRun[RunConfig], todo: list[str]) -> None:
    cfg = ctx.cfg
    if not todo:
        return
    actors = start_shard_actors(cfg)
    try:
        ds = ray.data.from_items([{"slug": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            MineShard,
            fn_constructor_kwargs={"run_dir": cfg.run_dir, "cfg": cfg.mine,
                                   "shard_actors": actors, "state": ctx.state},
            batch_size=1, num_cpus=cfg.mine.num_cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.mine.actors))
        for _ in ds.iter_rows():
            ctx.count("shards_mined")
    finally:
        stop_actors(actors)


def _settings(cfg: RunConfig) -> dict[str, Any]:
    """The mining rules and how the indexes are searched (index's own settings are how they
    are built)."""
    return {**output_settings(cfg.mine, prefix="mine."),
            **{f"index.{k}": v for k, v in output_settings(cfg.index).items()
               if k not in cfg.index.build_fields()}}


MINE: Stage[RunConfig] = Stage(
    name="mine",
    help="Mine (query, target) pairs with hard negatives from the indexes.",
    # Index's fingerprint carries embed's: the query vectors mine reads are the indexed ones.
    needs=(INDEX,),
    settings=_settings,
    outputs=lambda cfg: {"pairs": layout.pairs_dir(cfg.run_dir),
                         "rejects": layout.rejects_dir(cfg.run_dir, "mine")},
    units=lambda cfg: [s.slug for s in run_shards(cfg)],
    run=_run,
    unit_noun="shards",
    hidden_counts=("queries",),
    finish=lambda ctx: ctx.count("pairs", 0),  # present even when nothing was mined
)
