"""Ingest + embed through Ray Data on a local 2-CPU cluster: counts, values, resume, s3."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapairs_ray import manifest
from megapairs_ray.config import config_from_dict
from megapairs_ray.io import layout, storage
from megapairs_ray.io.shards import fetch_bytes, list_shards
from megapairs_ray.pipeline.embed import EMBED
from megapairs_ray.pipeline.engine import run_stage
from megapairs_ray.pipeline.ingest import INGEST
from megapairs_ray.pipeline.shardlist import InputChangedError
from megapairs_ray.stages.embed import EmbedStage
from megapairs_ray.stages.embed_io import load_space
from tests.helpers import good_samples, jpeg, tiny_config, write_tar
from tests.test_ingest import messy_shard

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _space(run_dir: str, space: str) -> pa.Table:
    table = storage.read_parquet_dir(layout.embeddings_dir(run_dir, space))
    assert table is not None, space
    return table


def _files(run_dir: str) -> dict[str, int]:
    fs, path = storage.filesystem(run_dir)
    return {p: fs.info(p)["size"] for p in fs.find(path) if "manifest" not in p}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("pipeline")
    messy_shard(root / "corpus" / "a" / "messy.tar")
    write_tar(root / "corpus" / "b" / "good.tar", good_samples(30, prefix="b"))
    pq.write_table(pa.table({"jpg": [jpeg(200 + i) for i in range(12)],
                             "caption": [f"parquet caption {i}" for i in range(12)]}),
                   root / "corpus" / "c.parquet")
    cfg = config_from_dict(tiny_config(
        root / "run", [str(root / "corpus" / "a"), str(root / "corpus" / "b"),
                       str(root / "corpus" / "c.parquet")]))
    ingest_rec = run_stage(INGEST, cfg)
    embed_rec = run_stage(EMBED, cfg)
    return cfg, ingest_rec, embed_rec


def test_counts_add_up(local_run):
    cfg, ingest_rec, embed_rec = local_run
    images = storage.read_parquet_dir(storage.join(cfg.run_dir, "images"))
    n = images.num_rows
    assert n == 10 + 30 + 12
    assert ingest_rec.counts["images"] == n
    assert ingest_rec.counts["shards_ingested"] == 3
    assert ingest_rec.rejects["tar_truncated"] == 1  # the cut sample
    assert ingest_rec.counts["shard_problem:tar_truncated"] == 1  # the cut itself
    assert embed_rec.counts["embedded"] == n
    assert embed_rec.counts["shards_embedded"] == 3
    for space in ("clip_image", "dino_image", "clip_text"):
        t = _space(cfg.run_dir, space)
        assert t.num_rows == n
        assert sorted(t.column("image_id").to_pylist()) == sorted(
            images.column("image_id").to_pylist())
    doc = manifest.load(cfg.run_dir)
    assert set(doc["stages"]) == {"ingest", "embed"}
    assert doc["stages"]["ingest"]["rejects"]["missing_caption"] == 1
    assert doc["config"]["profile"] == "test"


def test_embeddings_equal_the_stage_called_directly(local_run):
    cfg, _, _ = local_run
    images = storage.read_parquet_dir(storage.join(cfg.run_dir, "images"))
    sample = images.slice(0, 8).to_pylist()
    data = fetch_bytes(sample, cfg.input)
    stage = EmbedStage(cfg.embed)
    direct = stage({
        "image_id": np.array([r["image_id"] for r in sample]),
        "shard": np.array(["x"] * len(sample), dtype=object),
        "image": np.array(data, dtype=object),
        "caption": np.array([r["caption"] for r in sample], dtype=object),
        "format": np.array([r["format"] for r in sample], dtype=object),
        "mode": np.array([r["mode"] for r in sample], dtype=object),
    })
    for space in ("clip_image", "dino_image", "clip_text"):
        ids, vectors = load_space(cfg.run_dir, space)
        assert vectors.dtype == np.float16
        stored = dict(zip(ids.tolist(), vectors))
        for i, r in enumerate(sample):
            assert np.allclose(stored[r["image_id"]].astype(np.float32),
                               direct[space][i].astype(np.float32), atol=3e-3), space


def test_rerun_does_nothing_and_interrupted_shard_is_redone(local_run):
    cfg, _, _ = local_run
    before = _files(cfg.run_dir)
    again = run_stage(EMBED, cfg)
    assert again.counts["shards_skipped_done"] == 3
    assert again.counts.get("shards_embedded", 0) == 0
    assert _files(cfg.run_dir) == before
    assert run_stage(INGEST, cfg).counts["shards_skipped_done"] == 3

    # Interrupt one shard: no markers, half its output, plus a stray part from the dead run.
    shard = next(s for s in list_shards(cfg.input) if s.name == "good.tar")
    for stage in ["embed", *(f"embed.{n}" for n in cfg.embed.space_names)]:
        storage.remove(layout.marker(cfg.run_dir, stage, shard.slug))
    shard_dir = layout.embeddings_shard_dir(cfg.run_dir, "clip_image", shard.slug)
    parts = storage.list_files(shard_dir, ".parquet")
    stray = storage.read_parquet(parts[0])
    storage.write_parquet(storage.join(shard_dir, "part-stray.parquet"), stray)
    other = {p: s for p, s in before.items() if shard.slug not in p}

    rerun = run_stage(EMBED, cfg)
    assert rerun.counts["shards_embedded"] == 1
    assert rerun.counts["shards_skipped_done"] == 2
    after = _files(cfg.run_dir)
    assert {p: s for p, s in after.items() if shard.slug not in p} == other
    assert not any("part-stray" in p for p in after)
    t = _space(cfg.run_dir, "clip_image")
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))  # nothing written twice


def test_embed_refuses_before_ingest(tmp_path, ray_cluster):
    write_tar(tmp_path / "c" / "s.tar", good_samples(2))
    cfg = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "c")]))
    with pytest.raises(RuntimeError, match="ingest has not run"):
        run_stage(EMBED, cfg)


def test_s3_corpus_and_s3_run_dir(tmp_path, bucket, ray_cluster):
    import s3fs

    fs = s3fs.S3FileSystem()
    write_tar(tmp_path / "s0.tar", good_samples(9, prefix="x"))
    write_tar(tmp_path / "s1.tar", good_samples(7, prefix="y"))
    fs.put(str(tmp_path / "s0.tar"), f"{bucket}/corpus/s0.tar")
    fs.put(str(tmp_path / "s1.tar"), f"{bucket}/corpus/s1.tar")
    cfg = config_from_dict(tiny_config(f"s3://{bucket}/runs/r1", [f"s3://{bucket}/corpus"]))
    assert run_stage(INGEST, cfg).counts["images"] == 16
    rec = run_stage(EMBED, cfg)
    assert rec.counts["embedded"] == 16
    t = storage.read_parquet_dir(layout.embeddings_dir(cfg.run_dir, "dino_image"))
    assert t.num_rows == 16
    assert fs.exists(f"{bucket}/runs/r1/manifest.json")
    assert run_stage(EMBED, cfg).counts["shards_skipped_done"] == 2


def test_changed_source_is_a_counted_reject_and_a_changed_input_is_refused(tmp_path,
                                                                          ray_cluster):
    samples = good_samples(6)
    write_tar(tmp_path / "c" / "s.tar", samples)
    cfg = config_from_dict(tiny_config(tmp_path / "run", [str(tmp_path / "c")]))
    assert run_stage(INGEST, cfg).counts["images"] == 6
    # The shard is rewritten after ingest: one image's bytes are no longer what was checked.
    samples[2]["jpg"] = jpeg(77, (120, 90))
    write_tar(tmp_path / "c" / "s.tar", samples)
    rec = run_stage(EMBED, cfg)
    assert rec.counts["embedded"] == 5
    assert rec.rejects == {"source_changed": 1}
    # A new shard under the same run: refused with a clear message, not half-processed.
    write_tar(tmp_path / "c" / "t.tar", good_samples(2, prefix="t"))
    with pytest.raises(InputChangedError, match=r"added \['t.tar'\]"):
        run_stage(INGEST, cfg)


def test_an_added_space_is_computed_alone_and_a_changed_one_recomputed_alone(tmp_path,
                                                                            ray_cluster):
    for i in range(2):
        write_tar(tmp_path / "c" / f"s{i}.tar", good_samples(5, prefix=f"s{i}"))
    doc = tiny_config(tmp_path / "run", [str(tmp_path / "c")])
    cfg = config_from_dict(doc)
    run_stage(INGEST, cfg)
    run_stage(EMBED, cfg)
    before = _files(cfg.run_dir)

    def with_spaces(spaces):
        return config_from_dict({**doc, "embed": {**doc["embed"], "spaces": spaces}})

    def same_files(a, b, spaces):
        for space in spaces:
            assert {p: n for p, n in a.items() if f"/embeddings/{space}/" in p} == {
                p: n for p, n in b.items() if f"/embeddings/{space}/" in p}, space

    # A space added (and a resource changed): only the new space is computed.
    spaces = [dict(s) for s in doc["embed"]["spaces"]]
    spaces[2] = {**spaces[2], "batch_size": 3}
    spaces.append({"name": "dino_mean", "encoder": {**spaces[1]["encoder"], "pooling": "mean"}})
    rec = run_stage(EMBED, with_spaces(spaces))
    assert rec.counts["shards_embedded"] == 2 and "changed" not in rec.inputs
    after = _files(cfg.run_dir)
    same_files(before, after, ("clip_image", "dino_image", "clip_text"))
    assert _space(cfg.run_dir, "dino_mean").num_rows == 10

    # One space's model changed: that space goes and is made again, alone.
    enc = spaces[1]["encoder"]
    spaces[1] = {**spaces[1], "encoder": {**enc, "image_size": 42, "config_overrides": {
        **enc["config_overrides"], "image_size": 42}}}
    moved = with_spaces(spaces)
    old = dict(zip(*load_space(cfg.run_dir, "dino_image")))
    rec = run_stage(EMBED, moved)
    assert rec.inputs["changed"] == ["embed.spaces.dino_image.encoder.config_overrides",
                                     "embed.spaces.dino_image.encoder.image_size"]
    assert rec.counts["shards_embedded"] == 2
    same_files(after, _files(cfg.run_dir), ("clip_image", "clip_text", "dino_mean"))
    ids, vecs = load_space(cfg.run_dir, "dino_image")
    assert len(ids) == len(set(ids.tolist())) == 10  # nothing mixed, nothing twice
    assert all(not np.allclose(v, old[i]) for i, v in zip(ids.tolist(), vecs))
    assert run_stage(EMBED, moved).counts["shards_skipped_done"] == 2
