import faiss
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


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """FAISS's OpenMP threads spin-wait for each other: on a shared 2-core machine one that is
    descheduled stalls the rest (measured under load: PQ training 0.4 s on one thread, 8 s on
    two)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _build(tmp_path, cfg, ids, x, trained=None, mmap=False):
    trained = trained or train_index(cfg, x[: cfg.train_sample], len(x))
    shard_ids = shard_of(ids, cfg.shards)
    for s in range(cfg.shards):
        sel = shard_ids == s
        lo, hi = id_range(s, cfg.shards)
        save_shard(str(tmp_path), build_shard(trained, ids[sel], x[sel]),
                   ShardMeta("s", s, cfg.shards, cfg.kind, "f", x.shape[1], int(sel.sum()),
                             lo, hi))
    return [IndexShard(str(tmp_path), s, cfg, mmap=mmap) for s in range(cfg.shards)]


def _exact(x, q, ids, k):
    # einsum's own loop, not BLAS: a pair's score must not depend on where the vector sits in
    # the matrix (OpenBLAS's AVX2 sgemm rounds a tile's edge apart from its middle, so
    # ``q @ x.T`` broke exact ties by an ulp of noise on such a machine).
    sims = np.einsum("qd,nd->qn", q, x)
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
    if kind == "ivf_pq":  # trained without the polysemous code order no search of ours reads
        ivf = faiss.downcast_index(faiss.extract_index_ivf(shards[0].index))
        assert not ivf.do_polysemous_training and ivf.polysemous_ht == 0


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


def _tied(n_bases: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors with many exact duplicates (1 to 60 copies of each base vector), and their ids."""
    bases = clustered(n_bases, dim, 6, 0.5, seed=seed)
    copies = np.random.default_rng(seed).integers(1, 61, n_bases)
    x = np.repeat(bases, copies, axis=0)
    return random_ids(len(x), seed + 1), x


def _layouts(tmp_path, cfg_kw, ids, x):
    """The same vectors as 1, 2 and 4 id-range shards, and inserted in two shuffled orders; one
    training sample for all (the pipeline samples the same files for every build). The 2-shard
    layout is memory-mapped, as the service loads a gallery."""
    out = {}
    trained = train_index(IndexConfig(**cfg_kw), x, len(x))
    for name, shards, seed in [("1", 1, None), ("2", 2, None), ("4", 4, None),
                               ("1-shuffled", 1, 11), ("4-shuffled", 4, 12)]:
        order = (np.arange(len(ids)) if seed is None
                 else np.random.default_rng(seed).permutation(len(ids)))
        cfg = IndexConfig(shards=shards, **cfg_kw)
        out[name] = _build(tmp_path / name, cfg, ids[order], x[order], trained, mmap=name == "2")
    return out


