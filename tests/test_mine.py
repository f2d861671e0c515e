"""The mining stage against a brute-force NumPy implementation of the same rules."""

import numpy as np
import pytest

from megapairs_ray.config import IndexConfig, MineConfig
from megapairs_ray.stages.index import merge_topk
from megapairs_ray.stages.mine import TOO_FEW_NEGATIVES, is_query, mine_batch, pair_id
from tests.synthetic import clustered, random_ids
from tests.test_index import _build

SPACES = ["clip_image", "dino_image", "clip_text"]


def _data(n=600, seed=0):
    ids = random_ids(n, seed)
    vecs = {
        "clip_image": clustered(n, 24, 12, 0.45, seed + 1),
        "dino_image": clustered(n, 16, 8, 0.40, seed + 2),
        "clip_text": clustered(n, 24, 15, 0.50, seed + 3),
    }
    return ids, vecs


def brute_force(ids, vecs, query_rows, cfg):
    """The rules, written out plainly over full similarity matrices."""
    pairs, rejects = [], []
    for r in query_rows:
        q = int(ids[r])
        retrieved = {}  # space -> list of (id, sim) in rank order, self excluded
        for s in cfg.spaces:
            sims = vecs[s] @ vecs[s][r]
            order = sorted(range(len(ids)), key=lambda j: (-sims[j], int(ids[j])))[: cfg.k]
            retrieved[s] = [(int(ids[j]), float(sims[j])) for j in order if int(ids[j]) != q]
        dups = {i for s in cfg.spaces for i, v in retrieved[s] if v >= cfg.windows[s][1]}
        in_window = {s: [(i, v) for i, v in retrieved[s]
                         if cfg.windows[s][0] < v < cfg.windows[s][1] and i not in dups]
                     for s in cfg.spaces}
        targets = []
        rank = 0
        while len(targets) < cfg.targets_per_query and any(len(in_window[s]) > 0
                                                            for s in cfg.spaces):
            moved = False
            for s in cfg.spaces:
                if len(targets) == cfg.targets_per_query:
                    break
                while in_window[s] and in_window[s][0][0] in targets:
                    in_window[s].pop(0)
                if in_window[s]:
                    targets.append(in_window[s].pop(0)[0])
                    moved = True
            rank += 1
            if not moved:
                break
        best = {}
        for s in cfg.spaces:
            for i, v in retrieved[s]:
                if i not in dups:
                    best[i] = max(best.get(i, -9.0), v)
        for t in targets:
            negs = [i for i, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0])) if i != t]
            negs = negs[: cfg.max_hard_negatives]
            if len(negs) < cfg.min_hard_negatives:
                rejects.append((q, t))
                continue
            found = [(s, v) for s in cfg.spaces for i, v in retrieved[s]
                     if i == t and cfg.windows[s][0] < v < cfg.windows[s][1]]
            pairs.append((q, t, tuple(s for s, _ in found), tuple(round(v, 4) for _, v in found),
                          tuple([q, *negs])))
    return pairs, rejects


def _mine_with_index(tmp_path, ids, vecs, query_rows, cfg, shards=3, index_cfg=None,
                     mmap=False):
    neighbours = {}
    for s in cfg.spaces:
        index = _build(tmp_path / s, index_cfg or IndexConfig(kind="flat", shards=shards), ids,
                       vecs[s], mmap=mmap)
        neighbours[s] = merge_topk([sh.search(vecs[s][query_rows], cfg.k) for sh in index],
                                   cfg.k)
    return mine_batch(ids[query_rows].tolist(), neighbours, cfg)


def _as_tuples(pairs):
    return [(p["query_id"], p["target_id"], tuple(p["spaces"]),
             tuple(round(v, 4) for v in p["similarities"]), tuple(p["hard_negatives"]))
            for p in pairs]


def test_mining_equals_brute_force_on_clustered_embeddings(tmp_path):
    ids, vecs = _data()
    cfg = MineConfig(k=16, windows={s: (0.75, 0.97) for s in SPACES}, targets_per_query=3,
                     min_hard_negatives=3, max_hard_negatives=6)
    rows = list(range(0, 600, 7))
    pairs, rejects = _mine_with_index(tmp_path, ids, vecs, rows, cfg)
    want_pairs, want_rejects = brute_force(ids, vecs, rows, cfg)
    assert len(want_pairs) > 100  # the data really exercises the rules
    got = _as_tuples(pairs)
    assert [g[:3] + g[4:] for g in got] == [w[:3] + w[4:] for w in want_pairs]
    assert np.allclose([v for g in got for v in g[3]], [v for w in want_pairs for v in w[3]],
                       atol=2e-4)  # FAISS and NumPy sum float32 products in different orders
    assert [(r["query_id"], r["target_id"]) for r in rejects] == want_rejects
    # Heterogeneous: targets come from every space, and some pairs from several at once.
    spaces = [p["spaces"] for p in pairs]
    assert {s for sp in spaces for s in sp} == set(SPACES)
    assert any(len(sp) > 1 for sp in spaces)
    for p in pairs:
        assert p["hard_negatives"][0] == p["query_id"]
        assert p["target_id"] not in p["hard_negatives"]
        assert len(p["hard_negatives"]) >= 1 + cfg.min_hard_negatives
        assert p["pair_id"] == pair_id(p["query_id"], p["target_id"])
        assert all(0.75 < v < 0.97 for v in p["similarities"])


