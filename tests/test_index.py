import numpy as np
import pytest

from megapairs_ray.config import IndexConfig
from megapairs_ray.stages.index import (
    IndexShard,
    IndexStageError,
    ShardMeta,
    build_shard,
    clean_vectors,
    factory_string,
    id_range,
    merge_topk,
    save_shard,
    shard_of,
    train_index,
)
from tests.synthetic import clustered, random_ids


def _build(tmp_path, cfg, ids, x):
    trained = train_index(cfg, x[: cfg.train_sample], len(x))
    shard_ids = shard_of(ids, cfg.shards)
    for s in range(cfg.shards):
        sel = shard_ids == s
        lo, hi = id_range(s, cfg.shards)
        save_shard(str(tmp_path), build_shard(trained, ids[sel], x[sel]),
                   ShardMeta("s", s, cfg.shards, cfg.kind, "f", x.shape[1], int(sel.sum()),
                             lo, hi))
    return [IndexShard(str(tmp_path), s, cfg) for s in range(cfg.shards)]


def _exact(x, q, ids, k):
    sims = q @ x.T
    order = np.lexsort((np.broadcast_to(ids, sims.shape), -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, 1), ids[order]


def test_id_ranges_partition_the_int64_space():
    ids = np.array([-(2**63), -1, 0, 1, 2**63 - 1], dtype=np.int64)
    assert shard_of(ids, 4).tolist() == [0, 1, 2, 2, 3]
    assert shard_of(ids, 1).tolist() == [0] * 5
    for s in range(4):
        lo, hi = id_range(s, 4)
        inside = ids[(ids >= lo) & (ids <= hi)]
        assert (shard_of(inside, 4) == s).all()
    balanced = np.bincount(shard_of(random_ids(40_000, 1), 8), minlength=8)
    assert balanced.min() > 4_500


def test_sharded_exact_search_equals_one_index(tmp_path):
    x = clustered(3000, 32, 20, 0.3, seed=1)
    ids = random_ids(3000, 2)
    q = clustered(50, 32, 20, 0.3, seed=3)
    one = _build(tmp_path / "one", IndexConfig(kind="flat", shards=1), ids, x)[0]
    four = _build(tmp_path / "four", IndexConfig(kind="flat", shards=4), ids, x)
    assert sum(s.count for s in four) == 3000
    s1, i1 = merge_topk([one.search(q, 10)], 10)
    s4, i4 = merge_topk([s.search(q, 10) for s in four], 10)
    assert (i1 == i4).all()
    assert np.allclose(s1, s4, atol=1e-6)
    se, ie = _exact(x, q, ids, 10)
    assert np.allclose(s4, se, atol=1e-5)
    assert (i4 == ie).all()


@pytest.mark.parametrize(("kind", "params"), [
    ("ivf_flat", {"nlist": 32, "nprobe": 8}),
    ("ivf_pq", {"nlist": 32, "nprobe": 8, "pq_m": 8}),
    ("hnsw", {"hnsw_m": 16}),
])
def test_approximate_kinds_find_most_true_neighbours(tmp_path, kind, params):
    x = clustered(4000, 32, 30, 0.35, seed=4)
    ids = random_ids(4000, 5)
    q = x[:100]
    shards = _build(tmp_path, IndexConfig(kind=kind, shards=2, train_sample=4000, **params),
                    ids, x)
    _, got = merge_topk([s.search(q, 10) for s in shards], 10)
    _, want = _exact(x, q, ids, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall > 0.9, recall


def test_k_beyond_the_corpus_returns_padding_never_invented_ids(tmp_path):
    x = clustered(7, 16, 2, 0.3, seed=6)
    ids = random_ids(7, 7)
    shards = _build(tmp_path, IndexConfig(kind="flat", shards=3), ids, x)
    scores, got = merge_topk([s.search(x[:2], 20) for s in shards], 20)
    assert got.shape == (2, 20)
    assert set(got[0][:7].tolist()) == set(ids.tolist())
    assert (got[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()


def test_bad_inputs(tmp_path):
    x = clustered(100, 16, 4, 0.3, seed=8)
    ids = random_ids(100, 9)
    x[5, 3] = np.nan
    x[9, 0] = np.inf
    kept_ids, kept, dropped = clean_vectors(ids, x)
    assert len(kept) == 98 and set(dropped.tolist()) == {ids[5], ids[9]}
    assert train_index(IndexConfig(), np.zeros((0, 16), np.float32), 0)  # flat: no training
    with pytest.raises(IndexStageError, match="no finite training vectors"):
        train_index(IndexConfig(kind="ivf_flat", nlist=4), np.zeros((0, 16), np.float32), 0)
    with pytest.raises(IndexStageError, match="must divide"):
        factory_string(IndexConfig(kind="ivf_pq", pq_m=5), 16, 100)
    with pytest.raises(IndexStageError, match="IVF lists"):
        train_index(IndexConfig(kind="ivf_flat", nlist=500), kept, 98)
    shards = _build(tmp_path, IndexConfig(kind="flat"), kept_ids, kept)
    with pytest.raises(IndexStageError, match="dimension"):
        shards[0].search(np.zeros((2, 8), np.float32), 3)
    with pytest.raises(IndexStageError, match="dimension"):
        build_shard(train_index(IndexConfig(), kept, 98), kept_ids[:3],
                    np.zeros((3, 8), np.float32))
    (tmp_path / "shard-0000.faiss").write_bytes(b"not an index")
    with pytest.raises(IndexStageError, match="corrupt"):
        IndexShard(str(tmp_path), 0, IndexConfig())
    with pytest.raises(IndexStageError, match="missing"):
        IndexShard(str(tmp_path), 7, IndexConfig())


def test_merge_orders_by_score_then_id_and_skips_faiss_gaps():
    a = (np.array([[0.9, 0.5, -3.4e38]], np.float32), np.array([[-5, -7, -1]], np.int64))
    b = (np.array([[0.9, 0.7]], np.float32), np.array([[-9, 3]], np.int64))
    c = (np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64))  # an empty shard
    scores, ids = merge_topk([a, b, c], 5)
    assert ids.tolist() == [[-9, -5, 3, -7, -1]]  # ties: the smaller (negative) id first
    assert scores[0, :4].tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5])
    assert np.isneginf(scores[0, 4])