@pytest.mark.parametrize(("kind", "params"), [
    ("flat", {}),
    # IVF shards share the trained quantizer and codebooks: a query probes the same lists in
    # every shard and a pair scores as in one index, so even approximate answers are the same.
    ("ivf_flat", {"nlist": 8, "nprobe": 2}),
    ("ivf_pq", {"nlist": 8, "nprobe": 2, "pq_m": 4, "pq_nbits": 4, "pq_refine": False}),
])
def test_exact_ties_give_the_same_neighbours_for_any_sharding_and_insertion_order(
        tmp_path, kind, params):
    ids, x = _tied(40, 16, seed=21)
    q = np.concatenate([x[:: max(1, len(x) // 30)], clustered(20, 16, 6, 0.5, seed=22)])
    k = 10
    got = {name: merge_topk([s.search(q, k) for s in shards], k)
           for name, shards in _layouts(tmp_path, {"kind": kind, **params}, ids, x).items()}
    scores, nbrs = got["1"]
    assert (nbrs != -1).all()
    # The data really ties at the k-th score, with the group running past k.
    assert (scores[:, k - 1] == scores[:, k - 2]).sum() > 10
    for name, (s, i) in got.items():
        assert (i == nbrs).all(), name
        assert (s == scores).all(), name
    # Ties in id order, and the kept members of a tie group are its smallest ids.
    for row_s, row_i in zip(scores, nbrs):
        for a in range(k - 1):
            assert row_s[a] > row_s[a + 1] or row_i[a] < row_i[a + 1]
    if kind == "flat":
        se, ie = _exact(x, q, ids, k)
        assert (nbrs == ie).all()
        assert np.allclose(scores, se, atol=1e-6)


def test_a_tie_group_far_larger_than_k_is_searched_whole(tmp_path):
    bases = clustered(3, 8, 3, 0.5, seed=31)
    x = np.repeat(bases, [400, 30, 30], axis=0)  # k + TIE_MARGIN doubled four times per shard
    ids = random_ids(len(x), 32)
    shards = _build(tmp_path, IndexConfig(kind="flat", shards=2), ids, x)
    q = np.concatenate([x[:1], np.full((1, 8), np.nan, np.float32)])  # NaN: no endless growth
    s, i = merge_topk([sh.search(q, 3) for sh in shards], 3)
    assert i[0].tolist() == sorted(ids[:400].tolist())[:3]
    assert len(set(s[0].tolist())) == 1


def test_a_score_depends_on_the_pair_alone_on_this_machine():
    """The premise of id tie-breaking across shards: a bit-identical vector scores bit-identically
    against a query whatever the index's size, its position in it, the query batch's size (FAISS
    switches from a SIMD loop to BLAS at 20 queries), the thread count and the index kind.
    Measured true for FAISS 1.15 on OpenBLAS; a BLAS that breaks it fails here first.

    Not HNSW: on an AVX2 build its batched distance kernel (four vectors at a time) rounds
    differently from its one-vector kernel, so there a pair's score depends on the graph walk
    by an ulp (measured). HNSW shards then break exact ties by that noise, not by id."""
    import faiss

    rng = np.random.default_rng(41)
    dup = clustered(1, 64, 1, 0.0, seed=42)[0]
    q = clustered(40, 64, 1, 0.3, seed=42)  # around dup: scores of every magnitude
    seen: dict[int, set[float]] = {r: set() for r in range(len(q))}
    for n in (1, 7, 300, 1025, 2100):  # FAISS computes blocks of 1,024 vectors
        for pos in sorted({0, n // 2, n - 1}):
            x = rng.standard_normal((n, 64)).astype(np.float32)
            x[pos] = dup
            for spec in ("Flat", "IVF1,Flat")[: 1 if n > 300 else 2]:
                index = faiss.index_factory(64, spec, faiss.METRIC_INNER_PRODUCT)
                index.train(x)
                index.add(x)
                for nq, threads in ((3, 1), (40, 1), (40, 2)):
                    faiss.omp_set_num_threads(threads)
                    s, i = index.search(q[:nq], min(n, 50))
                    for r, c in zip(*np.nonzero(i == pos)):
                        seen[r].add(float(s[r, c]))
    assert all(len(v) == 1 for v in seen.values()), seen


def test_torch_search_orders_ties_by_id_on_any_sharding(tmp_path):
    """The GPU path's code, run with torch on the CPU: fp16 candidates, exact re-scoring,
    ties by id; every sharding and insertion order gives the FAISS path's neighbours."""
    ids, x = _tied(40, 16, seed=51)
    x = x.astype(np.float16).astype(np.float32)  # the GPU path holds fp16 vectors
    q = x[:: max(1, len(x) // 30)]
    k = 10
    layouts = _layouts(tmp_path, {"kind": "flat"}, ids, x)
    want_s, want_i = merge_topk([s.search(q, k) for s in layouts["1"]], k)
    for name, shards in layouts.items():
        for s in shards:
            s._load_torch("cpu")
        got_s, got_i = merge_topk([s.search(q, k) for s in shards], k)
        assert (got_i == want_i).all(), name
        assert np.allclose(got_s, want_s, atol=1e-6), name


def test_exact_torch_scores_ignore_shape_and_position():
    import torch

    from megapairs_ray.stages.index import exact_scores_torch

    rng = np.random.default_rng(61)
    q = torch.from_numpy(rng.standard_normal((1, 48)).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal(48).astype(np.float32))
    got = set()
    for m in (1, 5, 64):
        for pos in (0, m - 1):
            x = torch.from_numpy(rng.standard_normal((1, m, 48)).astype(np.float32))
            x[0, pos] = v
            got.add(float(exact_scores_torch(q, x)[0, pos]))
    assert len(got) == 1
    want = np.float32(q[0].double() @ v.double())
    assert got.pop() == pytest.approx(float(want), abs=1e-7)


def test_hnsw_answers_k_beyond_ef_search_and_orders_what_it_finds_by_score_then_id(tmp_path):
    """HNSW returns at most efSearch hits (FAISS does not raise it to k); the shard raises it to
    the fetch. Its graph prunes exact duplicates, so a big tie group may be found only in part:
    what it finds is still cut by score, then id."""
    x = np.repeat(clustered(60, 8, 5, 0.5, seed=71), 8, axis=0)
    ids = random_ids(len(x), 72)
    (shard,) = _build(tmp_path, IndexConfig(kind="hnsw", hnsw_m=8, hnsw_ef_search=16), ids, x)
    scores, got = shard.search(x[::40], 300)
    assert (got != -1).all()
    for row_s, row_i in zip(scores, got):
        for a in range(299):
            assert row_s[a] > row_s[a + 1] or row_i[a] < row_i[a + 1]


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_shards_give_back_their_stored_vectors(tmp_path, kind):
    x = clustered(600, 16, 8, 0.3, seed=4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = random_ids(600, 5)
    cfg = IndexConfig(kind=kind, shards=2, nlist=8, train_sample=600)
    shards = _build(tmp_path, cfg, ids, x, mmap=True)
    asked = [*ids[::37].tolist(), 12345]  # one id in no shard
    found: dict[int, np.ndarray] = {}
    for s in shards:
        got = s.reconstruct(asked)
        assert not set(got) & set(found)  # each id lives in one shard only
        found.update(got)
    assert set(found) == set(ids[::37].tolist())
    np.testing.assert_allclose(np.stack([found[i] for i in ids[::37].tolist()]), x[::37],
                               atol=1e-6)


def test_deduplicate_keeps_the_best_ranked_hit_of_each_linked_group(tmp_path):
    """clip back's rule: hits linked above 0.94 (transitively) collapse to the best-ranked."""
    from megapairs_ray.serve.search import DEDUP_THRESHOLD, deduplicate

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    # a chain a-b-c where a and c are farther apart than the threshold, but each link is close
    ortho = base[1] - (base[1] @ base[0]) * base[0]
    ortho /= np.linalg.norm(ortho)
    angle = np.arccos(0.96)
    chain = [np.cos(t) * base[0] + np.sin(t) * ortho for t in (0, angle, 2 * angle)]
    assert chain[0] @ chain[2] < DEDUP_THRESHOLD < chain[0] @ chain[1]
    # rows: 0-1-2 the chain; 3 alone; 4 and 5 near-identical; 6 alone
    x = np.stack([*chain, base[2], base[3], base[3] * 0.999 + 0.001 * base[4], base[5]])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = random_ids(len(x), 6)
    shards = _build(tmp_path, IndexConfig(kind="flat", shards=2), ids, x)
    order = [1, 3, 2, 5, 0, 4, 6]  # the hits' ranking (best first): not the storage order
    hits = [{"id": int(ids[i]), "score": 1.0 - r / 10} for r, i in enumerate(order)]
    kept = [ids.tolist().index(h["id"]) for h in deduplicate(hits, shards)]
    # 1 (the chain's best ranked), 3, 5 (ranked before 4), 6; 2, 0 and 4 collapse
    assert kept == [1, 3, 5, 6]
    assert deduplicate(hits[:1], shards) == hits[:1]
