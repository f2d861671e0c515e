"""Exact score ties on real data: the bundled corpus's caption space.

Shards 1 and 2 of ``data/corpus`` (built by scripts/setup.sh) hold 200 images; 74 of them share
one caption, 53 another, 34 a third, so their text embeddings are bit-identical and tie exactly,
often at the k-th neighbour. Neighbours and mined pairs must not depend on how the index is
sharded or in which order its vectors were inserted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megapairs_ray.config import IndexConfig, MineConfig, config_from_dict
from megapairs_ray.ids import image_ids
from megapairs_ray.io import storage
from megapairs_ray.io.shards import Record, list_shards, read_shard
from megapairs_ray.stages.index import (
    IndexShard,
    ShardMeta,
    build_shard,
    id_range,
    merge_topk,
    save_shard,
    shard_of,
    train_index,
)
from megapairs_ray.stages.mine import mine_batch
from tests.helpers import tiny_config
from tests.synthetic import mark_embedded, write_space

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
TARS = ("shard-00001.tar", "shard-00002.tar")
SPACE = "clip_text"
K = 16
# Wide enough that many pairs hang on neighbours near the k-th, below the exact duplicates (1.0).
MINE = {"spaces": [SPACE], "k": K, "windows": {SPACE: (0.5, 0.99)}, "targets_per_query": 5,
        "min_hard_negatives": 2, "num_cpus": 0.25}


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The two corpus shards (linked into a folder of their own) and their caption embeddings,
    computed as the embed stage computes them (the tiny profile's seeded text tower, fp16)."""
    import torch

    from megapairs_ray.models.encoders import build_clip, space_seed

    missing = [t for t in TARS if not (CORPUS / t).is_file()]
    assert not missing, f"{missing} not in {CORPUS}: run scripts/setup.sh"
    root = tmp_path_factory.mktemp("ties")
    corpus = root / "corpus"
    corpus.mkdir()
    for t in TARS:
        (corpus / t).symlink_to(CORPUS / t)
    cfg = config_from_dict(tiny_config(root / "probe", [str(corpus)]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as an embed actor on one CPU; spinning threads cost more here
    try:
        encoder = cfg.embed.space(SPACE).encoder
        torch.manual_seed(space_seed(cfg.embed.seed, encoder))
        clip = build_clip(encoder, torch.device("cpu"), torch.float32)
        per_slug = {}
        for shard in list_shards(cfg.input):
            records = [r for r in read_shard(shard, cfg.input)
                       if isinstance(r, Record) and r.caption]
            with torch.inference_mode():
                vectors = clip.encode_text([r.caption for r in records]).to(torch.float16)
            per_slug[shard.slug] = (image_ids(shard.id_source, [r.key for r in records]),
                                    vectors.numpy())
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "corpus": corpus, "per_slug": per_slug}


def _neighbours(tmp: Path, ids: np.ndarray, x: np.ndarray, queries: np.ndarray, shards: int,
                order_seed: int | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage-level search: a flat index of ``shards`` id-range shards, vectors inserted in a
    seeded random order (or as given), merged as the mine stage merges."""
    order = (np.arange(len(ids)) if order_seed is None
             else np.random.default_rng(order_seed).permutation(len(ids)))
    ids, x = ids[order], x[order]
    cfg = IndexConfig(kind="flat", shards=shards)
    trained = train_index(cfg, x, len(x))
    of = shard_of(ids, shards)
    out = tmp / f"{shards}-{order_seed}-{k}"
    for s in range(shards):
        lo, hi = id_range(s, shards)
        save_shard(str(out), build_shard(trained, ids[of == s], x[of == s]),
                   ShardMeta(SPACE, s, shards, "flat", "Flat", x.shape[1], int((of == s).sum()),
                             lo, hi))
    index = [IndexShard(str(out), s, cfg) for s in range(shards)]
    return merge_topk([s.search(queries, k) for s in index], k)


def test_real_ties_give_the_same_neighbours_and_pairs_for_any_sharding_and_order(captions,
                                                                                tmp_path):
    per_slug = captions["per_slug"]
    ids = np.concatenate([i for i, _ in per_slug.values()])
    x = np.concatenate([v for _, v in per_slug.values()]).astype(np.float32)
    rules = MineConfig(**MINE)
    want_s, want_i = _neighbours(tmp_path, ids, x, x, 1, None, K + 1)
    # Many rows tie at the k-th score with the group running past k.
    assert (want_s[:, K - 1] == want_s[:, K]).sum() > 50
    want_s, want_i = want_s[:, :K], want_i[:, :K]
    want, _ = mine_batch(ids.tolist(), {SPACE: (want_s, want_i)}, rules)
    assert len(want) > 100
    for shards, seed in [(1, 1), (2, None), (2, 2), (4, 3)]:
        got_s, got_i = _neighbours(tmp_path, ids, x, x, shards, seed, K)
        differ = int((got_i != want_i).any(axis=1).sum())
        assert differ == 0, f"{shards} shards, order {seed}: {differ} queries differ"
        assert (got_s == want_s).all()
        got, _ = mine_batch(ids.tolist(), {SPACE: (got_s, got_i)}, rules)
        assert got == want


def _mine(captions: dict, name: str, shards: int, order_seed: int | None) -> list[tuple]:
    """Index and mine through Ray (shard actors, miners), embeddings written in a seeded random
    row order; the pairs, sorted."""
    cfg = config_from_dict(tiny_config(
        captions["root"] / name, [str(captions["corpus"])],
        index={"kind": "flat", "shards": shards, "shard_num_cpus": 0.1}, mine=MINE))
    slugs = [s.slug for s in list_shards(cfg.input)]
    rng = np.random.default_rng(order_seed)
    for slug in slugs:
        ids, x = captions["per_slug"][slug]
        order = np.arange(len(ids)) if order_seed is None else rng.permutation(len(ids))
        write_space(cfg.run_dir, SPACE, ids[order], x[order], [slug])
    mark_embedded(cfg, slugs)
    from megapairs_ray.pipeline.engine import run_stage
    from megapairs_ray.pipeline.index import INDEX
    from megapairs_ray.pipeline.mine import MINE as MINE_STAGE

    run_stage(INDEX, cfg)
    run_stage(MINE_STAGE, cfg)
    table = storage.read_parquet_dir(storage.join(cfg.run_dir, "pairs"))
    return sorted((p["query_id"], p["target_id"], tuple(p["hard_negatives"]),
                   tuple(p["similarities"])) for p in table.to_pylist())


@pytest.mark.ray
@pytest.mark.slow
def test_mined_pairs_are_the_same_for_any_sharding_and_any_build(captions, ray_cluster):
    """End to end on Ray (shard actors, miners): one index vs a second build in 4 shards from
    the embeddings in another row order (and Ray Data's own file order). The test above covers
    each sharding and order apart, without Ray's start-up costs."""
    one = _mine(captions, "one", 1, None)
    four = _mine(captions, "four", 4, 3)
    assert len(one) > 100
    differ = len(set(four) ^ set(one))
    assert differ == 0, f"{differ} pairs in only one of the runs ({len(one)} pairs)"
