"""Index + mine through Ray: sharded indexes in shard actors, miners fanning out, resume."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from megapairs_ray.config import config_from_dict
from megapairs_ray.io import storage
from megapairs_ray.io.layout import index_dir
from megapairs_ray.io.shards import list_shards
from megapairs_ray.io.stepstate import StageInputError
from megapairs_ray.pipeline.engine import run_stage
from megapairs_ray.pipeline.index import INDEX, build_space
from megapairs_ray.pipeline.mine import MINE, start_shard_actors, stop_actors
from megapairs_ray.stages.index import IndexStageError, merge_topk
from megapairs_ray.stages.mine import mine_batch
from tests.helpers import good_samples, tiny_config, write_tar
from tests.synthetic import clustered, mark_embedded, random_ids, write_space

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SPACES = ["clip_image", "dino_image", "clip_text"]


def test_index_and_mine_on_ray_equal_one_exact_index(tmp_path, ray_cluster):
    for i in range(3):
        write_tar(tmp_path / "c" / f"s{i}.tar", good_samples(1, prefix=f"s{i}"))
    cfg = config_from_dict(tiny_config(
        tmp_path / "run", [str(tmp_path / "c")],
        index={"kind": "flat", "shards": 3, "shard_num_cpus": 0.1},
        mine={"k": 12, "windows": {s: (0.7, 0.97) for s in SPACES}, "min_hard_negatives": 3,
              "max_hard_negatives": 5, "num_cpus": 0.25}))
    slugs = [s.slug for s in list_shards(cfg.input)]
    n = 450
    ids = random_ids(n, 1)
    vecs = {s: clustered(n, 16, 10, 0.45, seed=i + 2) for i, s in enumerate(SPACES)}
    vecs["clip_text"][7, 0] = np.nan  # a broken vector: a counted reject, not a crash
    for s in SPACES:
        write_space(cfg.run_dir, s, ids, vecs[s], slugs)
    with pytest.raises(StageInputError, match="run `megapairs ingest` first"):
        run_stage(INDEX, cfg)  # embeddings without the books of ingest and embed are not trusted
    mark_embedded(cfg, slugs)

    rec = run_stage(INDEX, cfg)
    assert rec.counts["clip_image_vectors"] == n
    assert rec.counts["clip_text_vectors"] == n - 1
    assert rec.rejects["non_finite_vector"] == 1
    meta = storage.read_json(storage.join(index_dir(cfg.run_dir, "clip_image"), "index.json"))
    assert meta["shards"] == 3 and sum(meta["per_shard"]) == n and min(meta["per_shard"]) > 100

    mined = run_stage(MINE, cfg)
    pairs = storage.read_parquet_dir(storage.join(cfg.run_dir, "pairs")).to_pylist()
    assert mined.counts["pairs"] == len(pairs) > 200

    # The same rules over one exact unsharded search of the same (fp16-stored) vectors.
    stored = {s: vecs[s].astype(np.float16).astype(np.float32) for s in SPACES}
    neighbours = {}
    for s in SPACES:
        ok = np.isfinite(stored[s]).all(axis=1)
        sims = stored[s] @ stored[s][ok].T
        ids_ok = ids[ok]
        order = np.lexsort((np.broadcast_to(ids_ok, sims.shape), -sims), axis=1)[:, : cfg.mine.k]
        sc = np.take_along_axis(sims, order, 1)
        nb = ids_ok[order]
        sc[~np.isfinite(stored[s]).all(axis=1)] = -np.inf
        nb[~np.isfinite(stored[s]).all(axis=1)] = -1
        neighbours[s] = merge_topk([(sc, nb)], cfg.mine.k)
    want, _ = mine_batch(ids.tolist(), neighbours, cfg.mine)
    key = lambda p: (p["query_id"], p["target_id"])  # noqa: E731
    got = sorted(pairs, key=key)
    want = sorted(want, key=key)
    assert [key(p) for p in got] == [key(p) for p in want]
    assert [p["hard_negatives"] for p in got] == [p["hard_negatives"] for p in want]
    assert [p["spaces"] for p in got] == [p["spaces"] for p in want]

    # A shard actor that dies (its node lost) is started again and answers as it did: Ray
    # restarts it and retries the call in flight.
    actors = start_shard_actors(cfg)
    try:
        victim = actors["clip_image"][1]
        queries = np.ascontiguousarray(stored["clip_image"][:4])
        before = ray.get(victim.search.remote(queries, 5))
        ray.kill(victim, no_restart=False)
        after = ray.get(victim.search.remote(queries, 5), timeout=120)
        assert np.array_equal(before[1], after[1]) and np.allclose(before[0], after[0])
    finally:
        stop_actors(actors)

    # Reruns do nothing; search-time settings need no rebuild; other mining rules re-mine.
    assert run_stage(INDEX, cfg).counts["spaces_skipped_done"] == 3
    assert run_stage(MINE, cfg).counts["shards_skipped_done"] == 3
    searched = cfg.model_copy(update={"index": cfg.index.model_copy(update={"nprobe": 7})})
    assert run_stage(INDEX, searched).counts["spaces_skipped_done"] == 3
    stricter = cfg.model_copy(update={"mine": cfg.mine.model_copy(
        update={"min_hard_negatives": 5})})
    again = run_stage(MINE, stricter)
    assert again.inputs["changed"] == ["mine.min_hard_negatives"]
    assert again.counts["shards_mined"] == 3
    # A missing shard file is a clear error, not a wrong answer.
    storage.remove(storage.join(cfg.run_dir, "pairs"), recursive=True)
    storage.remove(storage.join(index_dir(cfg.run_dir, "dino_image"), "shard-0001.faiss"))
    with pytest.raises(Exception, match="index shard missing"):
        run_stage(MINE, cfg)


def test_index_refuses_empty_or_inconsistent_spaces(tmp_path, ray_cluster):
    write_tar(tmp_path / "c" / "s.tar", good_samples(1))
    cfg = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "c")]))
    slugs = [s.slug for s in list_shards(cfg.input)]
    mark_embedded(cfg, slugs)
    with pytest.raises(IndexStageError, match="no embeddings"):
        run_stage(INDEX, cfg)
    write_space(cfg.run_dir, "clip_image", np.zeros(0, np.int64), np.zeros((0, 8)), slugs)
    with pytest.raises(IndexStageError, match="is empty"):
        build_space(cfg.run_dir, cfg.index, "clip_image")
    write_space(cfg.run_dir, "dino_image", random_ids(4, 1), clustered(4, 8, 2, 0.3, 1),
                ["a"])
    write_space(cfg.run_dir, "dino_image", random_ids(4, 2), clustered(4, 16, 2, 0.3, 1),
                ["b"])
    with pytest.raises(IndexStageError, match="disagree on the dimension"):
        build_space(cfg.run_dir, cfg.index, "dino_image")


def test_a_space_of_only_broken_vectors_builds_an_empty_flat_index(tmp_path, ray_cluster):
    write_tar(tmp_path / "c" / "s.tar", good_samples(1))
    cfg = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "c")],
                                       index={"shard_num_cpus": 0.1}))
    slugs = [s.slug for s in list_shards(cfg.input)]
    vecs = np.full((5, 8), np.nan, dtype=np.float32)
    write_space(cfg.run_dir, "clip_text", random_ids(5, 3), vecs, slugs)
    meta = build_space(cfg.run_dir, cfg.index, "clip_text")
    assert meta["count"] == 0 and meta["rejected"] == 5


def test_index_and_mine_with_the_run_dir_on_s3(tmp_path, bucket, ray_cluster):
    """A refined IVF-PQ on s3: each shard actor copies its shard to local disk and maps it; the
    similarities the miner records are the true ones, inside their windows."""
    write_tar(tmp_path / "c" / "s0.tar", good_samples(1, prefix="a"))
    write_tar(tmp_path / "c" / "s1.tar", good_samples(1, prefix="b"))
    windows = {s: (0.6, 0.99) for s in SPACES}
    cfg = config_from_dict(tiny_config(
        f"s3://{bucket}/run", [str(tmp_path / "c")],
        index={"kind": "ivf_pq", "nlist": 8, "nprobe": 8, "pq_m": 2, "pq_nbits": 4,
               "pq_refine_k_factor": 4, "shards": 2, "shard_num_cpus": 0.1,
               "local_cache_dir": str(tmp_path / "cache")},
        mine={"k": 8, "windows": windows, "min_hard_negatives": 2, "num_cpus": 0.25}))
    slugs = [s.slug for s in list_shards(cfg.input)]
    ids = random_ids(120, 5)
    stored = {}
    for i, s in enumerate(SPACES):
        stored[s] = clustered(120, 8, 4, 0.3, seed=i).astype(np.float16)
        write_space(cfg.run_dir, s, ids, stored[s], slugs)
    mark_embedded(cfg, slugs)
    assert run_stage(INDEX, cfg).counts["dino_image_vectors"] == 120
    assert storage.exists(storage.join(index_dir(cfg.run_dir, "dino_image"), "shard-0001.faiss"))
    rec = run_stage(MINE, cfg)
    pairs = storage.read_parquet_dir(storage.join(cfg.run_dir, "pairs")).to_pylist()
    assert rec.counts["pairs"] == len(pairs) > 0
    assert len(list((tmp_path / "cache").glob("*/shard-*.faiss"))) == 6  # 3 spaces x 2 shards
    row = {int(i): r for r, i in enumerate(ids)}
    for p in pairs:
        for space, sim in zip(p["spaces"], p["similarities"]):
            v = stored[space].astype(np.float64)
            true = v[row[p["query_id"]]] @ v[row[p["target_id"]]]
            assert abs(sim - true) < 1e-6 and windows[space][0] < true < windows[space][1]