def test_near_duplicates_are_neither_targets_nor_negatives(tmp_path):
    ids, vecs = _data(200, seed=10)
    for s in SPACES:  # row 1 is a near-copy of row 0 in every space
        v = vecs[s][0] + 0.01 * np.random.default_rng(1).standard_normal(vecs[s].shape[1])
        vecs[s][1] = v / np.linalg.norm(v)
    cfg = MineConfig(k=16, windows={s: (0.6, 0.97) for s in SPACES}, min_hard_negatives=1)
    pairs, _ = _mine_with_index(tmp_path, ids, vecs, [0], cfg)
    assert pairs
    for p in pairs:
        assert p["target_id"] != ids[1] and ids[1] not in p["hard_negatives"]


def test_too_few_hard_negatives_is_a_reject_with_the_reason(tmp_path):
    ids, vecs = _data(300, seed=20)
    cfg = MineConfig(k=4, windows={s: (0.3, 0.999) for s in SPACES}, spaces=["clip_image"],
                     targets_per_query=1, min_hard_negatives=5)
    pairs, rejects = _mine_with_index(tmp_path, ids, vecs, list(range(20)), cfg)
    assert not pairs
    assert rejects and {r["reason"] for r in rejects} == {TOO_FEW_NEGATIVES}
    assert all(r["detail"] == "2 < 5" for r in rejects)  # k=4: self, target, 2 others


def test_deterministic_and_seeded_query_sample():
    ids = random_ids(20_000, 3)
    a = is_query(ids, 0.25, seed=7)
    assert np.array_equal(a, is_query(ids, 0.25, seed=7))
    assert 0.23 < a.mean() < 0.27
    assert not np.array_equal(a, is_query(ids, 0.25, seed=8))
    assert is_query(ids, 1.0, seed=0).all()


def test_config_rejects_bad_windows():
    with pytest.raises(ValueError, match="lo < hi"):
        MineConfig(windows={s: (0.9, 0.8) for s in SPACES})
    # On its own, mine's spaces are its windows' (in a run config, the embed spaces).
    assert MineConfig(windows={"dino_image": (0.8, 0.9)}).spaces == ["dino_image"]
    with pytest.raises(ValueError, match="twice"):
        MineConfig(windows={"clip_image": (0.8, 0.9)}, spaces=["clip_image", "clip_image"])


def _true_similarities(ids, vecs, pairs):
    """Each pair's similarity in each of its spaces, as float64 inner products of the stored
    (fp16) vectors."""
    row = {int(i): r for r, i in enumerate(ids)}
    stored = {s: v.astype(np.float16).astype(np.float64) for s, v in vecs.items()}
    return [[float(stored[s][row[p["query_id"]]] @ stored[s][row[p["target_id"]]])
             for s in p["spaces"]] for p in pairs]


@pytest.mark.parametrize("mmap", [False, True])
def test_on_a_refined_ivf_pq_index_every_mined_similarity_is_true_and_in_its_window(
        tmp_path, mmap):
    """A coarse IVF-PQ (4 sub-quantizers of 4 bits) scores pairs far from their true similarity;
    with its fp16 refine vectors (memory-mapped or not) every score the rules see is exact."""
    ids, vecs = _data(800, seed=30)
    vecs = {s: v.astype(np.float16).astype(np.float32) for s, v in vecs.items()}  # as stored
    cfg = MineConfig(k=16, windows={s: (0.75, 0.97) for s in SPACES}, min_hard_negatives=3,
                     max_hard_negatives=6)
    rows = list(range(0, 800, 5))
    coarse = {"kind": "ivf_pq", "shards": 2, "nlist": 8, "nprobe": 8, "pq_m": 4, "pq_nbits": 4,
              "train_sample": 800}
    results = {}
    for refine in (False, True):
        icfg = IndexConfig(**coarse, pq_refine=refine, pq_refine_k_factor=4)
        pairs, _ = _mine_with_index(tmp_path / str(refine), ids, vecs, rows, cfg,
                                    index_cfg=icfg, mmap=mmap)
        assert len(pairs) > 100
        truth = _true_similarities(ids, vecs, pairs)
        got = [p["similarities"] for p in pairs]
        error = max(abs(a - b) for t, g in zip(truth, got) for a, b in zip(t, g))
        outside = sum(not 0.75 < a < 0.97 for t in truth for a in t)
        results[refine] = (error, outside)
    assert results[False][0] > 0.01 and results[False][1] > 0  # the problem is real here
    assert results[True][0] < 1e-6, results
    assert results[True][1] == 0, results
